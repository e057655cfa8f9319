"""End to end: a trading host running the legacy unit is migrated by playbooks/deploy.yml.

One container for the whole module (each full role run costs half a minute): --check --diff on
the fresh host, the deploy, a second deploy and --check --diff on the deployed host run once in
the fixture; the tests then read the state they left. The service life-cycle tests come last,
in file order, because they restart, kill and break the service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator

import pytest

from tests.systemd.conftest import LOGS, Timings
from tests.systemd.container import Container
from tests.systemd.trading_host import (
    BACKUP_DIR,
    BOT_USER,
    LEGACY_DROPIN_PATH,
    LEGACY_DROPIN_TEXT,
    LEGACY_UNIT,
    LEGACY_UNIT_PATH,
    LEGACY_UNIT_TEXT,
    NEW_UNIT,
    SETTINGS_FILE,
    TOKEN_FILE,
    PlaybookRun,
    TradingHost,
    prepare_trading_host,
    run_playbook,
)

# Module fixtures run several full deploys (and may wait for the root file system build).
pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

LOG_DIR = LOGS / "migrate-legacy-unit"


@dataclass
class Migration:
    host: TradingHost
    check_fresh: PlaybookRun
    deploy: PlaybookRun
    deploy_started: float
    unit_started: float  # when the deploy started token-refresh-sender (unix time)
    deploy_again: PlaybookRun
    check_deployed: PlaybookRun


@pytest.fixture(scope="module")
def migration(
    rootfs: Any, role_vars: Dict[str, Any], timings: Timings
) -> Iterator[Migration]:
    start = time.monotonic()
    with Container(rootfs, "trs-legacy-unit", LOG_DIR) as container:
        timings.record("legacy unit: boot", time.monotonic() - start)
        host = prepare_trading_host(container, legacy="unit")
        timings.record("legacy unit: boot + prepare", time.monotonic() - start)

        def play(name: str, *args: str) -> PlaybookRun:
            run = run_playbook(container, LOG_DIR, name, *args, extra_vars=role_vars)
            timings.record(f"legacy unit: {name}", run.seconds)
            return run

        check_fresh = play("check-fresh", "--check", "--diff")
        deploy_started = time.time()
        deploy = play("deploy")
        assert deploy.returncode == 0, deploy.output[-6000:]
        unit_started = container.timestamp(NEW_UNIT, "ExecMainStartTimestamp")
        deploy_again = play("deploy-again")
        check_deployed = play("check-deployed", "--check", "--diff")
        yield Migration(host, check_fresh, deploy, deploy_started, unit_started, deploy_again,
                        check_deployed)
    timings.record("legacy unit: whole module", time.monotonic() - start)


def test_check_diff_on_the_fresh_host_fails_nowhere(migration: Migration) -> None:
    run = migration.check_fresh
    assert run.returncode == 0 and run.failed == 0, run.output[-6000:]
    assert run.changed > 0


def test_deploy_succeeds(migration: Migration) -> None:
    assert migration.deploy.failed == 0, migration.deploy.output[-6000:]


def test_legacy_unit_is_stopped_disabled_removed_and_backed_up(migration: Migration) -> None:
    c = migration.host.container
    legacy = c.show(LEGACY_UNIT, "LoadState", "ActiveState", "UnitFileState")
    assert legacy["LoadState"] == "not-found", legacy
    assert legacy["ActiveState"] == "inactive", legacy
    assert not c.exists(LEGACY_UNIT_PATH)
    assert not c.exists(LEGACY_DROPIN_PATH)
    assert not c.exists(f"/etc/systemd/system/multi-user.target.wants/{LEGACY_UNIT}")
    assert c.read(f"{BACKUP_DIR}/files{LEGACY_UNIT_PATH}") == LEGACY_UNIT_TEXT
    assert c.read(f"{BACKUP_DIR}/files{LEGACY_DROPIN_PATH}") == LEGACY_DROPIN_TEXT
    manifest = c.read(f"{BACKUP_DIR}/manifest.yml")
    assert f"fragment_path: {LEGACY_UNIT_PATH}" in manifest
    assert "was_active: true" in manifest and "was_enabled: true" in manifest
    assert c.sh("pgrep -f '[t]oken_refresh_service[.]py' || true").strip() == ""


def test_new_unit_is_active_ready_as_the_bot_user_and_hardened(migration: Migration) -> None:
    c = migration.host.container
    props = c.show(NEW_UNIT)
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["UnitFileState"] == "enabled"
    assert props["Type"] == "notify" and props["NotifyAccess"] == "all"
    # READY=1 arrived: a Type=notify unit is only "active (running)" after it.
    assert props["StatusText"], "the sender sent no STATUS= text"
    assert props["User"] == BOT_USER
    python_pids = c.sh(f"pgrep -u {BOT_USER} -f '[t]oken_refresh_sender[.]py'").split()
    assert python_pids, "no sender process runs as the bot's user"
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "no", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "",
        "RestartPreventExitStatus": "64 65 66 78", "Restart": "on-failure",
        "UMask": "0077", "RestrictNamespaces": "yes",
    }
    assert c.show(NEW_UNIT, *hardening) == hardening
    environment = props["Environment"].split()
    assert "UV_OFFLINE=1" in environment and "UV_PYTHON_DOWNLOADS=never" in environment


def test_bot_received_a_token_from_the_new_sender_and_never_held_an_expired_one(
    migration: Migration,
) -> None:
    host = migration.host
    records = host.bot_records()
    assert records[0]["t"] < migration.deploy_started, "the legacy sender delivered before"
    first_new = [r for r in records if r["t"] >= migration.unit_started - 1]
    assert first_new, f"the bot received nothing from the new sender: {records}"
    assert first_new[0]["t"] - migration.unit_started < 5
    # The bot's rule: a token is expired 5 minutes before expires_at. From the first token it
    # received (the legacy one, before the deploy) until now, it always held a valid one.
    checkpoints = [r["t"] for r in records] + [time.time()]
    for t in checkpoints:
        held = [r for r in records if r["t"] <= t][-1]
        assert held["payload"]["expires_at"] - 300 > t, (t, held)


def test_token_file_kept_its_creation_timestamp_owner_and_path(migration: Migration) -> None:
    host = migration.host
    assert host.token_file()["creation_timestamp"] == host.token_at_start["creation_timestamp"]
    owner_mode = host.container.sh(f"stat -c '%U %a' {TOKEN_FILE}").split()
    assert owner_mode == [BOT_USER, "600"]


def test_bundle_scripts_are_root_owned_and_configs_writable_by_the_service_user(
    migration: Migration,
) -> None:
    c = migration.host.container
    assert c.sh("stat -c '%U %a' /opt/bigbrother/scripts").split() == ["root", "755"]
    assert c.sh("stat -c '%U %a' /opt/bigbrother/scripts/token_refresh_sender.py").split() == [
        "root", "644"]
    assert c.sh("stat -c '%U %a' /opt/bigbrother/configs").split() == [BOT_USER, "750"]
    probe = c.run(["runuser", "-u", BOT_USER, "--", "touch", "/opt/bigbrother/scripts/x"],
                  check=False)
    assert probe.returncode != 0


def test_second_deploy_changes_nothing(migration: Migration) -> None:
    run = migration.deploy_again
    assert run.failed == 0, run.output[-6000:]
    assert run.changed == 0, run.changed_tasks()


def test_check_diff_on_the_deployed_host_reports_no_change(migration: Migration) -> None:
    run = migration.check_deployed
    assert run.returncode == 0 and run.failed == 0, run.output[-6000:]
    assert run.changed == 0, run.changed_tasks()


def test_no_secret_is_printed(migration: Migration) -> None:
    from tests.systemd.trading_host import ACCESS_TOKEN, APP_SECRET, REFRESH_TOKEN

    for run in (migration.check_fresh, migration.deploy, migration.deploy_again,
                migration.check_deployed):
        for secret in (APP_SECRET, REFRESH_TOKEN, ACCESS_TOKEN):
            assert secret not in run.output


# -- life cycle: these change the service's state, so they run last -------------------------


def test_restart_and_stop_leave_the_unit_active_then_inactive_never_failed(
    migration: Migration,
) -> None:
    host = migration.host
    c = host.container
    c.run(["systemctl", "restart", NEW_UNIT])
    assert host.unit()["ActiveState"] == "active"
    c.run(["systemctl", "stop", NEW_UNIT])
    props = host.unit()
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    c.run(["systemctl", "start", NEW_UNIT])
    assert host.unit()["ActiveState"] == "active"


def test_killed_python_is_restarted_and_the_bot_gets_a_token_again(migration: Migration) -> None:
    host = migration.host
    c = host.container
    before = len(host.bot_records())
    main_pid = host.unit()["MainPID"]
    python = c.sh(f"pgrep -P {main_pid} -f '[t]oken_refresh_sender[.]py'").split()
    assert python, "python is not uv's child"
    c.run(["kill", "-KILL", python[0]])
    deadline = time.monotonic() + 30
    props = host.unit()
    while time.monotonic() < deadline:
        props = host.unit()
        if int(props["NRestarts"]) >= 1 and props["ActiveState"] == "active":
            break
        time.sleep(0.5)
    assert int(props["NRestarts"]) >= 1 and props["ActiveState"] == "active", props
    assert len(host.wait_bot_records(before + 1)) > before


def test_broken_settings_fail_the_unit_once_without_a_restart_loop(migration: Migration) -> None:
    host = migration.host
    c = host.container
    c.sh(f"echo 'no_such_setting: 1' >> {SETTINGS_FILE}")
    c.run(["systemctl", "restart", NEW_UNIT], check=False)
    props = host.wait_unit("failed")
    assert props["ActiveState"] == "failed", props
    assert props["ExecMainStatus"] == "78", props
    restarts = int(props["NRestarts"])
    time.sleep(12)  # longer than RestartSec=10
    props = host.unit()
    assert props["ActiveState"] == "failed" and int(props["NRestarts"]) == restarts, props
