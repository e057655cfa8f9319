"""The real script as a daemon subprocess against both fakes: cycles, signals, systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.conftest import ACCESS_TOKEN, REFRESH_TOKEN, Bundle, Sender
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab


def test_daemon_refreshes_over_several_cycles_and_the_bot_gets_each_token(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    schwab.lifetime = 4  # margin is capped at half the lifetime: a refresh every 2 s
    written = bundle.write_tokens(valid_for=-1)
    daemon = sender.start()
    assert bot.wait_for(3, timeout=10)
    assert daemon.stop() == 0
    issued = [i.access_token for i in schwab.issued]
    got = [r.payload["access_token"] for r in bot.received]
    assert got[:3] == issued[:3]
    after = bundle.read_tokens()
    assert after["creation_timestamp"] == written["creation_timestamp"]
    assert after["token"]["access_token"] in issued


def test_valid_token_reaches_the_bot_at_start_without_calling_schwab(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1, timeout=5)
    assert bot.received[0].payload == {"access_token": ACCESS_TOKEN,
                                       "refresh_token": REFRESH_TOKEN,
                                       "expires_at": bundle.read_tokens()["token"]["expires_at"]}
    assert daemon.stop() == 0
    assert schwab.token_requests == []


def test_restarted_bot_gets_the_token_within_a_second_of_its_new_socket(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1, timeout=5)
    for restarts in range(1, 4):
        bot.stop()
        time.sleep(0.1)
        started = time.time()
        bot.start()
        assert bot.wait_for(1 + restarts, timeout=1.0), f"restart {restarts} got no token"
        assert bot.received[-1].time - started < 1.0
    assert daemon.stop() == 0


def test_bot_down_at_start_gets_the_pending_token_when_it_comes_up(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bot.stop()
    daemon = sender.start()
    daemon.wait_for_log("bot not running")
    assert not bot.path.exists()
    bot.start()
    assert bot.wait_for(1, timeout=1.0)
    issued = schwab.latest
    assert issued is not None and bot.received[0].payload["access_token"] == issued.access_token
    assert daemon.stop() == 0


def test_sigterm_during_backoff_exits_zero_within_a_second(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab
) -> None:
    bundle.write_settings(backoff_initial_seconds=60, backoff_max_seconds=60)
    schwab.set_default("server_error")
    daemon = sender.start()
    daemon.wait_for_log("retrying in")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=5) == 0
    assert time.monotonic() - started < 1.0


def test_sigterm_during_a_hanging_request_exits_zero_within_a_second(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab
) -> None:
    bundle.write_settings(http_timeout_seconds=30)
    schwab.set_default("hang")
    daemon = sender.start()
    assert schwab.wait_for_requests(1, timeout=5)
    time.sleep(0.2)
    before = bundle.token_bytes()
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=5) == 0
    assert time.monotonic() - started < 1.0
    assert bundle.token_bytes() == before


def test_sigusr1_refreshes_now(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1)
    assert schwab.token_requests == []
    daemon.send_signal(signal.SIGUSR1)
    assert bot.wait_for(2, timeout=5)
    issued = schwab.latest
    assert issued is not None and bot.received[-1].payload["access_token"] == issued.access_token
    assert daemon.stop() == 0


def test_sighup_reloads_settings_and_keeps_running_on_a_broken_file(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1)
    bundle.write_settings(log_level="DEBUG")
    mark = daemon.mark()
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_log("SIGHUP: reloading", after=mark)
    bundle.settings.write_text("no_such_setting: 1\n")
    mark = daemon.mark()
    daemon.send_signal(signal.SIGHUP)
    line = daemon.wait_for_log("reload failed", after=mark)
    assert "no_such_setting" in line
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_rejected_refresh_token_resumes_when_a_new_login_rewrites_the_file(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=400)
    schwab.revoke_refresh_tokens()
    daemon = sender.start()
    line = daemon.wait_for_log("rejected the refresh token")
    assert "ERROR" in line and "--login" in line
    assert bot.wait_for(1)  # the still-valid access token is delivered meanwhile
    requests = len(schwab.token_requests)
    time.sleep(0.5)
    assert len(schwab.token_requests) == requests, "no retries of a rejected refresh token"
    # A new login elsewhere: new refresh token, new creation_timestamp, written by schwab-py.
    schwab.add_refresh_token("FAKE-RT-AFTER-LOGIN-a1b2c3d4e5f6a7b8")
    sender.registry.add_secret("FAKE-RT-AFTER-LOGIN-a1b2c3d4e5f6a7b8")
    bundle.write_tokens(valid_for=100, age=0, refresh_token="FAKE-RT-AFTER-LOGIN-a1b2c3d4e5f6a7b8")
    daemon.wait_for_log("new login detected")
    assert schwab.wait_for_requests(requests + 1, timeout=5)
    assert bot.wait_for(3, timeout=5)
    issued = schwab.latest
    assert issued is not None and bot.received[-1].payload["access_token"] == issued.access_token
    assert daemon.stop() == 0


def test_stale_temporary_files_from_a_crash_are_removed_at_start(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    stale = bundle.configs / ".schwab_tokens.json.deadbeef.tmp"
    stale.write_text('{"half": ')
    result = sender.run("--once")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert "removed 1 temporary file" in bundle.log_file.read_text()


# -- systemd ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = Path("/tmp") / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink()


def datagrams(sock: socket.socket, until: str, limit: int = 50) -> List[str]:
    got: List[str] = []
    for _ in range(limit):
        got.append(sock.recv(4096).decode())
        if any(until in message for message in got):
            return got
    raise AssertionError(f"no {until!r} in {got}")


def test_systemd_notify_ready_status_watchdog_and_stopping(
    sender: Sender, bundle: Bundle, bot: FakeBot, notify_socket: socket.socket
) -> None:
    bundle.write_tokens(valid_for=1800)
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "200000",
           "WATCHDOG_PID": "1"}  # uv's pid under the wrapper: must not stop the pings
    daemon = sender.start(env=env)
    ready = datagrams(notify_socket, "READY=1")
    assert any("STATUS=" in message for message in ready)
    pings = datagrams(notify_socket, "WATCHDOG=1")
    pings += datagrams(notify_socket, "WATCHDOG=1")
    assert sum("WATCHDOG=1" in m for m in pings) >= 2
    assert daemon.stop() == 0
    assert "STOPPING=1" in "".join(datagrams(notify_socket, "STOPPING=1"))


def test_under_journald_stderr_lines_carry_a_syslog_priority_and_no_timestamp(
    sender: Sender, bundle: Bundle, bot: FakeBot, tmp_path: Path
) -> None:
    bundle.write_tokens(valid_for=1800)
    stderr_path = tmp_path / "journal.stderr"
    with stderr_path.open("wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        import subprocess

        from tests.conftest import sender_env

        proc = subprocess.Popen(sender.argv("--log-file", "-"), stderr=stderr,
                                env=sender_env(env))
        try:
            assert bot.wait_for(1)
            deadline = time.monotonic() + 5
            while "delivered" not in stderr_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
    lines = stderr_path.read_text().splitlines()
    sender.registry.add_path(stderr_path)
    assert lines and all(line.startswith(("<6>", "<4>", "<3>")) for line in lines), lines
    assert any(line.startswith("<6>delivered access token") for line in lines)


# -- read-only modes ----------------------------------------------------------------------


def test_status_shows_expiries_and_last_outcomes(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    assert sender.run("--once").returncode == 0
    before = bundle.token_bytes()
    result = sender.run("--status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "access token" in out and "valid, expires" in out
    assert "refresh token   obtained" in out
    assert "last refresh" in out and ": ok" in out
    assert "last delivery" in out and ": delivered" in out
    assert f"bot socket      {bot.path}: present" in out
    assert bundle.token_bytes() == before


def test_check_reports_all_is_well_and_touches_nothing(
    sender: Sender, bundle: Bundle, bot: FakeBot, schwab: FakeSchwab
) -> None:
    before = bundle.token_bytes()
    result = sender.run("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert f"listener uid {os.geteuid()}" in result.stdout
    assert bundle.token_bytes() == before
    assert schwab.requests == []
    assert bot.received == []
    assert not bundle.log_file.exists()


def test_check_fails_with_77_when_the_refresh_token_has_expired(
    sender: Sender, bundle: Bundle
) -> None:
    bundle.write_tokens(age=8 * 86400)
    result = sender.run("--check")
    assert result.returncode == 77
    assert "FAIL  refresh token expired" in result.stdout


def test_state_file_is_not_world_readable_or_writable(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    assert sender.run("--once").returncode == 0
    assert bundle.state_file.stat().st_mode & 0o007 == 0
    assert bundle.log_file.stat().st_mode & 0o007 == 0
    assert bundle.token_file.stat().st_mode & 0o077 == 0
    state = json.loads(bundle.state_file.read_text())
    assert state["last_delivery"]["outcome"] == "delivered"


def test_the_log_survives_logrotate_moving_it_away(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    daemon.wait_for_log("delivered access token")
    rotated = bundle.logs / "token_refresh_sender.log.1"
    bundle.log_file.rename(rotated)  # what logrotate does (without copytruncate)
    sender.registry.add_path(rotated)
    daemon.send_signal(signal.SIGUSR1)
    daemon.wait_for_log("refreshed access token")  # in the new file at the old path
    assert "refreshed access token" not in rotated.read_text()
    assert daemon.stop() == 0


def test_the_command_line_beats_the_settings_file(
    sender: Sender, bundle: Bundle, bot: FakeBot, short_dir: Path
) -> None:
    decoy = FakeBot(short_dir / "decoy.sock").start()
    try:
        bundle.write_tokens(valid_for=1800)
        bundle.write_settings(socket_path=str(decoy.path))
        result = sender.run("--once")  # the fixture passes --socket bot.path on the command line
        assert result.returncode == 0, result.stderr
        assert len(bot.received) == 1 and decoy.received == []
        status = sender.run("--check")
        assert f"bot socket {bot.path}" in status.stdout
    finally:
        decoy.stop()
