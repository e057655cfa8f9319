"""The fault campaign: kill -9, concurrent writers, a broken network, bad bots, clock jumps, modes.

Every test runs the real sender as a subprocess against the loopback fakes, except two that
run in-process: the clock test, which drives the daemon with a frozen clock (the approach of
test_schedule.py), and the exact byte count of a 1 GiB answer. The long campaigns run fewer
iterations by default; set

    FAULT_ITERATIONS=200    kill -9 iterations (default 40)
    FAULT_BOT_RESTARTS=100  bot restarts in a row (default 100)
    FAULT_SEED=<int>        the random kill moments (default 1)

Each campaign prints one summary line (pytest -s shows it) with the numbers the README's
"Reliability" table quotes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
import trustme
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from tests.conftest import (
    APP_KEY,
    APP_SECRET,
    REFRESH_TOKEN,
    Bundle,
    SecretRegistry,
    Sender,
    SenderDaemon,
    sender_env,
)
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import REDIRECT_TARGET_PATH, FakeSchwab
from tests.sender_module import OffsetClock, tsr

ITERATIONS = int(os.environ.get("FAULT_ITERATIONS", "40"))
BOT_RESTARTS = int(os.environ.get("FAULT_BOT_RESTARTS", "100"))
SEED = int(os.environ.get("FAULT_SEED", "1"))

TOKEN_TEMPS = ".schwab_tokens.json.*.tmp"
STATE_TEMPS = ".token_refresh_sender.state.json.*.tmp"

# Network settings for the endpoint faults: short, so three bounded attempts take seconds.
HTTP_TIMEOUT = 0.5
BACKOFF_MAX = 0.4
NET_SETTINGS: Dict[str, Any] = {
    "http_timeout_seconds": HTTP_TIMEOUT,
    "backoff_initial_seconds": 0.2,
    "backoff_max_seconds": BACKOFF_MAX,
}
# Bot settings for the misbehaving peers.
SOCKET_TIMEOUT = 0.5
BOT_SETTINGS: Dict[str, Any] = {
    "socket_timeout_seconds": SOCKET_TIMEOUT,
    "socket_retries": 1,
    "socket_retry_delay_seconds": 0.5,
}


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def rotating(secret_registry: SecretRegistry) -> Iterator[FakeSchwab]:
    """An endpoint where every refresh kills the refresh token it used (a reuse is a 400)."""
    fake = FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, rotate=True).start()
    try:
        yield fake
    finally:
        fake.stop()
        secret_registry.add_secret(*fake.secret_values())


def temp_files(bundle: Bundle) -> List[Path]:
    """Temporary files an interrupted atomic write can leave (token file and state file)."""
    return sorted([*bundle.configs.glob(TOKEN_TEMPS), *bundle.logs.glob(STATE_TEMPS)])


def refresh_requests(fake: FakeSchwab) -> List[Any]:
    return [r for r in fake.token_requests if r.grant_type == "refresh_token"]


def file_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def popen_sender(
    sender: Sender, *args: str, out: IO[bytes], umask: int = -1
) -> subprocess.Popen[bytes]:
    """The sender as a raw process (to kill -9 it, or to give it a umask)."""
    return subprocess.Popen(
        sender.argv(*args),
        env=sender_env(),
        cwd=sender.workdir,
        stdout=out,
        stderr=out,
        umask=umask,
    )


def start_daemon_with_umask(sender: Sender, umask: int) -> SenderDaemon:
    """Like sender.start(), with the given umask; killed at teardown like the others."""
    out = sender.workdir / f"umask-{umask:03o}-{len(sender.daemons)}.out"
    with out.open("wb") as handle:
        proc = popen_sender(sender, out=handle, umask=umask)
    daemon = SenderDaemon(proc, sender.bundle.log_file, out, out)
    sender.daemons.append(daemon)
    sender.registry.add_path(out)
    return daemon


def run_with_umask(sender: Sender, umask: int, *args: str) -> int:
    out = sender.workdir / f"umask-{umask:03o}-run-{time.monotonic_ns()}.out"
    with out.open("wb") as handle:
        proc = popen_sender(sender, *args, out=handle, umask=umask)
        code = proc.wait(30)
    sender.registry.add_path(out)
    return code


@dataclass
class FileWatcher:
    """Reads the token file in a loop the whole time, as the bot or a dashboard would."""

    path: Path
    reads: int = 0
    partial: List[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def start(self) -> FileWatcher:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                self.partial.append("token file missing")
                continue
            try:
                tsr.parse_token_document(raw, self.path)
            except tsr.SenderError as exc:
                self.partial.append(str(exc)[:120])
            self.reads += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# -- 1. kill -9 at any instant ---------------------------------------------------------------


@dataclass
class KillOutcome:
    kind: str  # "once" or "daemon"
    aim: str  # "uniform" or "response" (aimed at the moment the answer arrives)
    finished: bool  # the run had ended by itself before the kill
    refreshed: int  # refreshes the endpoint completed during the run
    lost: bool  # the endpoint rotated the refresh token but the file kept the spent one
    temps: int  # temporary files present right after the kill
    offset: Optional[float] = None  # aimed kills: kill time minus the answer's send time


def test_kill_9_at_any_instant_leaves_a_valid_file_holding_the_newest_or_the_just_spent_token(
    sender: Sender, bundle: Bundle, rotating: FakeSchwab, bot: FakeBot,
    secret_registry: SecretRegistry,
) -> None:
    """The guarantee under kill -9, with a rotating endpoint (only the newest token works).

    The file is always valid and at most one refresh behind the endpoint: it holds the
    refresh token the endpoint issued last, or -- only when the kill landed after the endpoint
    had rotated the token and before the new file was renamed into place -- the one that
    refresh spent. No client can close that window (the endpoint commits before its answer
    arrives); the test counts how often it happens, checks the next start reports it as a
    rejected refresh token (exit 77) instead of looping, and then plays the new login.
    """
    delay = 0.1
    rotating.set_default("delay", seconds=delay)
    rotating.lifetime = 3  # a daemon refreshes every ~1.5 s
    sender.token_url = rotating.url
    written = bundle.write_tokens(valid_for=-60)
    rng = random.Random(SEED)

    started = time.monotonic()
    calibration = sender.run("--once", "--force")
    full_run = time.monotonic() - started
    assert calibration.returncode == 0, calibration.stderr

    log_path = sender.workdir / "killed-senders.out"
    secret_registry.add_path(log_path)
    watcher = FileWatcher(bundle.token_file).start()
    outcomes: List[KillOutcome] = []
    current = bundle.read_tokens()["token"]["refresh_token"]
    try:
        with log_path.open("ab") as out:
            for i in range(ITERATIONS):
                kind = "daemon" if i % 5 == 4 else "once"
                aim = "response" if kind == "once" and i % 2 == 0 else "uniform"
                requests_before = len(rotating.token_requests)
                issued_before = len(rotating.issued)
                args = ("--once", "--force") if kind == "once" else ()
                proc = popen_sender(sender, *args, out=out)
                offset: Optional[float] = None
                if aim == "response":
                    # Aim at the answer's arrival: the endpoint has already rotated the token.
                    if rotating.wait_for_requests(requests_before + 1, timeout=5):
                        sent_at = time.monotonic() + delay
                        time.sleep(max(0.0, delay + rng.uniform(-0.02, 0.03)))
                        offset = time.monotonic() - sent_at
                else:
                    time.sleep(rng.uniform(0, 2.0 if kind == "daemon" else full_run * 1.6))
                finished = proc.poll() is not None
                proc.kill()
                proc.wait(5)
                if kind == "once" and finished:
                    assert proc.returncode == 0, f"iteration {i}: exit {proc.returncode}"

                raw = bundle.token_bytes()
                token = tsr.parse_token_document(raw, bundle.token_file)  # never partial
                doc = json.loads(raw)
                assert doc["creation_timestamp"] == written["creation_timestamp"]
                assert doc["x_unknown_top_level"] == "kept"
                assert doc["token"]["x_unknown_token_field"] == {"kept": True}

                issued = [t.refresh_token for t in rotating.issued[issued_before:]]
                chain = [current, *issued]
                assert token.refresh_token in chain[-2:], (
                    f"iteration {i} ({kind}, {aim}): the file holds a refresh token more than "
                    f"one refresh behind the endpoint ({len(issued)} refreshes in this run)"
                )
                lost = token.refresh_token != chain[-1]
                temps = temp_files(bundle)
                assert len(temps) <= 1, f"iteration {i}: temporary files pile up: {temps}"
                outcomes.append(KillOutcome(kind, aim, finished, len(issued), lost,
                                            len(temps), offset))
                if lost:
                    # The spent token is dead: the next start must say so, not loop.
                    rejected = sender.run("--once", "--force")
                    assert rejected.returncode == 77, rejected.stderr
                    assert "new login is needed" in rejected.stderr
                    rotating.add_refresh_token(token.refresh_token)  # the human logs in again
                else:
                    assert token.refresh_token in rotating.valid_refresh_tokens
                current = token.refresh_token
    finally:
        watcher.stop()

    final = sender.run("--once", "--force")
    assert final.returncode == 0, final.stderr
    assert temp_files(bundle) == [], "a completed start must remove every leftover"
    latest = rotating.latest
    assert latest is not None and bundle.read_tokens()["token"]["refresh_token"] == (
        latest.refresh_token
    )
    assert watcher.partial == [], f"a reader saw a partial token file: {watcher.partial[:3]}"
    assert watcher.reads > 100

    aimed = [o for o in outcomes if o.offset is not None]
    lost_aimed = [o.offset for o in aimed if o.lost and o.offset is not None]
    kept_aimed = [o.offset for o in aimed if not o.lost and o.offset is not None]
    print(
        f"\nkill -9 campaign: {len(outcomes)} kills "
        f"({sum(o.kind == 'daemon' for o in outcomes)} daemon, "
        f"{len(aimed)} aimed at the answer); "
        f"before any refresh {sum(o.refreshed == 0 for o in outcomes)}, "
        f"after a completed write {sum(o.refreshed > 0 and not o.lost for o in outcomes)}, "
        f"run already over {sum(o.finished for o in outcomes)}, "
        f"temp file left by the kill {sum(o.temps > 0 for o in outcomes)}, "
        f"refresh token spent but not written {sum(o.lost for o in outcomes)} "
        f"({sum(o.lost for o in outcomes if o.aim == 'uniform')} of "
        f"{sum(o.aim == 'uniform' for o in outcomes)} uniform kills) "
        f"(aimed kills: lost up to {max(lost_aimed, default=float('nan')) * 1000:+.1f} ms "
        f"after the answer was sent, kept from "
        f"{min(kept_aimed, default=float('nan')) * 1000:+.1f} ms); "
        f"{watcher.reads} concurrent reads, {len(watcher.partial)} partial"
    )


def test_a_state_file_temporary_left_by_a_crash_is_removed_at_the_next_start(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    stale = bundle.logs / ".token_refresh_sender.state.json.deadbeef.tmp"
    stale.write_text('{"half": ')
    assert sender.run("--once").returncode == 0
    assert temp_files(bundle) == [], "a crash during the state write leaves a file for good"


# -- 2. concurrent writers -------------------------------------------------------------------

# A schwab-py style writer: open(path, "w") and json.dump, in place, no rename; it writes in
# small flushed pieces, so anyone reading without the lock sees the truncated file for a while.
# It holds the sidecar lock for its read-modify-write: schwab-py does not, and then a refresh
# landing between its read and its write is overwritten with the spent refresh token -- a lost
# update no sender can prevent. Only the senders' side is under test here.
IN_PLACE_WRITER = r"""
import fcntl, json, os, sys, time

token_file, lock_file, stop_file = sys.argv[1:4]


class Slow:
    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        self.handle.write(text)
        self.handle.flush()
        time.sleep(0.0005)


count = 0
while not os.path.exists(stop_file):
    lock = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(token_file) as handle:
            doc = json.load(handle)
        count += 1
        doc["x_in_place_rewrites"] = count
        with open(token_file, "w") as handle:
            json.dump(doc, Slow(handle), indent=4)
    finally:
        os.close(lock)
    time.sleep(0.05)
print(count, flush=True)
"""


def bot_holds_the_newest(bot: FakeBot, fake: FakeSchwab) -> bool:
    latest, payloads = fake.latest, bot.payloads
    return bool(payloads) and latest is not None and (
        payloads[-1]["access_token"] == latest.access_token)


def test_a_daemon_manual_runs_and_an_in_place_writer_together_never_lose_or_reuse_a_token(
    sender: Sender, bundle: Bundle, rotating: FakeSchwab, bot: FakeBot, tmp_path: Path,
) -> None:
    rotating.lifetime = 3  # the daemon refreshes every ~1.5 s on its own
    sender.token_url = rotating.url
    written = bundle.write_tokens(valid_for=-60)
    daemon = sender.start()
    stop_file = tmp_path / "stop-writer"
    writer = subprocess.Popen(
        [sys.executable, "-c", IN_PLACE_WRITER, str(bundle.token_file),
         str(bundle.configs / "schwab_tokens.json.lock"), str(stop_file)],
        stdout=subprocess.PIPE, text=True,
    )
    rng = random.Random(SEED)
    manual_codes: List[int] = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            manual_codes.append(sender.run("--once", "--force").returncode)
            time.sleep(rng.uniform(0, 0.4))
    finally:
        stop_file.touch()
        out, _ = writer.communicate(timeout=10)
    rewrites = int(out.strip())

    # The daemon adopts what the others wrote and hands the bot the newest token.
    deadline = time.monotonic() + 5
    while not bot_holds_the_newest(bot, rotating):
        assert time.monotonic() < deadline, "the bot never got the newest token"
        time.sleep(0.02)
    assert daemon.stop() == 0
    latest = rotating.latest
    assert latest is not None

    assert manual_codes and set(manual_codes) == {0}, manual_codes
    requests = refresh_requests(rotating)
    assert [r.status for r in requests] == [200] * len(requests), "a spent token was sent"
    used = [r.token_fingerprint for r in requests]
    assert len(used) == len(set(used)), "the endpoint saw the same refresh token twice"
    assert len(requests) >= len(manual_codes)
    final = bundle.read_tokens()
    assert final["token"]["refresh_token"] == latest.refresh_token
    assert final["token"]["access_token"] == latest.access_token
    assert final["token"]["refresh_token"] in rotating.valid_refresh_tokens
    assert final["x_in_place_rewrites"] == rewrites, "a sender overwrote the writer's field"
    assert final["creation_timestamp"] == written["creation_timestamp"]
    assert rewrites >= 20

    order = {t.access_token: n for n, t in enumerate(rotating.issued)}
    delivered = [order[p["access_token"]] for p in bot.payloads if p["access_token"] in order]
    backwards = sum(1 for a, b in zip(delivered, delivered[1:]) if b < a)
    print(f"\nconcurrent writers: {len(manual_codes)} manual --once runs, "
          f"{len(requests)} refreshes, {rewrites} in-place rewrites, 0 tokens reused, "
          f"{len(bot.payloads)} deliveries ({backwards} delivered after a newer one)")


# -- 4. network faults at the endpoint ------------------------------------------------------


def attempt_gaps(fake: FakeSchwab) -> List[float]:
    times = [r.time for r in fake.token_requests]
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize(
    ("fault", "params", "says"),
    [
        ("reset", {}, "connection reset"),
        ("hang", {}, "did not answer within 0.5s"),
        # A byte every 0.02 s keeps every single read alive (the body takes ~7 s): only a
        # bound on the whole attempt ends it.
        ("slow_drip", {"seconds": 0.02}, "did not answer within 0.5s"),
    ],
    ids=["reset", "hang", "slow_drip"],
)
def test_an_endpoint_fault_ends_each_attempt_within_http_timeout_and_keeps_the_file(
    fault: str, params: Dict[str, Any], says: str,
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot,
) -> None:
    bundle.write_settings(**NET_SETTINGS)
    before = bundle.token_bytes()
    schwab.set_default(fault, **params)
    started = time.monotonic()
    result = sender.run("--once", "--force")
    elapsed = time.monotonic() - started
    assert result.returncode == 75, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert len(schwab.token_requests) == 3
    # Each attempt is bounded as a whole, then a backoff of at most backoff_max_seconds.
    assert max(attempt_gaps(schwab)) <= HTTP_TIMEOUT + BACKOFF_MAX + 0.3
    assert elapsed <= 3 * HTTP_TIMEOUT + 2 * BACKOFF_MAX + 1.5
    assert bundle.token_bytes() == before
    assert temp_files(bundle) == []
    assert bot.received == []


def test_a_refused_connection_is_retried_and_reported_without_touching_the_file(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_settings(**NET_SETTINGS)
    before = bundle.token_bytes()
    schwab.stop()
    started = time.monotonic()
    result = sender.run("--once", "--force")
    assert result.returncode == 75, result.stderr
    assert "connection refused" in result.stderr
    assert result.stderr.count("refresh attempt") == 2  # then the final ERROR
    assert time.monotonic() - started <= 2 * BACKOFF_MAX + 1.5
    assert bundle.token_bytes() == before


def test_a_1_gib_answer_is_cut_after_a_bounded_read(
    schwab: FakeSchwab, bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, to count exactly what the sender pulled out of the connection."""
    import http.client

    schwab.set_default("oversized", size=2**30)
    pulled: List[int] = []
    original = http.client.HTTPResponse.read1

    def counting_read1(self: http.client.HTTPResponse, n: int = -1) -> bytes:
        data = original(self, n)
        pulled.append(len(data))
        return data

    monkeypatch.setattr(http.client.HTTPResponse, "read1", counting_read1)
    settings = tsr.load_settings(bundle.settings, True, {"token_url": schwab.url})
    client = tsr.OAuthClient(settings, tsr.load_app_config(bundle.app_config))
    started = time.monotonic()
    with pytest.raises(tsr.TransientRefreshError, match="more than 256 KiB"):
        client.refresh(REFRESH_TOKEN)
    assert time.monotonic() - started < 2
    assert 256 * 1024 < sum(pulled) <= 256 * 1024 + 64 * 1024


def test_a_daemon_fed_1_gib_answers_keeps_a_small_resident_size(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_settings(**NET_SETTINGS)
    schwab.set_default("oversized", size=2**30)
    daemon = sender.start()
    assert schwab.wait_for_requests(4, timeout=10)
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    assert peak_kib < 64 * 1024, f"peak resident size {peak_kib} KiB after 1 GiB answers"
    assert bot.received == []
    print(f"\n1 GiB answers: 4 attempts, peak RSS {peak_kib / 1024:.1f} MiB")


def test_a_redirect_is_not_followed_so_the_credentials_never_reach_its_target(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot,
    secret_registry: SecretRegistry,
) -> None:
    bundle.write_settings(**NET_SETTINGS)
    before = bundle.token_bytes()
    with FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN) as target:
        schwab.set_default("redirect", location=target.url)
        result = sender.run("--once", "--force")
        secret_registry.add_secret(*target.secret_values())
        assert target.requests == []
    assert result.returncode == 75, result.stderr
    assert "redirects are not followed" in result.stderr
    assert all(r.path != REDIRECT_TARGET_PATH for r in schwab.requests)
    assert bundle.token_bytes() == before
    assert bot.received == []


@dataclass(frozen=True)
class BadCert:
    name: str
    hosts: Tuple[str, ...]
    expired: bool
    trusted: bool  # the CA is given to the sender as ca_file
    reason: str


BAD_CERTS = [
    BadCert("unknown CA", ("127.0.0.1",), expired=False, trusted=False,
            reason="unable to get local issuer certificate"),
    BadCert("other host", ("elsewhere.invalid",), expired=False, trusted=True,
            reason="IP address mismatch"),
    BadCert("expired", ("127.0.0.1",), expired=True, trusted=True,
            reason="certificate has expired"),
]


@pytest.mark.parametrize("bad", BAD_CERTS, ids=[b.name for b in BAD_CERTS])
def test_a_certificate_that_does_not_verify_is_refused_and_the_reason_is_named(
    bad: BadCert, sender: Sender, bundle: Bundle, bot: FakeBot, tmp_path: Path,
    secret_registry: SecretRegistry,
) -> None:
    ca = trustme.CA()
    not_after = datetime.now(timezone.utc) - timedelta(days=1) if bad.expired else None
    not_before = datetime.now(timezone.utc) - timedelta(days=30) if bad.expired else None
    leaf = ca.issue_cert(*bad.hosts, not_before=not_before, not_after=not_after)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    bundle.write_settings(**NET_SETTINGS, ca_file=str(ca_file) if bad.trusted else None)
    before = bundle.token_bytes()
    with FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, ssl_context=context) as fake:
        result = sender.run("--once", "--force", "--token-url", fake.url,
                            env={"SSL_CERT_FILE": None, "SSL_CERT_DIR": None})
        secret_registry.add_secret(*fake.secret_values())
        assert fake.token_requests == [], "credentials were sent over an unverified channel"
    assert result.returncode == 75, result.stderr
    assert "could not be verified" in result.stderr
    assert bad.reason in result.stderr
    assert bundle.token_bytes() == before


@pytest.mark.parametrize("outage", ["refused", "hang", "reset", "server_error"])
def test_the_daemon_recovers_by_itself_when_the_endpoint_comes_back(
    outage: str, sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_settings(**NET_SETTINGS)
    bundle.write_tokens(valid_for=-60)
    if outage == "refused":
        schwab.stop()
    else:
        schwab.set_default(outage)
    daemon = sender.start()
    daemon.wait_for_log("refresh attempt 3 failed", timeout=10)
    pid = daemon.proc.pid
    if outage == "refused":
        schwab.start()
    else:
        schwab.set_default("success")
    back = time.monotonic()
    assert bot.wait_for(1, timeout=HTTP_TIMEOUT + BACKOFF_MAX + 2)
    recovered_in = time.monotonic() - back
    issued = schwab.latest
    assert issued is not None
    assert bot.received[-1].payload["access_token"] == issued.access_token
    assert bundle.read_tokens()["token"]["access_token"] == issued.access_token
    assert daemon.proc.poll() is None and daemon.proc.pid == pid, "recovered without a restart"
    assert daemon.stop() == 0
    assert recovered_in <= HTTP_TIMEOUT + BACKOFF_MAX + 1


# -- 5. the bot ------------------------------------------------------------------------------


def test_a_bot_started_after_a_long_absence_gets_the_newest_token_within_a_second(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    schwab.lifetime = 3  # refreshes every ~1.5 s while the bot is away
    bot.stop()
    daemon = sender.start()
    assert schwab.wait_for_requests(3, timeout=10)
    assert bot.connections == []
    started = time.time()
    bot.start()
    assert bot.wait_for(1, timeout=1.0)
    assert bot.received[0].time - started < 1.0
    recent = {t.access_token for t in schwab.issued[-2:]}
    assert bot.received[0].payload["access_token"] in recent
    assert daemon.stop() == 0


def test_every_one_of_many_bot_restarts_in_a_row_gets_a_token_within_a_second(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1)
    daemon.wait_for_log("(start-up)")
    time.sleep(0.2)  # past the start-up delivery: restarts during it have their own test
    latencies: List[float] = []
    late: List[str] = []
    for restart in range(1, BOT_RESTARTS + 1):
        count = len(bot.received)
        started = time.time()
        bot.restart()
        got = bot.wait_for(count + 1, timeout=1.0)
        latency = bot.received[-1].time - started if got else float("inf")
        if latency >= 1.0:
            # Keep going to count them all: late (a retry got it) or never.
            got = bot.wait_for(count + 1, timeout=6.0)
            late.append(f"restart {restart}: {'late' if got else 'never'}; "
                        + " | ".join(daemon.log_lines()[-2:]))
            continue
        assert bot.received[-1].time >= started
        latencies.append(latency)
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    assert schwab.token_requests == [], "restarts are served from the held token"
    ordered = sorted(latencies) or [float("nan")]
    print(f"\nbot restarts: {len(latencies)}/{BOT_RESTARTS} served within 1 s, latency median "
          f"{ordered[len(ordered) // 2] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms; "
          f"missed {len(late)}")
    assert late == [], f"{len(late)} of {BOT_RESTARTS} restarts missed the second:\n" + (
        "\n".join(late))


class HandOverBot:
    """A one-shot receiver replaced by a new bot while it answers its first message.

    Like a bot that exits as soon as it has its token and is restarted at once: the new
    instance binds the path before the sender has finished with the old one's reply.
    """

    def __init__(self, path: Path, successor: FakeBot) -> None:
        self.path = path
        self.successor = successor
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._sock.settimeout(10)
        try:
            client, _ = self._sock.accept()
        except OSError:
            return
        with client:
            client.recv(4095)
            self.successor.start()  # unlinks this socket and binds a new one at the path
            client.sendall(b"OK")

    def stop(self) -> None:
        self._sock.close()
        self._thread.join(5)


def test_a_bot_restarted_while_the_start_up_delivery_is_answered_still_gets_a_token(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    bot.stop()
    first = HandOverBot(bot.path, successor=bot)
    try:
        daemon = sender.start()
        daemon.wait_for_log("(start-up)")
        assert bot.wait_for(1, timeout=1.0), (
            "the new bot instance never got a token; log:\n"
            + "\n".join(daemon.log_lines()[-3:]))
    finally:
        first.stop()
    assert daemon.stop() == 0


def test_a_bot_restarted_while_a_later_delivery_is_answered_still_gets_a_token(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    """The same hand-over after start-up, to show which path has the gap."""
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1)
    daemon.wait_for_log("(start-up)")
    bot.stop()
    time.sleep(0.1)
    successor = FakeBot(bot.path)
    first = HandOverBot(bot.path, successor=successor)
    try:
        assert successor.wait_for(1, timeout=1.0), "\n".join(daemon.log_lines()[-3:])
    finally:
        first.stop()
        successor.stop()
    assert daemon.stop() == 0


class SlowStartingBot:
    """A receiver that binds, then takes a moment before listen(), like any real server.

    inotify reports the socket at bind(); a connection before listen() is refused.
    """

    def __init__(self, path: Path, gap: float) -> None:
        self.path = path
        self.gap = gap
        self.listening_at = 0.0
        self.received: List[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        self._sock.bind(str(self.path))
        time.sleep(self.gap)
        self._sock.listen(5)
        self.listening_at = time.monotonic()
        self._sock.settimeout(10)
        try:
            client, _ = self._sock.accept()
        except OSError:
            return
        with client:
            self.received.append(client.recv(4095))
            client.sendall(b"OK")

    def stop(self) -> None:
        self._sock.close()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)


def test_a_bot_that_binds_before_it_listens_gets_its_token_within_a_second_of_listening(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.write_settings(socket_retry_delay_seconds=5)  # the default
    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1)
    bot.stop()
    daemon.wait_for_log("(start-up)")
    slow = SlowStartingBot(bot.path, gap=0.2)
    slow.start()
    try:
        deadline = time.monotonic() + 7
        while not slow.received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.received, "the restarted bot never got a token"
        waited = time.monotonic() - slow.listening_at
        assert waited < 1.0, (
            f"the bot got its token {waited:.1f}s after it started listening; log:\n"
            + "\n".join(daemon.log_lines()[-3:]))
    finally:
        slow.stop()
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("mode", "delay", "says"),
    [
        ("never_read", 0.0, "no reply within 0.5s"),
        ("never_reply", 0.0, "no reply within 0.5s"),
        ("garbage", 0.0, "unexpected reply"),
        ("slow", 2.0, "no reply within 0.5s"),
        ("slow", 0.2, "delivered access token"),
    ],
    ids=["never_read", "never_reply", "garbage", "slow_beyond_timeout", "slow_within_timeout"],
)
def test_a_misbehaving_bot_never_holds_up_the_refresh_schedule(
    mode: str, delay: float, says: str,
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, short_dir: Path,
) -> None:
    schwab.lifetime = 3  # the token lifetime drives a refresh every ~1.5 s
    bundle.write_settings(**BOT_SETTINGS)
    bundle.write_tokens(valid_for=-60)
    with FakeBot(short_dir / "bad.sock", mode, delay=delay) as bad:
        daemon = sender.start("--socket", str(bad.path))
        window = 3.0
        time.sleep(window)
        daemon.wait_for_log(says)
        started = time.monotonic()
        assert daemon.stop() == 0
        stopped_in = time.monotonic() - started
        connections = len(bad.connections)
    times = [r.time for r in refresh_requests(schwab)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= 2, f"only {len(times)} refreshes in {window}s"
    assert max(gaps) <= 1.5 + SOCKET_TIMEOUT + 0.4, f"refresh gaps {gaps}"
    assert stopped_in < 1.0
    attempts = BOT_SETTINGS["socket_retries"] + 1
    assert connections <= len(times) * attempts + 1, "the bad peer was hammered"


# -- 6. clock jumps --------------------------------------------------------------------------

DAY = 86400.0
HOUR = 3600.0


@dataclass
class DayLoop:
    """Stands in for EventLoop: a wait advances the frozen clock; wall jumps happen meanwhile."""

    frozen: FrozenDateTimeFactory
    signals: Any
    clock: OffsetClock
    jumps: Dict[float, float]  # seconds since start -> new wall offset
    start: float
    waits: List[float] = field(default_factory=list)

    def wait(self, timeout: float) -> Set[Path]:
        self.waits.append(timeout)
        before = time.monotonic() - self.start
        self.frozen.tick(timeout)
        after = time.monotonic() - self.start
        for at, offset in self.jumps.items():
            if before < at <= after:
                self.clock.offset = offset
        if after >= DAY:
            self.signals.stop = True
        return set()


@pytest.mark.parametrize(
    "jumps",
    [
        {6 * HOUR: HOUR},
        {6 * HOUR: -HOUR},
        {6 * HOUR + 100: HOUR, 12 * HOUR + 700: 0.0, 18 * HOUR + 1100: -HOUR},
    ],
    ids=["forward", "backward", "forward_back_and_backward"],
)
def test_wall_clock_jumps_of_an_hour_neither_stop_refreshes_nor_cause_a_burst_over_a_day(
    jumps: Dict[float, float], bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    with freeze_time("2026-12-03 12:00:00") as frozen:
        bundle.write_tokens(valid_for=-1)
        overrides = {"token_url": schwab.url, "socket_path": str(bot.path), "log_file": "-",
                     "state_file": str(bundle.state_file)}
        loaded = tsr.load_settings(bundle.settings, True, overrides)
        signals = tsr.Signals()
        clock = OffsetClock()
        sender = tsr.Sender(loaded, tsr.load_app_config(bundle.app_config),
                            tsr.TokenStore(bundle.token_file), signals, tsr.Notifier({}),
                            tsr.StateFile(bundle.state_file), rng=lambda a, b: b, clock=clock)
        loop = DayLoop(frozen, signals, clock, jumps, time.monotonic())
        assert tsr.Daemon(sender, loop).run() == 0
    times = [r.time for r in refresh_requests(schwab)]
    assert times, "no refresh at all"
    since_start = [t - times[0] for t in times]
    gaps = [b - a for a, b in zip(since_start, since_start[1:])]
    # 30-minute tokens, 10-minute margin: one refresh every 20 minutes, 72 a day.
    assert 70 <= len(times) <= 74, f"{len(times)} refreshes in a simulated day"
    assert min(gaps) >= 600, f"a burst: refreshes {min(gaps):.0f}s apart"
    assert max(gaps) <= 1500 + 1, f"refreshes stopped for {max(gaps):.0f}s"
    assert len(bot.received) >= len(times), "every refresh reached the bot"
    print(f"\nclock jumps {sorted(jumps.values())}: {len(times)} refreshes in a simulated day, "
          f"gaps {min(gaps):.0f}-{max(gaps):.0f} s")


# -- 11. file modes --------------------------------------------------------------------------


def assert_private_and_not_world_writable(bundle: Bundle, when: str) -> None:
    lock = bundle.configs / "schwab_tokens.json.lock"
    modes = {p.name: file_mode(p) for p in (bundle.token_file, lock, bundle.app_config,
                                            bundle.state_file, bundle.log_file) if p.exists()}
    assert file_mode(bundle.token_file) & 0o077 == 0, f"{when}: token file {modes}"
    assert file_mode(bundle.app_config) == 0o600, f"{when}: app config {modes}"
    assert file_mode(lock) & 0o007 == 0, f"{when}: lock file {modes}"
    assert file_mode(bundle.state_file) & 0o002 == 0, f"{when}: state file {modes}"
    assert file_mode(bundle.log_file) & 0o002 == 0, f"{when}: log file {modes}"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def test_after_every_kind_of_write_secrets_stay_private_and_nothing_is_world_writable(
    umask: int, sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    assert run_with_umask(sender, umask, "--once", "--force") == 0
    assert_private_and_not_world_writable(bundle, "--once refresh")

    bundle.write_tokens(valid_for=1800)
    daemon = start_daemon_with_umask(sender, umask)
    assert bot.wait_for(2)
    assert_private_and_not_world_writable(bundle, "daemon start-up delivery")

    mark = daemon.mark()
    daemon.send_signal(signal.SIGUSR1)
    daemon.wait_for_log("refreshed access token", after=mark)
    assert bot.wait_for(3)
    assert_private_and_not_world_writable(bundle, "daemon refresh")

    # logrotate without copytruncate: the log is moved away and the sender opens a new one.
    bundle.log_file.rename(bundle.log_file.with_suffix(".log.1"))
    schwab.script("invalid_grant")
    daemon.send_signal(signal.SIGUSR1)
    daemon.wait_for_log("rejected the refresh token")
    assert_private_and_not_world_writable(bundle, "rejected refresh after logrotate")
    assert daemon.stop() == 0


def test_a_world_writable_log_or_state_file_is_narrowed_by_the_next_write(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    for path in (bundle.log_file, bundle.state_file):
        path.write_text("")
        path.chmod(0o666)
    assert sender.run("--once", "--force").returncode == 0
    assert_private_and_not_world_writable(bundle, "pre-existing 0666 files")


def test_a_log_folder_the_sender_creates_is_not_world_writable_whatever_the_umask(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    logs = bundle.root / "new-logs"
    code = run_with_umask(sender, 0o000, "--once", "--log-file", str(logs / "sender.log"),
                          "--state-file", str(logs / "sender.state.json"))
    sender.registry.add_path(logs / "sender.log", logs / "sender.state.json")
    assert code == 0
    assert file_mode(logs) & 0o002 == 0, f"log folder created {file_mode(logs):03o}"
    assert file_mode(logs / "sender.log") & 0o002 == 0
    assert file_mode(logs / "sender.state.json") & 0o002 == 0
