"""End to end: MIGRATION.md's by-hand migration and rollback, run as written on a trading host.

The blocks tagged `<!-- test: NAME -->` in MIGRATION.md (tests/systemd/migration_doc.py finds
them) run in the order of HOST_BLOCKS, each in `bash -e` after the document's `variables`
block and unchanged; the one addition is UV_SYSTEM_CERTS=1 in the environment, because this
machine reaches PyPI through a TLS-intercepting proxy (the document says so). The host runs
the legacy unit, with a drop-in, and a forgotten copy of the legacy script started by hand;
the bundle is copied to the document's SRC as its checklist says.

One container for the module: the fixture runs the blocks and records what the host looked
like after each; the tests read those records.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.systemd.conftest import LOGS, Timings
from tests.systemd.container import Container
from tests.systemd.migration_doc import (
    DOC,
    HOST_BLOCKS,
    UNIT_PATH,
    directives,
    doc_variables,
    host_blocks,
    render_role_template,
)
from tests.systemd.trading_host import (
    BOT_USER,
    BUNDLE,
    LEGACY_DROPIN_PATH,
    LEGACY_DROPIN_TEXT,
    LEGACY_UNIT,
    LEGACY_UNIT_PATH,
    LEGACY_UNIT_TEXT,
    NEW_UNIT,
    REPO,
    TOKEN_FILE,
    TradingHost,
    prepare_trading_host,
)

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

LOG_DIR = LOGS / "migrate-by-hand"
LEGACY_PATTERN = "[t]oken_refresh_service[.]py"


@dataclass
class BlockRun:
    returncode: int
    stdout: str
    stderr: str
    started: float
    ended: float


@dataclass
class ByHand:
    host: TradingHost
    variables: Dict[str, str]
    manual_pid: int
    runs: Dict[str, BlockRun]
    state: Dict[str, Dict[str, Any]]  # after each block
    times: Dict[str, float]


def legacy_processes(c: Container) -> Dict[int, str]:
    """pid -> the systemd unit it runs in, for every copy of the legacy script."""
    pids = c.sh(f"pgrep -f '{LEGACY_PATTERN}' || true").split()
    units: Dict[int, str] = {}
    for pid in pids:
        unit = c.run(["ps", "-o", "unit=", "-p", pid], check=False).stdout.strip()
        if unit:
            units[int(pid)] = unit
    return units


def host_state(c: Container) -> Dict[str, Any]:
    def content(path: str) -> Any:
        return c.read(path) if c.exists(path) else None

    return {
        "legacy": c.show(LEGACY_UNIT, "LoadState", "ActiveState", "SubState", "UnitFileState",
                         "DropInPaths", "Environment"),
        "new": c.show(NEW_UNIT, "LoadState", "ActiveState", "SubState", "UnitFileState",
                      "NRestarts"),
        "legacy_unit_file": content(LEGACY_UNIT_PATH),
        "legacy_dropin": content(LEGACY_DROPIN_PATH),
        "new_unit_file": content(UNIT_PATH),
        "token_file": hashlib.sha256(c.read(TOKEN_FILE).encode()).hexdigest(),
        "modes": dict(line.split(" ", 1) for line in c.sh(
            f"stat -c '%n %U:%G %a' {BUNDLE} {BUNDLE}/scripts {BUNDLE}/scripts/* {BUNDLE}/configs "
            f"{BUNDLE}/configs/* {BUNDLE}/logs").splitlines()),
        "legacy_processes": legacy_processes(c),
    }


def start_manual_legacy(c: Container) -> int:
    """A forgotten copy of the legacy script, started by hand from a login shell long ago."""
    before = set(legacy_processes(c))
    c.run(["runuser", "-u", BOT_USER, "--", "/bin/sh", "-c",
           f"cd {BUNDLE} && setsid nohup python3 scripts/token_refresh_service.py "
           ">/dev/null 2>&1 </dev/null &"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        new = set(legacy_processes(c)) - before
        if new:
            return new.pop()
        time.sleep(0.1)
    raise AssertionError("the manual legacy process did not start")


def copy_bundle(c: Container, src: str, scripts: Path) -> None:
    """What `scp -r scripts configs root@HOST:SRC/` leaves on the host."""
    for script in scripts.iterdir():
        c.write(f"{src}/scripts/{script.name}", script.read_bytes(), "0644")
    for example in sorted((REPO / "configs").glob("*.example")):
        c.write(f"{src}/configs/{example.name}", example.read_bytes(), "0644")


def wait_record_since(host: TradingHost, t: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["t"] >= t - 1 for r in host.bot_records()):
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def by_hand(rootfs: Any, role_vars: Dict[str, Any], timings: Timings) -> Iterator[ByHand]:
    text = DOC.read_text()
    blocks = host_blocks(text)
    variables = doc_variables(text)
    start = time.monotonic()
    with Container(rootfs, "trs-by-hand", LOG_DIR) as c:
        host = prepare_trading_host(c, legacy="unit")
        manual_pid = start_manual_legacy(c)
        copy_bundle(c, variables["SRC"], Path(role_vars["token_refresh_sender_source_dir"]))
        timings.record("by hand: boot + prepare", time.monotonic() - start)
        runs: Dict[str, BlockRun] = {}
        state: Dict[str, Dict[str, Any]] = {"start": host_state(c)}
        times: Dict[str, float] = {}

        for name in HOST_BLOCKS[1:]:
            script = blocks["variables"] + blocks[name]
            began = time.time()
            proc = c.run(["UV_SYSTEM_CERTS=1", "/bin/bash", "-e", "-c", script], check=False,
                         timeout=300)
            run = BlockRun(proc.returncode, proc.stdout, proc.stderr, began, time.time())
            runs[name] = run
            (LOG_DIR / f"{name}.out").write_text(
                f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
            timings.record(f"by hand: {name}", run.ended - run.started)
            if proc.returncode != 0:
                pytest.fail(f"MIGRATION.md block {name!r} exited {proc.returncode}:\n"
                            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            if name == "by-hand-switch":
                times["new started"] = c.timestamp(NEW_UNIT, "ExecMainStartTimestamp")
                wait_record_since(host, times["new started"])
            if name == "by-hand-rollback":
                times["legacy started"] = c.timestamp(LEGACY_UNIT, "ExecMainStartTimestamp")
                wait_record_since(host, times["legacy started"])
            state[name] = host_state(c)
        yield ByHand(host, variables, manual_pid, runs, state, times)
    timings.record("by hand: whole module", time.monotonic() - start)


def records_since(host: TradingHost, t: float) -> List[Dict[str, Any]]:
    return [r for r in host.bot_records() if r["t"] >= t - 1]


# -- before you start -----------------------------------------------------------------------


def test_before_you_start_records_the_legacy_state_and_backs_it_up(by_hand: ByHand) -> None:
    out = by_hand.runs["before-you-start"].stdout
    assert out.splitlines()[0] == BOT_USER  # the socket's owner
    assert "ActiveState=active" in out and "UnitFileState=enabled" in out
    assert f"DropInPaths={LEGACY_DROPIN_PATH}" in out
    # The manual copy is listed with another unit than the legacy unit's process.
    pid = str(by_hand.manual_pid)
    manual_line = [line for line in out.splitlines() if line.split()[:1] == [pid]]
    assert manual_line and LEGACY_UNIT not in manual_line[0], out
    assert "access token valid for" in out and "creation_timestamp: " in out
    c = by_hand.host.container
    backup = by_hand.variables["BACKUP"]
    assert c.read(f"{backup}/files{LEGACY_UNIT_PATH}") == LEGACY_UNIT_TEXT
    assert c.read(f"{backup}/files{LEGACY_DROPIN_PATH}") == LEGACY_DROPIN_TEXT
    assert c.read(f"{backup}/schwab_tokens.json") == c.read(TOKEN_FILE)


# -- install --------------------------------------------------------------------------------


def test_install_changes_nothing_for_the_bot_and_its_check_passes(by_hand: ByHand) -> None:
    after = by_hand.state["by-hand-install"]
    assert after["legacy"]["ActiveState"] == "active"
    assert by_hand.manual_pid in after["legacy_processes"]
    assert after["new"]["ActiveState"] == "inactive"
    out = by_hand.runs["by-hand-install"].stdout
    assert "token_refresh_sender 1.0.0" in out  # the cache warm-up
    assert "ok    token file:" in out and "ok    bot socket" in out and "FAIL" not in out
    assert by_hand.runs["by-hand-install"].stderr.count("token-refresh-sender.service:") == 0


def test_install_sets_the_owners_and_modes_the_role_sets(by_hand: ByHand) -> None:
    modes = by_hand.state["by-hand-install"]["modes"]
    bot = f"{BOT_USER}:{BOT_USER}"
    expected = {
        BUNDLE: "root:root 755", f"{BUNDLE}/scripts": "root:root 755",
        f"{BUNDLE}/scripts/token_refresh_sender.py": "root:root 644",
        f"{BUNDLE}/scripts/token_refresh_sender.py.lock": "root:root 644",
        f"{BUNDLE}/scripts/run_token_sender.sh": "root:root 755",
        f"{BUNDLE}/configs": f"{bot} 750", f"{BUNDLE}/logs": f"{bot} 750",
        TOKEN_FILE: f"{bot} 600", f"{BUNDLE}/configs/schwab_app_config.yaml": f"{bot} 600",
        f"{BUNDLE}/configs/token_refresh_sender.yaml": f"root:{BOT_USER} 640",
    }
    assert {path: modes.get(path) for path in expected} == expected


def test_installed_unit_is_the_roles_unit(by_hand: ByHand, tmp_path: Path) -> None:
    installed = by_hand.state["by-hand-install"]["new_unit_file"]
    rendered = render_role_template(tmp_path / "unit", BUNDLE, "token-refresh-sender.service.j2")
    assert directives(installed) == directives(rendered)


# -- switch ---------------------------------------------------------------------------------


def test_switch_stops_the_legacy_unit_and_the_manual_copy(by_hand: ByHand) -> None:
    after = by_hand.state["by-hand-switch"]
    assert after["legacy"]["ActiveState"] == "inactive", after["legacy"]
    assert after["legacy"]["UnitFileState"] == "disabled"
    assert after["legacy_processes"] == {}


def test_new_service_runs_and_delivered_within_seconds_of_starting(by_hand: ByHand) -> None:
    after = by_hand.state["by-hand-switch"]
    assert after["new"]["ActiveState"] == "active" and after["new"]["SubState"] == "running"
    assert after["new"]["UnitFileState"] == "enabled"
    started = by_hand.times["new started"]
    first = records_since(by_hand.host, started)
    assert first and first[0]["t"] - started < 5, first
    assert by_hand.host.token_file()["creation_timestamp"] == (
        by_hand.host.token_at_start["creation_timestamp"])


def test_verify_shows_the_service_active_and_delivering(by_hand: ByHand) -> None:
    out = by_hand.runs["verify"].stdout
    assert out.splitlines()[0] == "active"
    assert "active (running)" in out
    assert "delivered access token" in out  # journal and log file
    assert "last delivery" in out and ": delivered" in out
    assert "ok    bot socket" in out and "FAIL" not in out
    assert by_hand.state["verify"]["new"]["NRestarts"] == "0"


def test_cleanup_removes_the_legacy_unit(by_hand: ByHand) -> None:
    after = by_hand.state["by-hand-cleanup"]
    assert after["legacy"]["LoadState"] == "not-found"
    assert after["legacy_unit_file"] is None and after["legacy_dropin"] is None
    assert after["new"]["ActiveState"] == "active"


# -- rollback -------------------------------------------------------------------------------


def test_rollback_restores_the_legacy_unit_byte_identical_and_running(by_hand: ByHand) -> None:
    after = by_hand.state["by-hand-rollback"]
    assert after["legacy_unit_file"] == LEGACY_UNIT_TEXT
    assert after["legacy_dropin"] == LEGACY_DROPIN_TEXT
    legacy = after["legacy"]
    assert legacy["ActiveState"] == "active" and legacy["UnitFileState"] == "enabled", legacy
    assert "LEGACY_DROPIN=1" in legacy["Environment"].split()
    assert after["new"]["ActiveState"] == "inactive"
    assert after["new"]["UnitFileState"] == "disabled"
    # The token file is left alone.
    assert after["token_file"] == by_hand.state["by-hand-cleanup"]["token_file"]
    assert after["modes"][TOKEN_FILE] == f"{BOT_USER}:{BOT_USER} 600"
    started = by_hand.times["legacy started"]
    first = records_since(by_hand.host, started)
    assert first and first[0]["t"] - started < 5, first


def test_rollback_of_a_manual_copy_starts_it_again(by_hand: ByHand) -> None:
    processes = by_hand.state["by-hand-rollback-manual"]["legacy_processes"]
    manual_unit = "token-refresh-service-manual.service"  # the document's systemd-run
    assert sorted(processes.values()) == sorted([LEGACY_UNIT, manual_unit])
    log = by_hand.host.container.read(f"{BUNDLE}/logs/token_refresh.log")
    assert log.count("legacy token refresh service starting") >= 4, log  # unit, manual, again


def test_the_bot_never_held_an_expired_token(by_hand: ByHand) -> None:
    """From the legacy sender's first delivery, through the switch and the rollback, until now."""
    records = by_hand.host.bot_records()
    assert records[0]["t"] < by_hand.runs["by-hand-switch"].started
    for t in [r["t"] for r in records] + [time.time()]:
        held = [r for r in records if r["t"] <= t][-1]
        assert held["payload"]["expires_at"] - 300 > t, (t, held)
