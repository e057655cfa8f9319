"""Delivery to the bot: the real sender as a subprocess against the fake bot and its misdeeds.

The bot's receiver (shared/notes/facts.md section 4) reads one message of at most 4095 bytes,
answers OK, ERROR or nothing, and closes. The sender must hand it the token in one message,
give up on a bot that misbehaves within its timeouts, never talk to anything but a socket
whose listener it trusts, and give a (re)started bot the token within a second.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import pytest

from tests.conftest import ACCESS_TOKEN, REFRESH_TOKEN, Bundle, SecretRegistry
from tests.fakes.bot import FakeBot, read_record
from tests.fakes.schwab import FakeSchwab

RunSender = Callable[..., "subprocess.CompletedProcess[str]"]
StartSender = Callable[..., Any]

EX_UNAVAILABLE = 69
BOT_SCRIPT = Path(__file__).resolve().parent / "fakes" / "bot.py"

# Short socket timings so every misbehaving bot costs a few seconds at most.
SOCKET_TIMEOUT = 1
SOCKET_RETRIES = 2
RETRY_DELAY = 0.2
ATTEMPTS = SOCKET_RETRIES + 1


@pytest.fixture
def fast_socket(bundle: Bundle) -> Dict[str, Any]:
    return bundle.write_settings(
        socket_timeout_seconds=SOCKET_TIMEOUT,
        socket_retries=SOCKET_RETRIES,
        socket_retry_delay_seconds=RETRY_DELAY,
    )


# -- helpers ----------------------------------------------------------------------------------


def log_lines(result: subprocess.CompletedProcess[str], level: str) -> List[str]:
    return [line for line in result.stderr.splitlines() if f" {level}: " in line]


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        assert "Traceback" not in text, f"traceback on {name}:\n{text}"


def compact(payload: Dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def expected_payload(token: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "access_token": token["access_token"],
        "refresh_token": token["refresh_token"],
        "expires_at": token["expires_at"],
    }


@dataclass(frozen=True)
class PathState:
    """What is at a path, precisely enough to tell whether anything touched it."""

    mode: int
    inode: int
    mtime_ns: int
    content: Union[bytes, str, Tuple[str, ...], None]


def path_state(path: Path) -> PathState:
    st = path.lstat()
    content: Union[bytes, str, Tuple[str, ...], None] = None
    if stat.S_ISLNK(st.st_mode):
        content = str(path.readlink())
    elif stat.S_ISDIR(st.st_mode):
        content = tuple(sorted(p.name for p in path.iterdir()))
    elif stat.S_ISREG(st.st_mode):
        content = path.read_bytes()
    return PathState(st.st_mode, st.st_ino, st.st_mtime_ns, content)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a crashed bot leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


# -- the happy path, byte for byte ------------------------------------------------------------


def test_the_bot_gets_exactly_one_compact_message_with_the_three_fields(
    bundle: Bundle, run_sender: RunSender, bot: FakeBot, schwab: FakeSchwab
) -> None:
    written = bundle.write_tokens(valid_for=1800)

    result = run_sender("--once")

    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert bot.wait_for(1, timeout=1)
    [connection] = bot.connections
    assert connection.data == compact(expected_payload(written["token"]))
    assert connection.reply == b"OK"
    assert schwab.token_requests == [], "a valid token must be delivered without a refresh"


# -- misbehaving bots -------------------------------------------------------------------------


@dataclass(frozen=True)
class BotCase:
    id: str
    mode: str
    code: int
    connections: Optional[int]  # exactly this many connections served (None: not checked)
    level: str  # the level of the line that tells the user
    fragment: str
    delay: float = 2.0


BOT_CASES = [
    BotCase("replies-ERROR", "error", EX_UNAVAILABLE, 1, "ERROR", "answered ERROR"),
    BotCase("replies-garbage", "garbage", EX_UNAVAILABLE, 1, "ERROR", "unexpected reply"),
    BotCase(
        "closes-without-a-reply",
        "silent",
        EX_UNAVAILABLE,
        ATTEMPTS,
        "WARNING",
        f"delivery attempt {ATTEMPTS} of {ATTEMPTS}",
    ),
    BotCase(
        "closes-at-once-unread",
        "close",
        EX_UNAVAILABLE,
        ATTEMPTS,
        "WARNING",
        f"delivery attempt {ATTEMPTS} of {ATTEMPTS}",
    ),
    # These hold the connection open forever: only the sender's own timeouts end the run.
    BotCase(
        "never-reads", "never_read", EX_UNAVAILABLE, None, "WARNING", f"within {SOCKET_TIMEOUT}s"
    ),
    BotCase(
        "never-replies", "never_reply", EX_UNAVAILABLE, None, "WARNING", f"within {SOCKET_TIMEOUT}s"
    ),
]


@pytest.mark.parametrize("case", BOT_CASES, ids=[c.id for c in BOT_CASES])
def test_a_misbehaving_bot_ends_the_run_within_the_socket_timeouts_with_the_documented_code(
    case: BotCase,
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    run_sender: RunSender,
    bot: FakeBot,
) -> None:
    bundle.write_tokens(valid_for=1800)
    before = bundle.token_bytes()
    bot.mode = case.mode
    bot.delay = case.delay
    # Every attempt ends by its timeout at worst; the retries are spaced by the delay.
    bound = ATTEMPTS * SOCKET_TIMEOUT + SOCKET_RETRIES * RETRY_DELAY + 3

    started = time.monotonic()
    result = run_sender("--once", timeout=bound + 10)
    elapsed = time.monotonic() - started

    assert_no_traceback(result)
    assert result.returncode == case.code, result.stderr
    assert elapsed < bound, f"--once took {elapsed:.1f}s against a {case.mode} bot"
    lines = log_lines(result, case.level)
    assert any(case.fragment in line for line in lines), result.stderr
    if case.level == "WARNING":  # retried, then one ERROR saying the bot never took it
        warnings = log_lines(result, "WARNING")
        assert len(warnings) == ATTEMPTS, f"expected {ATTEMPTS} attempts:\n{result.stderr}"
        errors = log_lines(result, "ERROR")
        assert len(errors) == 1 and f"after {ATTEMPTS} attempts" in errors[0], result.stderr
    else:
        assert len(lines) == 1, result.stderr
    if case.connections is not None:
        assert len(bot.connections) == case.connections, bot.connections
    assert bot.received == [], "the fake must not have accepted anything"
    assert bundle.token_bytes() == before


def test_a_slow_bot_that_answers_within_the_timeout_gets_the_token(
    bundle: Bundle, fast_socket: Dict[str, Any], run_sender: RunSender, bot: FakeBot
) -> None:
    written = bundle.write_tokens(valid_for=1800)
    bot.mode = "slow"
    bot.delay = SOCKET_TIMEOUT / 2

    result = run_sender("--once")

    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert log_lines(result, "WARNING") == [] and log_lines(result, "ERROR") == []
    assert bot.payloads == [expected_payload(written["token"])]
    assert len(bot.connections) == 1


def test_a_bot_that_is_not_running_is_not_an_error_and_the_token_file_is_still_written(
    bundle: Bundle, fast_socket: Dict[str, Any], run_sender: RunSender, bot: FakeBot
) -> None:
    before = bundle.read_tokens()
    bot.stop()
    assert not bot.path.exists()

    started = time.monotonic()
    result = run_sender("--once")
    elapsed = time.monotonic() - started

    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert log_lines(result, "ERROR") == []
    assert any("not running" in line for line in log_lines(result, "INFO")), result.stderr
    after = bundle.read_tokens()
    assert after["token"]["access_token"] != before["token"]["access_token"], "not refreshed"
    assert after["creation_timestamp"] == before["creation_timestamp"]
    assert not bot.path.exists(), "the sender must not create anything at the socket path"
    assert elapsed < 1 + RETRY_DELAY + 2, "a missing socket must not be retried"


def test_a_stale_socket_with_no_listener_is_retried_then_exits_69_and_left_in_place(
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    run_sender: RunSender,
    short_dir: Path,
) -> None:
    bundle.write_tokens(valid_for=1800)
    path = short_dir / "stale.sock"
    stale_socket(path)
    before = path_state(path)

    result = run_sender("--once", "--socket", str(path))

    assert_no_traceback(result)
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    warnings = log_lines(result, "WARNING")
    assert len(warnings) == ATTEMPTS, result.stderr
    assert all("refused" in line for line in warnings), result.stderr
    assert path_state(path) == before


# -- what is at the socket path ---------------------------------------------------------------


def _regular_file(path: Path, bot: FakeBot) -> None:
    path.write_text("planted by someone else\n", encoding="utf-8")


def _directory(path: Path, bot: FakeBot) -> None:
    path.mkdir()
    (path / "inside").write_text("x", encoding="utf-8")


def _symlink_to_the_bot(path: Path, bot: FakeBot) -> None:
    path.symlink_to(bot.path)


def _fifo(path: Path, bot: FakeBot) -> None:
    os.mkfifo(path)


SECURITY_CASES = [
    pytest.param(_regular_file, "a regular file", id="a-regular-file"),
    pytest.param(_directory, "a directory", id="a-directory"),
    pytest.param(_symlink_to_the_bot, "a symbolic link", id="a-symlink-to-the-real-bot-socket"),
    pytest.param(_fifo, "not a socket", id="a-fifo"),
]


@pytest.mark.parametrize(("plant", "found"), SECURITY_CASES)
def test_something_other_than_a_socket_at_the_path_gets_nothing_and_is_left_untouched(
    plant: Callable[[Path, FakeBot], None],
    found: str,
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    run_sender: RunSender,
    bot: FakeBot,
    short_dir: Path,
) -> None:
    before_tokens = bundle.read_tokens()
    path = short_dir / "planted.sock"
    plant(path, bot)
    before = path_state(path)

    result = run_sender("--once", "--socket", str(path))

    assert_no_traceback(result)
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    errors = log_lines(result, "ERROR")
    assert len(errors) == 1, result.stderr
    assert "security" in errors[0]
    assert str(path) in errors[0]
    assert found in errors[0]
    assert bot.connections == [], "the real bot behind the path must get nothing"
    assert path_state(path) == before, "the path was modified"
    after = bundle.read_tokens()
    assert after["token"]["access_token"] != before_tokens["token"]["access_token"], (
        "the refreshed token must still be written when delivery is refused"
    )


# -- a listener running as another user ------------------------------------------------------


@dataclass
class ForeignBot:
    """The fake bot run as another user, in a folder that user owns."""

    proc: subprocess.Popen[bytes]
    path: Path
    record: Path
    uid: int
    name: str

    def payloads(self) -> List[Dict[str, Any]]:
        if not self.record.exists():
            return []
        return [r.payload for r in read_record(self.record)]


def _python_for_others() -> Optional[str]:
    """A python3 another user can run (the venv's may live under root's private home)."""
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


@pytest.fixture
def foreign_bot() -> Iterator[ForeignBot]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a listener as another user")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this host")
    python = _python_for_others()
    if python is None:
        pytest.skip("no system python3 for the other user")
    folder = Path(tempfile.mkdtemp(prefix="tb-peer-", dir="/tmp"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    path, record = folder / "bot.sock", folder / "received.jsonl"
    proc = subprocess.Popen(
        [python, str(BOT_SCRIPT), "--socket", str(path), "--record", str(record)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else b""
        if b"listening" not in line:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            pytest.fail(f"the listener as nobody did not start: {err.decode(errors='replace')}")
        assert path.lstat().st_uid == user.pw_uid
        yield ForeignBot(proc, path, record, user.pw_uid, user.pw_name)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_listener_running_as_another_user_gets_nothing_and_the_error_names_its_uid(
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    run_sender: RunSender,
    foreign_bot: ForeignBot,
) -> None:
    bundle.write_tokens(valid_for=1800)
    before = path_state(foreign_bot.path)

    result = run_sender("--once", "--socket", str(foreign_bot.path))

    assert_no_traceback(result)
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    errors = log_lines(result, "ERROR")
    assert len(errors) == 1, result.stderr
    assert "security" in errors[0]
    assert f"uid {foreign_bot.uid}" in errors[0]
    assert foreign_bot.name in errors[0]
    time.sleep(0.2)  # the listener would record a payload at once; give it the chance
    assert foreign_bot.payloads() == [], "the token was handed to an untrusted listener"
    assert path_state(foreign_bot.path) == before


@pytest.mark.parametrize("allowed", ["nobody", 65534], ids=["by-name", "by-uid"])
def test_a_listener_running_as_an_allowed_peer_user_gets_the_token(
    allowed: Union[str, int],
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    run_sender: RunSender,
    foreign_bot: ForeignBot,
) -> None:
    if isinstance(allowed, int) and allowed != foreign_bot.uid:
        pytest.skip("nobody's uid is not 65534 here")
    written = bundle.write_tokens(valid_for=1800)
    bundle.write_settings(
        socket_timeout_seconds=SOCKET_TIMEOUT,
        socket_retries=SOCKET_RETRIES,
        socket_retry_delay_seconds=RETRY_DELAY,
        allowed_peer_users=[allowed],
    )

    result = run_sender("--once", "--socket", str(foreign_bot.path))

    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert log_lines(result, "ERROR") == []
    deadline = time.monotonic() + 2
    while not foreign_bot.payloads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert foreign_bot.payloads() == [expected_payload(written["token"])]


# -- the 4 KiB limit of the bot's single recv -------------------------------------------------


def _access_token_for_payload_size(size: int, expires_at: int) -> str:
    """A distinctive fake access token that makes the bot's message exactly `size` bytes."""
    head = "FAKE-AT-BIG-"
    fixed = compact(
        {"access_token": head, "refresh_token": REFRESH_TOKEN, "expires_at": expires_at}
    )
    pad = size - len(fixed)
    token = head + secrets.token_hex(pad // 2 + 1)[:pad]
    assert len(compact({"access_token": token, "refresh_token": REFRESH_TOKEN,
                        "expires_at": expires_at})) == size  # fmt: skip
    return token


@pytest.mark.parametrize(
    ("size", "sent"),
    [(4095, True), (4096, False), (20000, False)],
    ids=["4095-bytes-fits-the-bots-read", "4096-bytes-refused", "20000-bytes-refused"],
)
def test_a_message_the_bots_single_read_cannot_hold_is_never_sent(
    size: int,
    sent: bool,
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    run_sender: RunSender,
    bot: FakeBot,
    secret_registry: SecretRegistry,
) -> None:
    expires_at = int(time.time()) + 1800
    big = _access_token_for_payload_size(size, expires_at)
    secret_registry.add_secret(big)
    bundle.write_tokens(valid_for=1800, access_token=big, expires_at=expires_at)
    before = bundle.token_bytes()

    result = run_sender("--once")

    assert_no_traceback(result)
    assert bundle.token_bytes() == before
    if sent:
        assert result.returncode == 0, result.stderr
        assert bot.wait_for(1, timeout=1)
        assert bot.payloads[0]["access_token"] == big
        return
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    errors = log_lines(result, "ERROR")
    assert len(errors) == 1, result.stderr
    assert str(size) in errors[0]
    assert "not sent" in errors[0]
    assert bot.connections == [], "a truncated message must never reach the bot"


# -- the bot (re)starting while the daemon runs -----------------------------------------------


def test_a_restarted_bot_gets_the_token_within_a_second_of_its_new_socket_appearing(
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    start_sender: StartSender,
    bot: FakeBot,
    schwab: FakeSchwab,
) -> None:
    written = bundle.write_tokens(valid_for=1800)
    daemon = start_sender()
    assert bot.wait_for(1, timeout=5), "\n".join(daemon.log_lines())

    for restart in range(1, 4):
        time.sleep(0.3)  # the daemon is idle: only the new socket can wake it
        appeared = time.time()
        bot.restart()
        assert bot.wait_for(1 + restart, timeout=3), f"restart {restart}: no token\n" + "\n".join(
            daemon.log_lines()[-10:]
        )
        latency = bot.received[restart].time - appeared
        assert latency < 1.0, f"restart {restart}: token arrived after {latency:.2f}s"

    assert [r.payload for r in bot.received] == [expected_payload(written["token"])] * 4
    assert schwab.token_requests == [], "the held token is delivered, not a refreshed one"
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_a_bot_restarting_just_as_the_start_up_delivery_ends_still_gets_the_token(
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    start_sender: StartSender,
    bot: FakeBot,
) -> None:
    """The old bot takes the start-up token, then a new bot binds the path before it closes.

    The same happens when the bot and the sender start together at boot: whatever socket the
    sender saw while delivering, a socket that appears afterwards is a new bot that needs the
    token.
    """
    written = bundle.write_tokens(valid_for=1800)
    bot.stop()
    successor = FakeBot(bot.path)
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(bot.path))
    old.listen(1)
    appeared: List[float] = []

    def old_bot_takes_the_token_then_restarts() -> None:
        conn, _ = old.accept()
        with conn:
            conn.recv(4095)
            conn.sendall(b"OK")
            old.close()
            successor.start()  # unlink + bind + listen: a new socket at the same path
            appeared.append(time.time())
            time.sleep(0.1)

    thread = threading.Thread(target=old_bot_takes_the_token_then_restarts, daemon=True)
    thread.start()
    try:
        daemon = start_sender()
        thread.join(timeout=5)
        assert appeared, "the sender never delivered at start-up"
        assert successor.wait_for(1, timeout=3), "the new bot never got the token\n" + "\n".join(
            daemon.log_lines()[-10:]
        )
        latency = successor.received[0].time - appeared[0]
        assert latency < 1.0, f"the token arrived {latency:.2f}s after the new socket appeared"
        assert successor.payloads == [expected_payload(written["token"])]
    finally:
        successor.stop()
        old.close()


def test_a_bot_that_is_down_when_the_daemon_starts_gets_the_token_within_a_second_of_starting(
    bundle: Bundle,
    fast_socket: Dict[str, Any],
    start_sender: StartSender,
    bot: FakeBot,
    schwab: FakeSchwab,
) -> None:
    written = bundle.write_tokens(valid_for=1800)
    bot.stop()
    daemon = start_sender()
    daemon.wait_for_log("not running", timeout=5)
    time.sleep(0.3)  # the daemon is idle now: only the socket appearing can wake it

    started = time.time()
    bot.start()

    assert bot.wait_for(1, timeout=3), "\n".join(daemon.log_lines()[-10:])
    latency = bot.received[0].time - started
    assert latency < 1.0, f"the token arrived {latency:.2f}s after the bot started"
    assert bot.payloads == [expected_payload(written["token"])]
    assert bot.payloads[0]["access_token"] == ACCESS_TOKEN
    assert schwab.token_requests == []
    assert daemon.stop() == 0


def test_other_files_in_the_sockets_folder_do_not_wake_the_sender_but_a_new_socket_does(
    bot: FakeBot, tmp_path: Path
) -> None:
    import select

    from tests.sender_module import tsr

    configs = tmp_path / "configs"
    configs.mkdir()
    watcher = tsr.PathWatcher([configs / "tokens.json"], socket_path=bot.path)
    try:
        assert watcher.fd is not None

        def woken(timeout: float = 0.2) -> bool:
            return bool(select.select([watcher.fd], [], [], timeout)[0])

        for n in range(20):  # /tmp is busy with other programs' files
            (bot.path.parent / f"noise-{n}").write_text("x")
            (bot.path.parent / f"noise-{n}").unlink()
        assert not woken(), "another program's file woke the sender"
        bot.stop()
        assert woken() and watcher.changes() == {bot.path}
        bot.start()
        assert woken() and bot.path in watcher.changes()
        (configs / "tokens.json").write_text("{}")
        assert woken() and watcher.changes() == {configs / "tokens.json"}
    finally:
        watcher.close()
