"""End to end: playbooks/rollback.yml on a host that deploy.yml migrated from the legacy unit.

One container for the whole module, the runs in this order (each is recorded in the fixture
with what the host looked like before and after it; the tests then read those records):

    deploy                  migrate the legacy unit (what test_migrate_legacy_unit.py checks)
    rollback, no backup     the backup moved away: fails with its message and changes nothing
    rollback --check --diff reports what it would do and changes nothing
    rollback                the legacy unit is back, the new one stopped and disabled
    rollback again          changed=0
    deploy again            migrated again; the backup is re-made identical, nothing else new

That a further deploy reports changed=0 is what test_migrate_legacy_unit.py's
test_second_deploy_changes_nothing proves for the same end state; here the second deploy's
changed tasks are pinned instead, which shows the end state is that one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.systemd.conftest import LOGS, Timings
from tests.systemd.container import Container
from tests.systemd.trading_host import (
    BACKUP_DIR,
    BOT_USER,
    BUNDLE,
    LEGACY_DROPIN_PATH,
    LEGACY_DROPIN_TEXT,
    LEGACY_UNIT,
    LEGACY_UNIT_PATH,
    LEGACY_UNIT_TEXT,
    NEW_UNIT,
    TOKEN_FILE,
    PlaybookRun,
    TradingHost,
    prepare_trading_host,
    run_playbook,
)

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

LOG_DIR = LOGS / "rollback"
LOG_FILE = f"{BUNDLE}/logs/token_refresh_sender.log"
LEFTOVER_LOG_LINE = "[2026-01-02 03:04:05] INFO: a line of the original sender, run as root\n"
ROLLBACK = "playbooks/rollback.yml"
MOVED_BACKUP = "/var/backups/moved-away"
UNIT_PROPS = ("LoadState", "ActiveState", "SubState", "UnitFileState", "DropInPaths",
              "FragmentPath", "Environment")


def snapshot(c: Container) -> Dict[str, Any]:
    """What a rollback may change, and what it must not."""
    def content(path: str) -> Optional[str]:
        return c.read(path) if c.exists(path) else None

    return {
        "legacy": c.show(LEGACY_UNIT, *UNIT_PROPS),
        "new": c.show(NEW_UNIT, *UNIT_PROPS),
        "legacy_unit_file": content(LEGACY_UNIT_PATH),
        "legacy_dropin": content(LEGACY_DROPIN_PATH),
        "legacy_modes": c.sh(f"stat -c '%U:%G %a' {LEGACY_UNIT_PATH} {LEGACY_DROPIN_PATH} "
                             "2>/dev/null || true").split("\n"),
        "token_file": hashlib.sha256(c.read(TOKEN_FILE).encode()).hexdigest(),
        "token_stat": c.sh(f"stat -c '%U:%G %a %i %Y' {TOKEN_FILE}").strip(),
        "backup": c.sh(f"cd {BACKUP_DIR} 2>/dev/null && find . -type f -exec sha256sum {{}} + "
                       "| sort || true"),
        "legacy_processes": c.sh("pgrep -f '[t]oken_refresh_service[.]py' || true").split(),
        "leftovers": c.sh(f"stat -c '%U:%G %a' {LOG_FILE} {TOKEN_FILE}.lock").split("\n")[:2],
    }


def stopped_at(c: Container, unit: str) -> float:
    """When systemd last stopped a unit (a stopped, disabled unit is unloaded with its
    timestamps: the journal keeps the time)."""
    out = c.run(["journalctl", "-u", unit, "-o", "short-unix", "--no-pager"]).stdout
    stops = [line for line in out.splitlines() if f"Stopped {unit}" in line]
    return float(stops[-1].split()[0]) if stops else 0.0


@dataclass
class Rollback:
    host: TradingHost
    runs: Dict[str, PlaybookRun]
    before: Dict[str, Dict[str, Any]]
    after: Dict[str, Dict[str, Any]]
    times: Dict[str, float]


@pytest.fixture(scope="module")
def rolled(rootfs: Any, role_vars: Dict[str, Any], timings: Timings) -> Iterator[Rollback]:
    start = time.monotonic()
    with Container(rootfs, "trs-rollback", LOG_DIR) as container:
        host = prepare_trading_host(container, legacy="unit")
        # Left by the original sender run as root (same log file name) and a --once as root.
        container.write(LOG_FILE, LEFTOVER_LOG_LINE, "0644", "root:root")
        container.write(f"{TOKEN_FILE}.lock", "", "0600", "root:root")
        timings.record("rollback: boot + prepare", time.monotonic() - start)
        runs: Dict[str, PlaybookRun] = {}
        before: Dict[str, Dict[str, Any]] = {}
        after: Dict[str, Dict[str, Any]] = {}
        times: Dict[str, float] = {}

        def play(name: str, *args: str, playbook: str = ROLLBACK) -> PlaybookRun:
            before[name] = snapshot(container)
            times[f"{name} started"] = time.time()
            run = run_playbook(container, LOG_DIR, name, *args, extra_vars=role_vars,
                               playbook=playbook)
            times[f"{name} ended"] = time.time()
            after[name] = snapshot(container)
            runs[name] = run
            timings.record(f"rollback: {name}", run.seconds)
            return run

        deploy = play("deploy", playbook="playbooks/deploy.yml")
        assert deploy.returncode == 0, deploy.output[-6000:]

        container.run(["mv", BACKUP_DIR, MOVED_BACKUP])
        play("rollback-no-backup")
        container.run(["mv", MOVED_BACKUP, BACKUP_DIR])

        play("rollback-check", "--check", "--diff")
        rollback = play("rollback")
        assert rollback.returncode == 0, rollback.output[-6000:]
        times["legacy started"] = container.timestamp(LEGACY_UNIT, "ExecMainStartTimestamp")
        times["new stopped"] = stopped_at(container, NEW_UNIT)
        # The legacy stand-in delivers at start-up: wait for it before the next run.
        deadline = time.monotonic() + 10
        while not records_since(host, times["legacy started"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        play("rollback-again")

        redeploy = play("deploy-again", playbook="playbooks/deploy.yml")
        assert redeploy.returncode == 0, redeploy.output[-6000:]
        times["new started again"] = container.timestamp(NEW_UNIT, "ExecMainStartTimestamp")
        yield Rollback(host, runs, before, after, times)
    timings.record("rollback: whole module", time.monotonic() - start)


def records_since(host: TradingHost, t: float) -> List[Dict[str, Any]]:
    return [r for r in host.bot_records() if r["t"] >= t - 1]


def test_deploy_gives_a_root_owned_log_and_lock_file_to_the_service_user(
    rolled: Rollback,
) -> None:
    """Without this the unit fails at start: 'cannot open log file ...: Permission denied'."""
    bot = f"{BOT_USER}:{BOT_USER}"
    assert rolled.before["deploy"]["leftovers"] == ["root:root 644", "root:root 600"]
    assert rolled.after["deploy"]["leftovers"] == [f"{bot} 640", f"{bot} 600"]
    log = rolled.host.container.read(LOG_FILE)
    assert log.startswith(LEFTOVER_LOG_LINE) and "delivered access token" in log


# -- no backup ------------------------------------------------------------------------------


def test_rollback_without_a_backup_fails_with_its_message_and_changes_nothing(
    rolled: Rollback,
) -> None:
    run = rolled.runs["rollback-no-backup"]
    assert run.returncode != 0 and run.failed == 1, run.output[-4000:]
    assert run.changed == 0, run.changed_tasks()
    assert "Nothing was changed: there is no backup of token-refresh-service.service" in run.output
    assert "MIGRATION.md" in run.output
    before, after = rolled.before["rollback-no-backup"], rolled.after["rollback-no-backup"]
    assert after == before
    assert after["new"]["ActiveState"] == "active" and after["new"]["UnitFileState"] == "enabled"
    assert after["legacy"]["LoadState"] == "not-found"


# -- check mode -----------------------------------------------------------------------------


def test_check_mode_reports_the_rollback_and_changes_nothing(rolled: Rollback) -> None:
    run = rolled.runs["rollback-check"]
    assert run.returncode == 0 and run.failed == 0, run.output[-6000:]
    assert run.changed > 0
    changed = run.changed_tasks()
    assert "token_refresh_sender : Stop and disable token-refresh-sender" in changed, changed
    assert rolled.after["rollback-check"] == rolled.before["rollback-check"]


# -- the rollback ---------------------------------------------------------------------------


def test_rollback_restores_the_legacy_unit_and_drop_in_byte_identical(rolled: Rollback) -> None:
    run = rolled.runs["rollback"]
    assert run.failed == 0 and run.changed > 0, run.output[-6000:]
    state = rolled.after["rollback"]
    assert state["legacy_unit_file"] == LEGACY_UNIT_TEXT
    assert state["legacy_dropin"] == LEGACY_DROPIN_TEXT
    assert state["legacy_modes"][:2] == ["root:root 644", "root:root 644"]
    legacy = state["legacy"]
    assert legacy["LoadState"] == "loaded" and legacy["FragmentPath"] == LEGACY_UNIT_PATH
    assert LEGACY_DROPIN_PATH in legacy["DropInPaths"].split()
    assert "LEGACY_DROPIN=1" in legacy["Environment"].split()  # the drop-in is in effect


def test_legacy_unit_is_enabled_and_running_again(rolled: Rollback) -> None:
    legacy = rolled.after["rollback"]["legacy"]
    assert legacy["ActiveState"] == "active" and legacy["SubState"] == "running", legacy
    assert legacy["UnitFileState"] == "enabled"
    assert rolled.after["rollback"]["legacy_processes"], "no legacy process runs"


def test_new_unit_is_stopped_and_disabled(rolled: Rollback) -> None:
    new = rolled.after["rollback"]["new"]
    assert new["ActiveState"] == "inactive" and new["UnitFileState"] == "disabled", new


def test_token_file_and_backup_are_left_alone(rolled: Rollback) -> None:
    before, after = rolled.before["rollback"], rolled.after["rollback"]
    assert after["token_file"] == before["token_file"]
    assert after["token_stat"] == before["token_stat"]
    assert after["token_stat"].startswith(f"{BOT_USER}:{BOT_USER} 600 ")
    assert after["backup"] == before["backup"] and after["backup"]
    token = rolled.host.token_file()
    assert token["creation_timestamp"] == rolled.host.token_at_start["creation_timestamp"]
    assert token["token"]["expires_at"] - 300 > time.time()


def test_the_legacy_unit_delivered_right_after_the_new_one_stopped(rolled: Rollback) -> None:
    times = rolled.times
    assert times["rollback started"] < times["new stopped"] <= times["legacy started"] + 1
    # Stop and start are consecutive tasks: the legacy unit starts within seconds.
    assert times["legacy started"] - times["new stopped"] < 5, times
    first = records_since(rolled.host, times["legacy started"])
    assert first and first[0]["t"] - times["legacy started"] < 5, first


def test_rollback_again_changes_nothing(rolled: Rollback) -> None:
    run = rolled.runs["rollback-again"]
    assert run.returncode == 0 and run.failed == 0, run.output[-6000:]
    assert run.changed == 0, run.changed_tasks()
    before, after = rolled.before["rollback-again"], rolled.after["rollback-again"]
    for key in ("legacy_unit_file", "legacy_dropin", "legacy_modes", "token_file", "backup"):
        assert after[key] == before[key], key
    assert after["legacy"]["ActiveState"] == "active"
    assert after["legacy"]["UnitFileState"] == "enabled"


# -- deploy again ---------------------------------------------------------------------------


def test_deploy_again_migrates_again(rolled: Rollback) -> None:
    run = rolled.runs["deploy-again"]
    assert run.failed == 0, run.output[-6000:]
    state = rolled.after["deploy-again"]
    assert state["new"]["ActiveState"] == "active" and state["new"]["UnitFileState"] == "enabled"
    assert state["legacy"]["LoadState"] == "not-found"
    assert state["legacy_unit_file"] is None and state["legacy_dropin"] is None
    assert state["legacy_processes"] == []
    # The backup was made again from the restored files: identical.
    assert state["backup"] == rolled.after["deploy"]["backup"]
    first = records_since(rolled.host, rolled.times["new started again"])
    assert first and first[0]["t"] - rolled.times["new started again"] < 5, first


def test_deploy_again_changes_only_what_the_migration_changes(rolled: Rollback) -> None:
    changed = set(rolled.runs["deploy-again"].changed_tasks())
    migration = {
        "token_refresh_sender : Stop and disable the legacy unit",
        "token_refresh_sender : Enable and start token-refresh-sender",
        "token_refresh_sender : Remove the legacy unit file and its drop-ins",
    }
    # reset-failed reports a change only when systemd still had the removed unit loaded.
    assert migration <= changed <= migration | {
        "token_refresh_sender : Forget the legacy unit's failed state"}, changed


def test_the_bot_never_held_an_expired_token(rolled: Rollback) -> None:
    """From the legacy unit's first delivery, through deploy, rollback and deploy, until now."""
    records = rolled.host.bot_records()
    assert records[0]["t"] < rolled.times["deploy started"]
    for t in [r["t"] for r in records] + [time.time()]:
        held = [r for r in records if r["t"] <= t][-1]
        assert held["payload"]["expires_at"] - 300 > t, (t, held)
