"""Faults only a real systemd can show: the service comes back by itself and the bot is served.

One deployed host whose changes live in an overlay kept on disk, so that halting and booting
the container again is a real reboot (the volatile containers of the other modules forget
everything at halt). The tests run in file order and each leaves the service running.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.systemd.conftest import LOGS, Timings
from tests.systemd.container import Container
from tests.systemd.trading_host import (
    NEW_UNIT,
    TradingHost,
    prepare_trading_host,
    run_playbook,
)

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

LOG_DIR = LOGS / "service-faults"
DROPIN = f"/etc/systemd/system/{NEW_UNIT}.d/test-watchdog.conf"


@pytest.fixture(scope="module")
def host(rootfs: Any, role_vars: Dict[str, Any], timings: Timings,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[TradingHost]:
    persist: Path = tmp_path_factory.mktemp("service-faults-root")
    start = time.monotonic()
    try:
        with Container(rootfs, "trs-faults", LOG_DIR, persist=persist) as container:
            host = prepare_trading_host(container, legacy=None)
            deploy = run_playbook(container, LOG_DIR, "deploy", extra_vars=role_vars)
            assert deploy.returncode == 0, deploy.output[-6000:]
            assert host.wait_bot_records(1), container.journal(NEW_UNIT)
            yield host
    finally:
        timings.record("service faults: whole module", time.monotonic() - start)
        shutil.rmtree(persist, ignore_errors=True)


def wait_restarted(host: TradingHost, restarts_before: int, timeout: float = 40) -> Dict[str, str]:
    deadline = time.monotonic() + timeout
    props = host.unit()
    while time.monotonic() < deadline:
        props = host.unit()
        if int(props["NRestarts"]) > restarts_before and props["ActiveState"] == "active":
            return props
        time.sleep(0.3)
    raise AssertionError(f"not restarted: {props}\n{host.container.journal(NEW_UNIT)}")


def sender_python(host: TradingHost) -> str:
    main_pid = host.unit()["MainPID"]
    pids = host.container.sh(f"pgrep -P {main_pid} -f '[t]oken_refresh_sender[.]py'").split()
    assert pids, "python is not uv's child"
    return pids[0]


def test_systemctl_kill_sigkill_brings_the_service_back_and_the_bot_gets_a_token(
    host: TradingHost,
) -> None:
    c = host.container
    before = len(host.bot_records())
    restarts = int(host.unit()["NRestarts"])
    c.run(["systemctl", "kill", "--signal=KILL", NEW_UNIT])
    props = wait_restarted(host, restarts)
    assert props["SubState"] == "running", props
    assert len(host.wait_bot_records(before + 1)) > before, c.journal(NEW_UNIT)


def test_the_watchdog_restarts_a_frozen_sender_and_the_bot_gets_a_token(
    host: TradingHost,
) -> None:
    c = host.container
    # The role's WatchdogSec is 2 minutes; a drop-in shortens it for this test only.
    c.write(DROPIN, "[Service]\nWatchdogSec=3\n")
    c.run(["systemctl", "daemon-reload"])
    c.run(["systemctl", "restart", NEW_UNIT])
    assert host.wait_unit("active")["ActiveState"] == "active"
    time.sleep(4)  # pings keep it alive past WatchdogSec while it runs
    assert host.unit()["ActiveState"] == "active"
    before = len(host.bot_records())
    restarts = int(host.unit()["NRestarts"])
    c.run(["kill", "-STOP", sender_python(host)])
    props = wait_restarted(host, restarts)
    assert props["SubState"] == "running", props
    assert "Watchdog timeout" in c.journal(NEW_UNIT, lines=200)
    assert len(host.wait_bot_records(before + 1)) > before, c.journal(NEW_UNIT)
    c.run(["rm", "-f", DROPIN])
    c.run(["systemctl", "daemon-reload"])
    c.run(["systemctl", "restart", NEW_UNIT])
    assert host.wait_unit("active")["ActiveState"] == "active"


def test_after_a_reboot_the_service_is_back_and_the_bot_gets_a_token(host: TradingHost) -> None:
    c = host.container
    before = len(host.bot_records())
    token_before = host.token_file()
    c.halt()
    c.boot()
    props = host.wait_unit("active")
    assert props["ActiveState"] == "active" and props["UnitFileState"] == "enabled", props
    records = host.wait_bot_records(before + 1)
    assert len(records) > before, c.journal(NEW_UNIT)
    assert host.token_file()["creation_timestamp"] == token_before["creation_timestamp"]
