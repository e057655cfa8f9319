"""Benchmark of the token refresh sender (issue 6): what it costs and how fast the bot is served.

    .venv/bin/python -m tests.bench.bench_sender [--quick] [--json FILE] [--only 1,3,7]

Prints one table: every figure with its median and spread over repeated runs (n, min, p95,
max), the target and whether it is met. ``--json`` writes the same data (with the raw samples
and the machine). ``--quick`` runs a few iterations of everything (CI: it only has to keep
working); the default runs the counts the issue asks for and takes about 12 minutes. The exit
code is 0 when every figure could be measured, whatever the targets say (shared machines are
noisy; the figures are for a human to read), and 1 when a measurement itself failed.

Everything runs on loopback against the fakes of tests/fakes: FakeSchwab (the token endpoint,
over HTTPS with a trustme CA where TLS matters) and FakeBot (the C++ receiver, byte for byte),
both as threads of this process. The sender runs as a real subprocess,
``sys.executable scripts/token_refresh_sender.py`` with explicit --app-config, --token-file,
--config, --socket, --token-url, --log-file and --state-file pointing into a temporary bundle
under /tmp, and the built-in default settings (an empty settings file), except item 7, which
runs the daemon in-process with a driven clock. How each figure is measured:

1. Bot restart -> token delivered. The sender runs idle with a valid token; the fake bot stops
   (unlinking its socket, like the C++ bot) and starts again after 50 ms (unlink, bind, listen:
   a new inode). Measured from just before the bot's bind to the bot's recv() of a message it
   accepts (FakeBot's receive time; both clocks are this process's time.time()). Each delivery
   is also checked to be valid for the bot (expires_at - 300 s in the future).
2. Bot down, then up. The same, but the bot stays away for several seconds (the first time it
   has never been up since the sender started), so the sender has been idle in select().
3. Idle cost. Sender started with a token valid for 30 minutes (the next refresh is 20 minutes
   away, after the window), the bot up, NOTIFY_SOCKET pointing at a datagram socket this script
   binds (a thread timestamps every WATCHDOG=1). The senders start first and settle while items
   5, 1 and 2 run (at least 11 s: uv's two idle worker threads end 10 s after it starts); then,
   for each window: voluntary context switches per thread from
   /proc/PID/task/*/status (a sleeping thread that wakes and sleeps again adds one; a thread
   that ends in the window counts one), CPU per thread from /proc/PID/task/*/schedstat (ns,
   sum_exec_runtime) and, for reference,
   utime+stime from /proc/PID/stat (10 ms ticks: too coarse to resolve 1 s/day from a 60 s
   window, which is why schedstat decides). Per-day figures = window figure x 86400 / window.
   Configurations, all measured in the same windows: python without WATCHDOG_USEC; python
   with WATCHDOG_USEC (the role's WatchdogSec=120 s: one ping every 60 s); the uv wrapper with
   WATCHDOG_USEC (the unit's real process tree: uv plus its python child, summed); and, report
   only, python with the socket directly in /tmp as in production (the sender watches the
   socket's folder with inotify, so other programs' files in /tmp wake it). "Besides watchdog
   pings" subtracts the WATCHDOG=1 datagrams received in the window. Wake-up targets are
   judged on the worst window, CPU on the worst window too.
4. Memory. VmRSS from /proc/PID/status: after start (item 5's python runs, 0.3 s after the bot
   got the token), and during refresh runs against a fake endpoint issuing 2-second tokens over
   HTTPS (the daemon refreshes at half-life: about once a second), 0.3 s after each delivery;
   growth = RSS after cycle 100 - RSS after cycle 10. Also USS (Private_Clean + Private_Dirty
   from /proc/PID/smaps_rollup: what the host would get back) and the RSS of uv itself in the
   wrapper.
5. Start-up. A valid token on disk, the bot up: from just before Popen (fork+exec) to the bot's
   receive time. python directly (sys.executable, the dev venv's CPython) and through
   scripts/run_token_sender.sh with UV=.venv/bin/uv, UV_OFFLINE=1 UV_PYTHON_DOWNLOADS=never
   UV_NO_CONFIG=1 as in the unit, after one discarded warm-up run each (warm uv cache and page
   cache).
6. One refresh cycle, from the refresh runs of item 4: from the fake endpoint's request-log time
   (taken after it built the answer, just before sending it) to the bot's receive time of that
   access token. In between: the response read, the token file written and fsynced (file and
   folder), the state file, a log line, the socket checks and the send; the bot's OK follows its
   recv by microseconds (the sender's DEBUG logs carry nothing finer, so they are not used).
   Also per cycle: wake-ups and CPU (utime+stime, all threads) of the sender, TLS included.
7. Freshness over a simulated day. The daemon in-process (tests/sender_module) with freezegun
   and a driven loop (as tests/test_schedule.py) that advances the frozen clock instead of
   sleeping, against the real fakes: 24 h, three bot restarts at random (seeded) times, and
   for the outage variant a 30-minute endpoint outage (HTTP 500) starting at 06:00 plus a
   phase that each run moves through the 20-minute refresh period. A bot restart inside a wait
   wakes the loop at that instant with the socket path changed, as inotify would. Deliveries
   are stamped with the driven time (FakeBot's thread sees the real clock). The bot's
   rule: a token is valid until expires_at - 300 s. Fraction of the day it holds a valid token,
   and the smallest remaining lifetime (expires_at - now) it ever holds.
8. Deploy (ansible-playbook on the real systemd host) is measured by tests/systemd, not here:
   the row shows the wall times that suite last recorded in .cache/systemd-logs/timings.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import trustme

from tests.conftest import APP_KEY, APP_SECRET, REFRESH_TOKEN, Bundle, sender_env
from tests.fakes.bot import FakeBot, Received
from tests.fakes.schwab import FakeSchwab

REPO = Path(__file__).resolve().parents[2]
SENDER = REPO / "scripts" / "token_refresh_sender.py"
WRAPPER = REPO / "scripts" / "run_token_sender.sh"
UV = REPO / ".venv" / "bin" / "uv"
SYSTEMD_TIMINGS = REPO / ".cache" / "systemd-logs" / "timings.json"

DAY = 86400.0
BOT_MARGIN = 300  # the bot treats a token as expired 5 minutes before expires_at
ROLE_WATCHDOG_USEC = 120_000_000  # the role's default WatchdogSec=120
IDLE_SETTLE = 11.0  # seconds between start-up and the first idle window
DELIVERY_TIMEOUT = 10.0  # longer than the default 5 s socket retry delay, so a retry shows
MB = 1e6  # targets are in MB; /proc reports KiB


class BenchError(RuntimeError):
    """A measurement could not be taken (not a missed target)."""


# -- sizes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    restarts: int  # item 1
    down_up: int  # item 2
    down_seconds: float
    idle_windows: int  # item 3
    idle_window_seconds: float
    watchdog_usec: int
    refresh_runs: int  # items 4 and 6
    refresh_cycles: int
    token_lifetime: int
    startups: int  # item 5, per launcher
    days: int  # item 7, per variant


FULL = Sizes(restarts=60, down_up=10, down_seconds=5.0, idle_windows=3, idle_window_seconds=60.0,
             watchdog_usec=ROLE_WATCHDOG_USEC, refresh_runs=3, refresh_cycles=100,
             token_lifetime=2, startups=20, days=12)
QUICK = Sizes(restarts=4, down_up=2, down_seconds=0.3, idle_windows=2, idle_window_seconds=1.5,
              watchdog_usec=1_000_000, refresh_runs=1, refresh_cycles=8, token_lifetime=2,
              startups=3, days=1)


# -- figures ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..1)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


@dataclass
class Figure:
    item: str
    name: str
    unit: str
    samples: List[float]
    target: str = "report"
    met: Optional[bool] = None  # None: reported, no target
    note: str = ""
    rank: int = 1  # order within the item (the table is sorted by item, then rank)

    def stats(self) -> Dict[str, float]:
        s = self.samples
        return {"n": len(s), "median": percentile(s, 0.5), "min": min(s, default=math.nan),
                "p5": percentile(s, 0.05), "p95": percentile(s, 0.95),
                "max": max(s, default=math.nan)}

    def as_json(self) -> Dict[str, Any]:
        data = asdict(self)
        del data["rank"]
        data.update({k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in self.stats().items()})
        return data


def judged(samples: Sequence[float], stat: str, check: Callable[[float], bool]) -> Optional[bool]:
    if not samples:
        return None
    value = {"median": percentile(samples, 0.5), "max": max(samples), "min": min(samples)}[stat]
    return check(value)


def fmt(value: float, unit: str = "") -> str:
    if unit == "%" and math.isfinite(value):
        return f"{value:.3f}"
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or value == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"


def render_table(figures: Sequence[Figure]) -> str:
    header = ["#", "figure", "n", "median", "min", "p95", "max", "unit", "target", "met"]
    rows = [header]
    for f in figures:
        st = f.stats()
        met = "-" if f.met is None else ("yes" if f.met else "NO")
        rows.append([f.item, f.name, str(int(st["n"])), *(fmt(st[k], f.unit) for k in
                     ("median", "min", "p95", "max")), f.unit, f.target, met])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}
    lines = []
    for index, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  [{f.item}] {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- /proc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    voluntary: int = 0  # voluntary context switches: wake-ups
    involuntary: int = 0
    runtime_ns: int = 0  # schedstat sum_exec_runtime
    ticks: int = 0  # utime + stime of the whole process (dead threads included)
    exited: int = 0  # threads that ended between the two snapshots


@dataclass(frozen=True)
class Snapshot:
    """Per-thread counters of some processes: (pid, tid) -> (voluntary, involuntary, ns)."""

    tasks: Dict[Tuple[int, int], Tuple[int, int, int]]
    ticks: int

    def __sub__(self, before: Snapshot) -> Counters:
        """Per-thread deltas; a thread that ended counts one wake-up (its last), since its
        own counters vanish with it; a new thread counts whole."""
        voluntary = involuntary = runtime = 0
        for key, (vol, invol, ns) in self.tasks.items():
            old = before.tasks.get(key, (0, 0, 0))
            voluntary += vol - old[0]
            involuntary += invol - old[1]
            runtime += ns - old[2]
        exited = len(before.tasks.keys() - self.tasks.keys())
        return Counters(voluntary + exited, involuntary, runtime, self.ticks - before.ticks,
                        exited)


def _stat_fields(pid: int) -> List[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from "state" on


def snapshot(pids: Sequence[int]) -> Snapshot:
    tasks: Dict[Tuple[int, int], Tuple[int, int, int]] = {}
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    voluntary = involuntary = 0
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith("voluntary_ctxt_switches:"):
                            voluntary = int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            involuntary = int(line.split()[1])
                    runtime = int((task / "schedstat").read_text().split()[0])
                    tasks[(pid, int(task.name))] = (voluntary, involuntary, runtime)
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return Snapshot(tasks, ticks)


def memory_kib(pid: int) -> Dict[str, int]:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) from /proc/PID/status, and Pss and
    USS (Private_Clean + Private_Dirty) from /proc/PID/smaps_rollup, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(value.split()[0])
    if "VmRSS" not in found:
        raise BenchError(f"no VmRSS for pid {pid}")
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                found["Pss"] = int(value.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                found["USS"] = found.get("USS", 0) + int(value.split()[0])
    return found


def vm_rss_kib(pid: int) -> int:
    return memory_kib(pid)["VmRSS"]


def descendants(pid: int) -> List[int]:
    """Every process below pid (uv's python child), by scanning /proc for parent ids."""
    parents: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
    found: List[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


# -- the sender as a subprocess ---------------------------------------------------------------


class Proc:
    """One sender process (or uv wrapper) in its own session, output to files."""

    def __init__(self, argv: List[str], env: Dict[str, str], cwd: Path, label: str) -> None:
        self.label = label
        self.stdout_path = cwd / f"{label}.stdout"
        self.stderr_path = cwd / f"{label}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> List[int]:
        return [self.pid, *descendants(self.pid)]

    def tail(self) -> str:
        text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        return text[-1500:] or "(no stderr)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group this script created, then wait; SIGKILL if stuck."""
        children = descendants(self.pid) if self.proc.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + timeout
        for child in children:
            while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                if Path(f"/proc/{child}").exists():
                    os.kill(child, signal.SIGKILL)


class Rig:
    """A temporary bundle under /tmp, a FakeSchwab, a FakeBot (not started), and launchers."""

    def __init__(self, name: str, *, tls: bool = False, lifetime: int = 1800,
                 socket_path: Optional[Path] = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"tsb-{name}-", dir="/tmp"))
        self.bundle = Bundle(self.root / "b")
        self.bundle.configs.mkdir(parents=True)
        self.bundle.logs.mkdir()
        self.bundle.write_app_config()
        self.bundle.write_tokens(valid_for=1800)
        settings = ""  # an empty settings file: the built-in defaults
        context = None
        if tls:
            ca = trustme.CA()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            ca_file = self.root / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_file))
            settings = f"ca_file: {ca_file}\n"
        self.bundle.settings.write_text(settings, encoding="utf-8")
        self.socket_path = socket_path or self.root / "bot.sock"
        self.bot = FakeBot(self.socket_path)
        self.schwab = FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, lifetime=lifetime,
                                 ssl_context=context).start()
        self.procs: List[Proc] = []

    def argv(self, wrapper: bool) -> List[str]:
        b = self.bundle
        launcher = [str(WRAPPER)] if wrapper else [sys.executable, str(SENDER)]
        return [*launcher,
                "--app-config", str(b.app_config), "--token-file", str(b.token_file),
                "--config", str(b.settings), "--socket", str(self.socket_path),
                "--token-url", self.schwab.url, "--log-file", str(b.log_file),
                "--state-file", str(b.state_file)]  # fmt: skip

    def start(self, wrapper: bool = False, env: Optional[Dict[str, str]] = None) -> Proc:
        overrides: Dict[str, Optional[str]] = dict(env or {})
        if wrapper:
            overrides.update({"UV": str(UV), "UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never",
                              "UV_NO_CONFIG": "1"})
        proc = Proc(self.argv(wrapper), sender_env(overrides), self.root,
                    f"sender-{len(self.procs)}")
        self.procs.append(proc)
        return proc

    def access_token(self) -> str:
        return str(self.bundle.read_tokens()["token"]["access_token"])

    def log_has(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if text in self.bundle.log_file.read_text(encoding="utf-8", errors="replace"):
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.bot.stop()
        self.schwab.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_delivery(rig: Rig, count: int, proc: Proc, timeout: float = 30.0) -> Received:
    """The count-th payload the bot accepted (1-based), or BenchError with the sender's stderr."""
    if not rig.bot.wait_for(count, timeout):
        raise BenchError(f"the bot got no token #{count} within {timeout:g}s; sender "
                         f"{'running' if proc.proc.poll() is None else 'exited'}:\n{proc.tail()}")
    return rig.bot.received[count - 1]


# -- items 1 and 2: the bot (re)appears -------------------------------------------------------


@dataclass
class Appearances:
    latencies_ms: List[float] = field(default_factory=list)
    missed: int = 0
    invalid: int = 0


def bot_appearances(rig: Rig, times: int, down_seconds: float) -> Appearances:
    """Stop the bot (if up), wait, start it again; time until it holds a valid token."""
    expected = rig.access_token()
    result = Appearances()
    for _ in range(times):
        rig.bot.stop()
        time.sleep(down_seconds)
        count = len(rig.bot.received)
        started = time.time()
        rig.bot.start()
        if not rig.bot.wait_for(count + 1, DELIVERY_TIMEOUT):
            result.missed += 1
            result.latencies_ms.append(DELIVERY_TIMEOUT * 1000)
            continue
        got = rig.bot.received[count]
        result.latencies_ms.append((got.time - started) * 1000)
        if (got.payload["access_token"] != expected
                or got.payload["expires_at"] - BOT_MARGIN <= got.time):
            result.invalid += 1
        time.sleep(0.1)  # let the sender finish its state file and log line
    return result


def appearance_figures(item: str, what: str, result: Appearances) -> List[Figure]:
    samples = result.latencies_ms
    note = f"{result.missed} not delivered within {DELIVERY_TIMEOUT:g}s (counted as " \
           f"{DELIVERY_TIMEOUT:g}s); {result.invalid} invalid for the bot"
    return [
        Figure(item, f"{what}: median", "ms", samples, "median < 50 ms",
               judged(samples, "median", lambda v: v < 50), note),
        Figure(item, f"{what}: worst", "ms", samples, "max < 1 s",
               judged(samples, "max", lambda v: v < 1000)
               and result.missed == 0 and result.invalid == 0),
    ]


def bench_restarts(sz: Sizes) -> List[Figure]:
    progress(f"1: {sz.restarts} bot restarts")
    with Rig("restart") as rig:
        rig.bot.start()
        proc = rig.start()
        wait_delivery(rig, 1, proc)
        time.sleep(0.5)
        result = bot_appearances(rig, sz.restarts, 0.05)
    return appearance_figures("1", "bot restart -> token held", result)


def bench_down_up(sz: Sizes) -> List[Figure]:
    progress(f"2: bot down {sz.down_seconds:g}s then up, {sz.down_up} times")
    with Rig("downup") as rig:
        proc = rig.start()  # the bot has never been up
        if not rig.log_has("bot not running", 30):
            raise BenchError(f"the sender did not start:\n{proc.tail()}")
        result = bot_appearances(rig, sz.down_up, sz.down_seconds)
    return appearance_figures("2", f"bot up after {sz.down_seconds:g}s idle -> token held",
                              result)


# -- item 3: idle cost ------------------------------------------------------------------------


@dataclass
class IdleConfig:
    label: str
    wrapper: bool
    watchdog_usec: Optional[int]
    socket_in_tmp: bool = False
    rig: Optional[Rig] = None
    proc: Optional[Proc] = None
    notify: Optional[socket.socket] = None
    pids: List[int] = field(default_factory=list)
    wakeups: List[float] = field(default_factory=list)  # per day, per window
    extra_wakeups: List[float] = field(default_factory=list)  # besides watchdog pings
    cpu: List[float] = field(default_factory=list)  # s per day (schedstat)
    ticks: int = 0
    exited: int = 0
    pings: int = 0
    seconds: float = 0.0

    ping_times: List[float] = field(default_factory=list)  # monotonic, WATCHDOG=1 received

    def pings_between(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.ping_times) if start < t <= end)


def listen_for_pings(configs: Sequence[IdleConfig], stop: threading.Event) -> None:
    """Receive every datagram on the configs' NOTIFY_SOCKETs; note when WATCHDOG=1 came."""
    by_socket = {cfg.notify: cfg for cfg in configs if cfg.notify is not None}
    while not stop.is_set():
        readable, _, _ = select.select(list(by_socket), [], [], 0.1)
        for sock in readable:
            with contextlib.suppress(BlockingIOError, OSError):
                if b"WATCHDOG=1" in sock.recv(4096).split(b"\n"):
                    by_socket[sock].ping_times.append(time.monotonic())


class IdleBench:
    """Item 3. start() launches the senders, which then settle while other items run (they
    share nothing with them); measure() takes the windows once IDLE_SETTLE has passed."""

    def __init__(self, sz: Sizes, stack: contextlib.ExitStack) -> None:
        self.sz = sz
        self.stack = stack
        wd = sz.watchdog_usec
        self.configs = [
            IdleConfig("python, no watchdog", False, None),
            IdleConfig(f"python, WATCHDOG_USEC={wd // 1_000_000:g}s", False, wd),
            IdleConfig(f"uv wrapper (uv+python), WATCHDOG_USEC={wd // 1_000_000:g}s", True, wd),
            IdleConfig("python, socket directly in /tmp (production layout)", False, None, True),
        ]
        self.started = 0.0

    def start(self) -> None:
        configs, stack = self.configs, self.stack
        progress(f"3: starting {len(configs)} idle senders; they settle while items 1-2 and 5 "
                 "run")
        for index, cfg in enumerate(configs):
            sock_path = (Path(f"/tmp/tsb-{os.getpid()}-{index}.sock") if cfg.socket_in_tmp
                         else None)
            cfg.rig = stack.enter_context(Rig(f"idle{index}", socket_path=sock_path))
            cfg.rig.bot.start()
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            stack.callback(notify.close)
            notify.bind(str(cfg.rig.root / "notify.sock"))
            notify.setblocking(False)
            cfg.notify = notify
            env = {"NOTIFY_SOCKET": str(cfg.rig.root / "notify.sock")}
            if cfg.watchdog_usec:
                env["WATCHDOG_USEC"] = str(cfg.watchdog_usec)
            cfg.proc = cfg.rig.start(cfg.wrapper, env)
        for cfg in configs:
            assert cfg.rig is not None and cfg.proc is not None
            wait_delivery(cfg.rig, 1, cfg.proc)
        self.started = time.monotonic()
        stop = threading.Event()
        listener = threading.Thread(target=listen_for_pings, args=(configs, stop), daemon=True)
        listener.start()
        stack.callback(listener.join)
        stack.callback(stop.set)

    def measure(self) -> List[Figure]:
        configs, sz = self.configs, self.sz
        total = sz.idle_windows * sz.idle_window_seconds
        progress(f"3: idle cost, {sz.idle_windows} windows of {sz.idle_window_seconds:g}s, "
                 f"{len(configs)} configurations at once (~{total:.0f}s)")
        # Let start-up finish: uv's two idle worker threads end 10 s after it starts.
        time.sleep(max(0.0, self.started + IDLE_SETTLE - time.monotonic()))
        for cfg in configs:
            assert cfg.proc is not None
            cfg.pids = cfg.proc.tree()
        for _ in range(sz.idle_windows):
            before: Dict[str, Tuple[Snapshot, float]] = {}
            after: Dict[str, Tuple[Snapshot, float]] = {}
            for cfg in configs:
                before[cfg.label] = (snapshot(cfg.pids), time.monotonic())
            time.sleep(sz.idle_window_seconds)
            for cfg in configs:
                after[cfg.label] = (snapshot(cfg.pids), time.monotonic())
            time.sleep(0.2)  # the listener thread may still be reading the last datagram
            for cfg in configs:
                (old, started), (new, ended) = before[cfg.label], after[cfg.label]
                delta = new - old
                pings = cfg.pings_between(started, ended)
                seconds = ended - started
                per_day = DAY / seconds
                cfg.wakeups.append(delta.voluntary * per_day)
                cfg.extra_wakeups.append((delta.voluntary - pings) * per_day)
                cfg.cpu.append(delta.runtime_ns / 1e9 * per_day)
                cfg.ticks += delta.ticks
                cfg.exited += delta.exited
                cfg.pings += pings
                cfg.seconds += seconds
        for cfg in configs:
            assert cfg.proc is not None
            if cfg.proc.proc.poll() is not None:
                raise BenchError(f"{cfg.label}: the sender exited:\n{cfg.proc.tail()}")
        child_exe = ""
        wrapped = configs[2]
        if len(wrapped.pids) > 1:
            with contextlib.suppress(OSError):
                child_exe = str(Path(f"/proc/{wrapped.pids[-1]}/exe").readlink())
        figures: List[Figure] = []
        for cfg in configs:
            tick_note = (f"{cfg.ticks} CPU ticks (utime+stime, 10 ms) in {cfg.seconds:.0f}s; "
                         f"{cfg.pings} watchdog pings received; wake-ups incl. pings median "
                         f"{fmt(percentile(cfg.wakeups, 0.5))}/day; {cfg.exited} thread(s) ended "
                         "in the windows")
            if cfg.socket_in_tmp:
                figures.append(Figure("3", f"idle wake-ups/day, {cfg.label}", "/day", cfg.wakeups,
                                      note="report only: counts other programs' file activity in "
                                           "/tmp on this machine, which the sender's inotify "
                                           "watch on the socket's folder sees; " + tick_note))
                figures.append(Figure("3", f"idle CPU/day, {cfg.label}", "s/day", cfg.cpu))
                continue
            if cfg.wrapper and child_exe:
                tick_note += f"; uv ran {child_exe}"
            samples = cfg.wakeups if cfg.watchdog_usec is None else cfg.extra_wakeups
            what = "wake-ups" if cfg.watchdog_usec is None else "wake-ups besides watchdog pings"
            figures.append(Figure("3", f"idle {what}/day, {cfg.label}", "/day", samples,
                                  "max = 0", judged(samples, "max", lambda v: v <= 0), tick_note))
            ping_note = ""
            if cfg.watchdog_usec:
                per_ping = sum(cfg.cpu) / len(cfg.cpu) * cfg.seconds / DAY / max(1, cfg.pings)
                ping_note = (f"about {fmt(per_ping * 1000)} ms CPU per watchdog ping: "
                             f"{fmt(per_ping * 1440)} s/day at the role's WatchdogSec=120")
            if cfg.watchdog_usec in (None, ROLE_WATCHDOG_USEC):
                figures.append(Figure("3", f"idle CPU/day, {cfg.label}", "s/day", cfg.cpu,
                                      "max < 1 s/day", judged(cfg.cpu, "max", lambda v: v < 1),
                                      ping_note))
            else:  # --quick pings far more often than the role's WatchdogSec=120 would
                figures.append(Figure("3", f"idle CPU/day, {cfg.label}", "s/day", cfg.cpu,
                                      note=ping_note))
        return figures


# -- items 4 and 6: refresh cycles ------------------------------------------------------------


@dataclass
class RefreshRun:
    rss_kib: Dict[int, int]  # cycle -> VmRSS
    end_memory: Dict[str, int]  # memory_kib() after the last cycle
    latencies_ms: List[float]
    wakeups_per_cycle: float
    cpu_ms_per_cycle: float


def refresh_run(sz: Sizes, index: int) -> RefreshRun:
    with Rig(f"refresh{index}", tls=True, lifetime=sz.token_lifetime) as rig:
        # Valid at start (delivered without a refresh), refreshed about 2 s later; from then
        # on the endpoint's 2-second tokens are refreshed at half-life.
        rig.bundle.write_tokens(valid_for=5, expires_in=6)
        rig.bot.start()
        proc = rig.start()
        wait_delivery(rig, 1, proc)
        rss: Dict[int, int] = {}
        first = last = Snapshot({}, 0)
        for cycle in range(1, sz.refresh_cycles + 1):
            wait_delivery(rig, 1 + cycle, proc, 15.0)
            time.sleep(0.3)  # the cycle's state file and log line
            memory = memory_kib(proc.pid)
            rss[cycle] = memory["VmRSS"]
            if cycle == 1:
                first = snapshot([proc.pid])
            last = snapshot([proc.pid])
            if cycle % 25 == 0:
                progress(f"   run {index + 1}: {cycle} cycles, RSS {rss[cycle] / 1024:.1f} MiB")
        answered: Dict[str, float] = {}
        ok = [r for r in rig.schwab.token_requests if r.status == 200]
        for record, issued in zip(ok, rig.schwab.issued):
            answered[issued.access_token] = record.time
        latencies = [(r.time - answered[r.payload["access_token"]]) * 1000
                     for r in rig.bot.received if r.payload["access_token"] in answered]
        cycles = max(1, sz.refresh_cycles - 1)
        delta = last - first
    cpu_ms = delta.ticks * 1000 / os.sysconf("SC_CLK_TCK") / cycles
    return RefreshRun(rss, memory, latencies, delta.voluntary / cycles, cpu_ms)


def bench_refresh(sz: Sizes, rss_start_kib: List[int]) -> List[Figure]:
    progress(f"4+6: {sz.refresh_runs} run(s) of {sz.refresh_cycles} refresh cycles "
             f"({sz.token_lifetime}s tokens over HTTPS)")
    runs = [refresh_run(sz, i) for i in range(sz.refresh_runs)]
    last = sz.refresh_cycles
    mid = min(10, max(1, last // 2))
    to_mb = 1024 / MB
    start_mb = [k * to_mb for k in rss_start_kib]
    at_mid = [r.rss_kib[mid] * to_mb for r in runs]
    at_end = [r.rss_kib[last] * to_mb for r in runs]
    growth = [(r.rss_kib[last] - r.rss_kib[mid]) for r in runs]
    peak = [max(r.rss_kib.values()) * to_mb for r in runs]
    latencies = [v for r in runs for v in r.latencies_ms]
    wakeups = [r.wakeups_per_cycle for r in runs]
    cpu = [r.cpu_ms_per_cycle for r in runs]
    return [
        Figure("4", "RSS after start (python, token delivered)", "MB", start_mb,
               "max <= 25 MB", judged(start_mb, "max", lambda v: v <= 25),
               "samples from item 5's python start-ups", rank=0),
        Figure("4", f"RSS after refresh cycle {mid}", "MB", at_mid),
        Figure("4", f"RSS after refresh cycle {last}", "MB", at_end, "max <= 25 MB",
               judged(at_end, "max", lambda v: v <= 25),
               f"peak over the run: {fmt(max(peak, default=math.nan))} MB; last run: "
               f"RssAnon {fmt(runs[-1].end_memory.get('RssAnon', 0) * 1024 / MB)} MB, "
               f"RssFile {fmt(runs[-1].end_memory.get('RssFile', 0) * 1024 / MB)} MB"),
        Figure("4", f"private memory (USS) after refresh cycle {last}", "MB",
               [r.end_memory.get("USS", 0) * 1024 / MB for r in runs]),
        Figure("4", f"RSS growth, cycle {mid} -> {last}", "KiB", [float(g) for g in growth],
               "max <= 0 (none)", judged(growth, "max", lambda v: v <= 0)),
        Figure("6", "refresh cycle: endpoint answer -> bot received", "ms", latencies,
               note="token file written + fsynced (file and folder) before the send; "
                    "HTTPS to the fake endpoint"),
        Figure("6", "wake-ups per refresh cycle", "count", wakeups,
               note="voluntary context switches per cycle of the threads alive at the "
                    "samples (plus one per thread that ended: the deadline Timer); TLS "
                    "handshake and inotify events of the sender's own writes included"),
        Figure("6", "CPU per refresh cycle (HTTPS)", "ms", cpu,
               note="utime+stime of all threads over the cycles; x 72 refreshes/day = "
                    f"{fmt(percentile(cpu, 0.5) * 72 / 1000)} s/day (not part of the idle "
                    "target)"),
    ]


# -- item 5: start-up -------------------------------------------------------------------------


def bench_startup(sz: Sizes) -> Tuple[List[Figure], List[int]]:
    progress(f"5: start-up, {sz.startups} runs each, python and uv wrapper")
    samples: Dict[bool, List[float]] = {False: [], True: []}
    rss_python: List[int] = []
    uss_python: List[float] = []
    anon_file: List[Tuple[int, int]] = []
    rss_uv: List[float] = []
    uv_parts: Dict[str, int] = {}
    uv_python = "?"
    with Rig("startup") as rig:
        rig.bot.start()
        for wrapper in (False, True):
            for attempt in range(-1, sz.startups):  # -1: warm-up, discarded
                count = len(rig.bot.received)
                started = time.time()
                proc = rig.start(wrapper)
                got = wait_delivery(rig, count + 1, proc)
                time.sleep(0.3)
                if attempt >= 0:
                    samples[wrapper].append((got.time - started) * 1000)
                    tree = proc.tree()
                    if wrapper:
                        uv_parts = memory_kib(tree[0])
                        with contextlib.suppress(OSError, IndexError):
                            uv_python = str(Path(f"/proc/{tree[-1]}/exe").readlink())
                        rss_uv.append(uv_parts["VmRSS"] * 1024 / MB)
                    else:
                        memory = memory_kib(tree[0])
                        rss_python.append(memory["VmRSS"])
                        uss_python.append(memory.get("USS", 0) * 1024 / MB)
                        anon_file.append((memory.get("RssAnon", 0), memory.get("RssFile", 0)))
                proc.stop()
    python, uv = samples[False], samples[True]
    diff = percentile(uv, 0.5) - percentile(python, 0.5)
    figures = [
        Figure("5", "start-up, python directly: exec -> bot holds token", "ms", python,
               "median < 300 ms", judged(python, "median", lambda v: v < 300),
               f"{sys.executable} (Python {platform.python_version()})"),
        Figure("5", "start-up, uv wrapper (warm cache): exec -> bot holds token", "ms", uv,
               note=f"median difference to python directly: {fmt(diff)} ms: uv's share, plus "
                    f"the interpreter uv chose for the script: {uv_python}"),
        Figure("4", "RSS of the uv parent process (wrapper)", "MB", rss_uv,
               note="uv stays resident as python's parent for the daemon's lifetime; "
                    f"RssAnon {fmt(uv_parts.get('RssAnon', 0) * 1024 / MB)} MB, RssFile "
                    f"{fmt(uv_parts.get('RssFile', 0) * 1024 / MB)} MB", rank=3),
    ]
    if anon_file:
        anon = percentile([a for a, _ in anon_file], 0.5) * 1024 / MB
        mapped = percentile([f for _, f in anon_file], 0.5) * 1024 / MB
        figures.append(Figure("4", "private memory (USS) after start", "MB", uss_python,
                              note=f"RSS = RssAnon {fmt(anon)} MB + RssFile {fmt(mapped)} MB "
                                   "(median); RssFile is the interpreter, shared libraries "
                                   "and mapped files, shared with other processes using them"))
    return figures, rss_python


# -- item 7: a simulated day ------------------------------------------------------------------


@dataclass
class DayLoop:
    """EventLoop stand-in: a wait advances the frozen clock; bot restarts wake it early."""

    frozen: Any
    signals: Any
    end: float
    restarts: List[float]
    outage: Optional[Tuple[float, float]]
    schwab: FakeSchwab
    bot: FakeBot
    restarted_at: List[float] = field(default_factory=list)
    held: List[Tuple[float, int]] = field(default_factory=list)  # (driven time, expires_at)
    waits: int = 0

    def note_deliveries(self) -> None:
        """Stamp what the bot accepted since the last wait with the driven time.

        FakeBot's own receive times come from its thread, which freezegun leaves on the real
        clock; deliveries are synchronous, so they all happened at the current driven instant.
        """
        now = time.time()
        for got in self.bot.received[len(self.held):]:
            self.held.append((now, int(got.payload["expires_at"])))

    def wait(self, timeout: float) -> Set[Path]:
        self.waits += 1
        self.note_deliveries()
        now = time.time()
        changed: Set[Path] = set()
        if self.restarts and self.restarts[0] <= now + timeout:
            at = max(now, self.restarts.pop(0))
            self.frozen.tick(math.ceil((at - now) * 1e6) / 1e6)
            self.bot.restart()
            self.restarted_at.append(time.time())  # the driven instant, as deliveries see it
            changed = {self.bot.path}  # what inotify would report
        else:
            # freezegun keeps microseconds: round up, or a wait of 0.2 us would never end
            self.frozen.tick(math.ceil(timeout * 1e6) / 1e6)
        now = time.time()
        down = self.outage is not None and self.outage[0] <= now < self.outage[1]
        self.schwab.set_default("server_error" if down else "success")
        if now >= self.end or self.waits > 100_000:
            self.signals.stop = True
        return changed


@dataclass
class DayResult:
    fraction: float
    min_remaining: float
    invalid_seconds: float
    recovery_seconds: Optional[float]  # outage end -> bot holds a valid token
    refreshes: int


def bot_freshness(held: List[Tuple[float, int]], restarts: List[float], start: float,
                  end: float) -> Tuple[float, float, float]:
    """(fraction of [start, end) the bot holds a valid token, smallest remaining lifetime
    it ever holds, seconds without a valid token); held: (time, expires_at) deliveries."""
    events: List[Tuple[float, int, Optional[int]]] = [(t, 0, None) for t in restarts]
    events += [(t, 1, expires_at) for t, expires_at in held]
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant: restart, then the delivery
    holding: Optional[int] = None  # expires_at of the token the bot holds
    cursor = start
    valid = 0.0
    smallest = math.inf
    for when, kind, expires_at in [*events, (end, 2, None)]:
        when = min(max(when, start), end)
        if holding is not None:
            valid += max(0.0, min(when, holding - BOT_MARGIN) - cursor)
            smallest = min(smallest, holding - when)
        cursor = when
        if kind == 2:
            break
        holding = expires_at if kind == 1 else None
    span = end - start
    return valid / span, smallest, span - valid


def simulate_day(index: int, runs: int, with_outage: bool, settings_text: str = "") -> DayResult:
    """One driven day; settings_text is the sender's settings file (default: all defaults)."""
    import logging

    from freezegun import freeze_time

    from tests.sender_module import tsr

    logger = logging.getLogger("token_refresh_sender")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL)  # the outage's warnings would flood stderr
    logger.propagate = False
    rng = random.Random(1000 * index + with_outage)
    root = Path(tempfile.mkdtemp(prefix="tsb-day-", dir="/tmp"))
    bundle = Bundle(root / "b")
    bundle.configs.mkdir(parents=True)
    bundle.logs.mkdir()
    bundle.write_app_config()
    bundle.settings.write_text(settings_text, encoding="utf-8")
    schwab = FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN).start()
    bot = FakeBot(root / "bot.sock").start()
    try:
        with freeze_time("2026-12-03 00:00:00") as frozen:
            start = time.time()
            end = start + DAY
            bundle.write_tokens(valid_for=1800)
            outage = None
            if with_outage:
                begin = start + 6 * 3600 + 1200 * index / max(1, runs)  # phase in the period
                outage = (begin, begin + 1800)
            restarts = sorted(start + rng.uniform(600, DAY - 600) for _ in range(3))
            settings = tsr.load_settings(bundle.settings, True, {
                "token_url": schwab.url, "socket_path": str(bot.path), "log_file": "-",
                "state_file": str(bundle.state_file)})
            signals = tsr.Signals()
            sender = tsr.Sender(settings, tsr.load_app_config(bundle.app_config),
                                tsr.TokenStore(bundle.token_file), signals, tsr.Notifier({}),
                                tsr.StateFile(bundle.state_file), rng=rng.uniform)
            loop = DayLoop(frozen, signals, end, list(restarts), outage, schwab, bot)
            tsr.Daemon(sender, loop).run()
            loop.note_deliveries()
        fraction, smallest, invalid = bot_freshness(loop.held, loop.restarted_at, start, end)
        recovery = None
        if outage is not None:
            recovery = next((t - outage[1] for t, expires_at in loop.held
                             if t >= outage[1] and expires_at - BOT_MARGIN > t), math.inf)
        refreshes = sum(1 for r in schwab.token_requests if r.status == 200)
        for fd in (signals.fileno(), signals._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        return DayResult(fraction, smallest, invalid, recovery, refreshes)
    finally:
        bot.stop()
        schwab.stop()
        logger.setLevel(level)
        logger.propagate = propagate
        shutil.rmtree(root, ignore_errors=True)


def bench_day(sz: Sizes) -> List[Figure]:
    progress(f"7: simulated days, {sz.days} without and {sz.days} with a 30-minute outage")
    calm = [simulate_day(i, sz.days, False) for i in range(sz.days)]
    stormy = [simulate_day(i, sz.days, True) for i in range(sz.days)]
    ceiling = 1 - (1800 - (1800 - BOT_MARGIN)) / DAY
    calm_frac = [d.fraction * 100 for d in calm]
    storm_frac = [d.fraction * 100 for d in stormy]
    recovery = [d.recovery_seconds for d in stormy if d.recovery_seconds is not None]
    refreshes = [d.refreshes for d in calm]
    return [
        Figure("7", "bot holds a valid token, 24 h, 3 bot restarts", "%", calm_frac,
               "min = 100 %", judged(calm_frac, "min", lambda v: v >= 100 - 1e-9),
               f"{fmt(percentile(refreshes, 0.5))} refreshes/day; a restart is served at the "
               "same driven instant (real latency: item 1)"),
        Figure("7", "smallest remaining lifetime the bot holds (no outage)", "s",
               [d.min_remaining for d in calm], "report (> 300 s = always valid)"),
        Figure("7", "bot holds a valid token, + 30-min endpoint outage", "%", storm_frac,
               "min = 100 %", judged(storm_frac, "min", lambda v: v >= 100 - 1e-9),
               f"physical ceiling {ceiling * 100:.2f} %: a 1800 s token is valid for the bot "
               "for 1500 s, so a 1800 s outage leaves it >= 300 s without one whatever the "
               "sender does; outage start moved through the 1200 s refresh period"),
        Figure("7", "bot without a valid token (outage day)", "s",
               [d.invalid_seconds for d in stormy], "report (>= 300 s unavoidable)"),
        Figure("7", "outage end -> bot holds a valid token", "s", recovery,
               note="the sender's share: backoff (full jitter, up to backoff_max_seconds=300)"),
        Figure("7", "smallest remaining lifetime the bot holds (outage)", "s",
               [d.min_remaining for d in stormy], "report (< 0: held an expired token)"),
    ]


# -- item 8: deploy (tests/systemd) -----------------------------------------------------------


def deploy_rows() -> List[Figure]:
    """Not measured here: tests/systemd records its own wall times; show the last ones."""
    timings: Dict[str, Any] = {}
    recorded = ""
    with contextlib.suppress(OSError, ValueError):
        timings = json.loads(SYSTEMD_TIMINGS.read_text())
        recorded = time.strftime("%Y-%m-%d %H:%M:%S %Z",
                                 time.localtime(SYSTEMD_TIMINGS.stat().st_mtime))
    rows = [Figure("8", f"deploy: {name} (from tests/systemd)", "s", [float(value)],
                   note=f"not measured here: wall time of ansible-playbook recorded by "
                        f"tests/systemd in {SYSTEMD_TIMINGS.relative_to(REPO)} ({recorded})")
            for name, value in timings.items()
            if "deploy" in name and "check" not in name and isinstance(value, (int, float))]
    return rows or [Figure("8", "deploy: see tests/systemd", "s", [],
                           note="measured by the systemd suite (tests/systemd), not by this "
                                "script; no deploy timings recorded yet")]


# -- main -------------------------------------------------------------------------------------


def machine() -> Dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    uv_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        uv_version = subprocess.run([str(UV), "--version"], capture_output=True, text=True,
                                    timeout=10, check=False).stdout.strip()
    return {"sender": sender_identity(), "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(),
            "cpu_model": model, "python": sys.version.split()[0],
            "python_executable": sys.executable, "kernel": platform.release(),
            "uv": uv_version, "loadavg_start": os.getloadavg()}


def sender_identity() -> str:
    """The sender's git commit, '+modified' when the work tree differs, and its sha256."""
    import hashlib

    digest = hashlib.sha256(SENDER.read_bytes()).hexdigest()[:12]
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(SENDER)],
                                cwd=REPO, capture_output=True, text=True, timeout=10,
                                check=False).stdout.strip() or "?"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(SENDER)],
                               cwd=REPO, capture_output=True, timeout=10, check=False)
        if dirty.returncode == 1:
            commit += "+modified"
    return f"{SENDER.relative_to(REPO)} at {commit}, sha256 {digest}"


ITEMS = ("1", "2", "3", "4", "5", "6", "7", "8")


def run(sz: Sizes, only: Set[str]) -> List[Figure]:
    figures: List[Figure] = []
    rss_start: List[int] = []
    with contextlib.ExitStack() as idle_stack:
        idle = IdleBench(sz, idle_stack) if "3" in only else None
        if idle is not None:
            idle.start()  # settles while items 5, 1 and 2 run
        if only & {"4", "5"}:
            startup, rss_start = bench_startup(sz)
            figures += startup
        if "1" in only:
            figures += bench_restarts(sz)
        if "2" in only:
            figures += bench_down_up(sz)
        if idle is not None:
            figures += idle.measure()
    if only & {"4", "6"}:
        figures += bench_refresh(sz, rss_start)
    if "7" in only:
        figures += bench_day(sz)
    if "8" in only:
        figures += deploy_rows()
    figures = [f for f in figures if f.item in only]
    return sorted(figures, key=lambda f: (int(f.item), f.rank))  # stable sort


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_sender",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few iterations of everything")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the data here")
    parser.add_argument("--only", metavar="ITEMS", default=",".join(ITEMS),
                        help="comma-separated item numbers (default: all)")
    args = parser.parse_args(argv)
    only = {item.strip() for item in args.only.split(",") if item.strip()}
    if not only <= set(ITEMS):
        parser.error(f"--only: items are {', '.join(ITEMS)}")
    sz = QUICK if args.quick else FULL
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so every sender and temp folder is cleaned up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    info = machine()
    began = time.monotonic()
    try:
        figures = run(sz, only)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    info["loadavg_end"] = os.getloadavg()
    if sender_identity() != info["sender"]:
        info["sender_end"] = sender_identity()
        print(f"bench: warning: the sender changed during the run: {info['sender']} -> "
              f"{info['sender_end']}", file=sys.stderr)
    elapsed = time.monotonic() - began
    mode = "quick" if args.quick else "full"
    print(f"token_refresh_sender benchmark ({mode}, {elapsed:.0f}s): {info['nproc']} CPUs "
          f"({info['cpu_model']}), Python {info['python']}, Linux {info['kernel']}, "
          f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}\n"
          f"{info['sender']}")
    print(render_table(figures))
    if args.json is not None:
        data = {"mode": mode, "command": " ".join([Path(sys.executable).name, "-m",
                                                   "tests.bench.bench_sender",
                                                   *(argv if argv is not None else
                                                     sys.argv[1:])]),
                "seconds": round(elapsed, 1), "machine": info, "sizes": asdict(sz),
                "figures": [f.as_json() for f in figures]}
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
