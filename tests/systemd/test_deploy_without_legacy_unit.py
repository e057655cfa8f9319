"""End to end: a host with no legacy unit, but the legacy script started by hand.

The app config is not on the host (the secrets come from the play, as from Ansible Vault) and
the access token on disk is within the sender's refresh margin: the new sender refreshes it
against the fake Schwab endpoint (reached through the role's token_url) at start-up.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator

import pytest

from tests.fakes.schwab import FakeSchwab
from tests.systemd.conftest import LOGS, Timings
from tests.systemd.container import Container
from tests.systemd.trading_host import (
    APP_CONFIG,
    APP_KEY,
    APP_SECRET,
    BOT_USER,
    LEGACY_UNIT,
    NEW_UNIT,
    SETTINGS_FILE,
    PlaybookRun,
    TradingHost,
    prepare_trading_host,
    run_playbook,
)

# Module fixtures run several full deploys (and may wait for the root file system build).
pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

LOG_DIR = LOGS / "manual-legacy"


@pytest.fixture(scope="module")
def deployed(
    rootfs: Any, role_vars: Dict[str, Any], fake_schwab: FakeSchwab,
    timings: Timings,
) -> Iterator[tuple[TradingHost, PlaybookRun, int]]:
    start = time.monotonic()
    with Container(rootfs, "trs-manual", LOG_DIR) as container:
        # Valid for the bot for 4 more minutes, but inside the sender's 10-minute margin.
        host = prepare_trading_host(container, legacy="manual", token_expires_in=540,
                                    app_config=False)
        timings.record("manual legacy: boot + prepare", time.monotonic() - start)
        requests_before = len(fake_schwab.requests)
        secrets = {"token_refresh_sender_app_key": APP_KEY,
                   "token_refresh_sender_app_secret": APP_SECRET}
        run = run_playbook(container, LOG_DIR, "deploy", extra_vars={**role_vars, **secrets})
        timings.record("manual legacy: deploy", run.seconds)
        yield host, run, requests_before
    timings.record("manual legacy: whole module", time.monotonic() - start)


def test_deploy_succeeds_and_stops_the_manual_legacy_process_with_a_warning(
    deployed: tuple[TradingHost, PlaybookRun, int],
) -> None:
    host, run, _ = deployed
    assert run.returncode == 0 and run.failed == 0, run.output[-6000:]
    assert host.manual_pid is not None
    assert not host.container.exists(f"/proc/{host.manual_pid}")
    assert "WARNING: stopping the legacy token sender running outside systemd" in run.output
    assert f"{host.manual_pid} " in run.output  # the warning names the process


def test_nothing_legacy_to_retire_is_skipped_and_nothing_backed_up(
    deployed: tuple[TradingHost, PlaybookRun, int],
) -> None:
    host, run, _ = deployed
    assert not host.container.exists("/var/backups/token-refresh-sender")
    assert host.container.show(LEGACY_UNIT, "LoadState")["LoadState"] == "not-found"
    for task in ("Back up the legacy unit file and its drop-ins",
                 "Stop and disable the legacy unit", "Remove the legacy unit file and its drop-ins",
                 "Forget the legacy unit's failed state"):
        after = run.output.split(f"TASK [token_refresh_sender : {task}]", 1)[1]
        assert after.split("\n", 2)[1].startswith("skipping:"), task


def test_app_config_is_written_from_the_secrets_without_printing_them(
    deployed: tuple[TradingHost, PlaybookRun, int],
) -> None:
    host, run, _ = deployed
    c = host.container
    assert c.sh(f"stat -c '%U %a' {APP_CONFIG}").split() == [BOT_USER, "600"]
    assert APP_SECRET in c.read(APP_CONFIG)
    assert APP_SECRET not in run.output and APP_KEY not in run.output


def test_new_sender_refreshed_through_the_fake_endpoint_and_delivered(
    deployed: tuple[TradingHost, PlaybookRun, int], fake_schwab: FakeSchwab,
) -> None:
    host, _, requests_before = deployed
    assert host.unit()["ActiveState"] == "active"
    assert len(fake_schwab.requests) > requests_before
    token = host.token_file()
    assert token["creation_timestamp"] == host.token_at_start["creation_timestamp"]
    assert token["token"]["access_token"] != host.token_at_start["token"]["access_token"]
    records = host.bot_records()
    assert records[-1]["payload"]["access_token"] == token["token"]["access_token"]
    for t in [r["t"] for r in records] + [time.time()]:
        held = [r for r in records if r["t"] <= t][-1]
        assert held["payload"]["expires_at"] - 300 > t, (t, held)
    assert host.unit(NEW_UNIT)["NRestarts"] == "0"


def test_a_bad_setting_is_refused_by_the_sender_before_it_replaces_the_settings_file(
    deployed: tuple[TradingHost, PlaybookRun, int], role_vars: Dict[str, Any],
) -> None:
    host, _, _ = deployed
    c = host.container
    before = c.read(SETTINGS_FILE)
    bad = {**role_vars, "token_refresh_sender_settings": {"no_such_setting": 1}}
    run = run_playbook(c, LOG_DIR, "deploy-bad-setting", "--tags", "configure",
                       extra_vars=bad)
    assert run.returncode != 0 and run.failed == 1, run.output[-4000:]
    assert "failed to validate" in run.output
    assert "unknown setting 'no_such_setting'" in run.output
    assert c.read(SETTINGS_FILE) == before
    assert host.unit()["ActiveState"] == "active"
