"""Shared fixtures: the two loopback fakes, a bundle folder, and the sender as a subprocess.

    schwab         a running FakeSchwab that knows REFRESH_TOKEN (plain HTTP on 127.0.0.1)
    tls_schwab     the same over HTTPS with a CA made by trustme (.ca_file for `ca_file:`)
    bot            a running FakeBot on a short socket path
    bundle         a tmp folder laid out like the bundle (configs/, logs/), secrets mode 0600
    sender         runs scripts/token_refresh_sender.py against the three above:
                   sender.run(*args) -> CompletedProcess, sender.start(*args) -> SenderDaemon
    run_sender     = sender.run;  start_sender = sender.start
    secret_registry   session-wide: every secret used, every output produced; a test marked
                   @pytest.mark.secret_scan runs last and checks registry.findings() == []

Every secret value below is fake and distinctive, so the secret scan can search for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Pattern, Set, Tuple, Union

import pytest
import trustme
import yaml

from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab

REPO = Path(__file__).resolve().parent.parent
SENDER = REPO / "scripts" / "token_refresh_sender.py"

APP_KEY = "FAKE-APP-KEY-q7Zr2Lw9Xb4Mn8Kd1Vt6"
APP_SECRET = "FAKE-APP-SECRET-h3Jy8Qe5Wc2Rp7"
APP_NAME = "fake-bundle-test-app"
CALLBACK_URL = "https://127.0.0.1:8182"
REFRESH_TOKEN = "FAKE-RT-INITIAL-4f9c2e7a1b8d3f60"
ACCESS_TOKEN = "FAKE-AT-INITIAL-9e1d5c3b7a2f8e40"
ID_TOKEN = "FAKE-ID-INITIAL-2b6f8d4a9c1e7f30"
SECRETS = (APP_KEY, APP_SECRET, REFRESH_TOKEN, ACCESS_TOKEN, ID_TOKEN)

# Short timings so failure paths run in a second or two. Integers only: every value is one
# the sender must accept (see notes/contract.md); tests override with write_settings().
TEST_SETTINGS: Dict[str, Any] = {
    "http_timeout_seconds": 5,
    "socket_timeout_seconds": 2,
    "socket_retries": 2,
    "socket_retry_delay_seconds": 1,
    "backoff_initial_seconds": 1,
    "backoff_max_seconds": 2,
}

# Variables that would switch the sender into systemd or journal mode when pytest itself
# runs under systemd; tests that want them pass them explicitly.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID")

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


# -- the secret scan ------------------------------------------------------------------------


@dataclass
class SecretRegistry:
    """Secrets used anywhere in the session, and every output that must not contain them."""

    secrets: Set[str] = field(default_factory=set)
    paths: List[Path] = field(default_factory=list)
    texts: List[Tuple[str, str]] = field(default_factory=list)  # (label, text)

    def add_secret(self, *values: str) -> None:
        self.secrets.update(v for v in values if v)

    def add_path(self, *paths: Path) -> None:
        self.paths.extend(paths)

    def add_text(self, label: str, text: Union[str, bytes, None]) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text:
            self.texts.append((label, text))

    def needles(self) -> Set[str]:
        """Each secret, and its random tail alone: a truncated token is still a leak."""
        out = set(self.secrets)
        for value in self.secrets:
            tail = value.rsplit("-", 1)[-1]
            if len(tail) >= 12:
                out.add(tail)
        return out

    def findings(self) -> List[str]:
        """'<where>: <secret>' for every secret found in a registered output."""
        needles = sorted(self.needles())
        sources = list(self.texts)
        for path in self.paths:
            if path.is_file():
                sources.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
        return [f"{label}: {n}" for label, text in sources for n in needles if n in text]


_REGISTRY = SecretRegistry(secrets=set(SECRETS))


@pytest.fixture(scope="session")
def secret_registry() -> SecretRegistry:
    return _REGISTRY


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "secret_scan: scans every registered output for secrets; runs last"
    )


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    # The scan must see every other test's output, whatever file it lives in.
    items.sort(key=lambda item: item.get_closest_marker("secret_scan") is not None)


# -- the fakes ------------------------------------------------------------------------------


@pytest.fixture
def schwab(secret_registry: SecretRegistry) -> Iterator[FakeSchwab]:
    fake = FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN).start()
    try:
        yield fake
    finally:
        fake.stop()
        secret_registry.add_secret(*fake.secret_values())


@dataclass(frozen=True)
class TlsEndpoint:
    fake: FakeSchwab
    ca_file: Path  # PEM of the CA that signed the fake's certificate

    @property
    def url(self) -> str:
        return self.fake.url


@pytest.fixture
def tls_schwab(tmp_path: Path, secret_registry: SecretRegistry) -> Iterator[TlsEndpoint]:
    ca = trustme.CA()
    server_context = _server_context(ca)
    ca_file = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fake = FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, ssl_context=server_context).start()
    try:
        yield TlsEndpoint(fake, ca_file)
    finally:
        fake.stop()
        secret_registry.add_secret(*fake.secret_values())


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for Unix sockets: tmp_path itself when its paths fit in sun_path."""
    if len(str(tmp_path / "bot.sock").encode()) <= UNIX_PATH_MAX:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bot(short_dir: Path) -> Iterator[FakeBot]:
    fake = FakeBot(short_dir / "bot.sock").start()
    try:
        yield fake
    finally:
        fake.stop()


# -- the bundle -----------------------------------------------------------------------------


@dataclass
class Bundle:
    """A folder laid out like the deployed bundle, with fake secrets."""

    root: Path

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def app_config(self) -> Path:
        return self.configs / "schwab_app_config.yaml"

    @property
    def token_file(self) -> Path:
        return self.configs / "schwab_tokens.json"

    @property
    def settings(self) -> Path:
        return self.configs / "token_refresh_sender.yaml"

    @property
    def log_file(self) -> Path:
        return self.logs / "token_refresh_sender.log"

    @property
    def state_file(self) -> Path:
        return self.logs / "token_refresh_sender.state.json"

    def write_app_config(self, **overrides: Any) -> Dict[str, Any]:
        """Write the app config (mode 0600); a value of None drops that key."""
        config: Dict[str, Any] = {
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "app_name": APP_NAME,
            "callback_url": CALLBACK_URL,
        }
        _merge(config, overrides)
        _write_private(self.app_config, yaml.safe_dump(config, sort_keys=False))
        return config

    def write_tokens(
        self,
        *,
        valid_for: float = -60,
        age: float = 86400,
        **token_overrides: Any,
    ) -> Dict[str, Any]:
        """Write a schwab-py token file (mode 0600) and return what was written.

        valid_for: seconds until the access token's expires_at (default: expired a minute
        ago, so the sender must refresh); age: seconds since creation_timestamp (the login).
        token_overrides replace fields inside "token"; None drops the field.
        """
        now = int(time.time())
        token: Dict[str, Any] = {
            "access_token": ACCESS_TOKEN,
            "refresh_token": REFRESH_TOKEN,
            "id_token": ID_TOKEN,
            "token_type": "Bearer",
            "scope": "api",
            "expires_in": 1800,
            "expires_at": now + int(valid_for),
            "x_unknown_token_field": {"kept": True},  # must survive every rewrite
        }
        _merge(token, token_overrides)
        data = {
            "creation_timestamp": now - int(age),
            "token": token,
            "x_unknown_top_level": "kept",  # must survive every rewrite too
        }
        self.write_token_text(json.dumps(data, indent=4))
        return data

    def write_token_text(self, text: Union[str, bytes]) -> None:
        """Write raw token-file content (for malformed-file tables), mode 0600."""
        _write_private(self.token_file, text)

    def read_tokens(self) -> Dict[str, Any]:
        result: Dict[str, Any] = json.loads(self.token_file.read_text(encoding="utf-8"))
        return result

    def token_bytes(self) -> bytes:
        """The token file's exact bytes, to assert that a failure left it unchanged."""
        return self.token_file.read_bytes()

    def write_settings(self, **settings: Any) -> Dict[str, Any]:
        """Write the sender's settings file: TEST_SETTINGS plus these (None drops a key)."""
        merged = dict(TEST_SETTINGS)
        _merge(merged, settings)
        self.settings.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
        return merged

    def read_state(self) -> Dict[str, Any]:
        result: Dict[str, Any] = json.loads(self.state_file.read_text(encoding="utf-8"))
        return result

    def install_sender(self) -> Path:
        """Copy the sender into <bundle>/scripts/, for tests of the bundle-relative defaults."""
        scripts = self.root / "scripts"
        scripts.mkdir(exist_ok=True)
        return Path(shutil.copy2(SENDER, scripts / SENDER.name))


def _merge(target: Dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value


def _write_private(path: Path, text: Union[str, bytes]) -> None:
    data = text.encode() if isinstance(text, str) else text
    # Created 0600 from the start: the secret is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


@pytest.fixture
def bundle(tmp_path: Path, secret_registry: SecretRegistry) -> Iterator[Bundle]:
    b = Bundle(tmp_path / "bundle")
    b.configs.mkdir(parents=True)
    b.logs.mkdir()
    b.write_app_config()
    b.write_tokens()
    b.write_settings()
    try:
        yield b
    finally:
        secret_registry.add_path(b.log_file, b.state_file)


# -- the sender as a subprocess -------------------------------------------------------------

EnvOverrides = Optional[Mapping[str, Optional[str]]]


def sender_env(env: EnvOverrides = None) -> Dict[str, str]:
    """os.environ without systemd's variables, then `env` (a None value removes a variable)."""
    result = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
    result["PYTHONDONTWRITEBYTECODE"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


@dataclass
class SenderDaemon:
    """The sender running in the background; its output goes to files, never to a pipe."""

    proc: subprocess.Popen[bytes]
    log_file: Path
    stdout_file: Path
    stderr_file: Path

    def log_lines(self) -> List[str]:
        if not self.log_file.is_file():
            return []
        return self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()

    def stderr_text(self) -> str:
        return self.stderr_file.read_text(encoding="utf-8", errors="replace")

    def mark(self) -> int:
        """The current number of log lines: pass as `after` to wait only for newer lines."""
        return len(self.log_lines())

    def wait_for_log(
        self, pattern: Union[str, Pattern[str]], timeout: float = 5.0, after: int = 0
    ) -> str:
        """The first log line (from index `after`) containing `pattern` (str or regex)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines()[after:]:
                if _matches(pattern, line):
                    return line
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        log_tail = "\n".join(self.log_lines()[-20:])
        raise AssertionError(
            f"no log line matching {pattern!r} within {timeout}s (sender {state})\n"
            f"--- log tail ---\n{log_tail}\n--- stderr tail ---\n{self.stderr_text()[-2000:]}"
        )

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Send `signum` and wait for the exit code (killing it after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def wait(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)


def _matches(pattern: Union[str, Pattern[str]], line: str) -> bool:
    if isinstance(pattern, str):
        return pattern in line
    return pattern.search(line) is not None


@dataclass
class Sender:
    """Runs the real sender script with every path pointing into the bundle and the fakes."""

    bundle: Bundle
    token_url: str
    socket_path: Path
    registry: SecretRegistry
    workdir: Path
    daemons: List[SenderDaemon] = field(default_factory=list)
    _runs: int = 0

    def argv(self, *args: str) -> List[str]:
        """The full command; later options win in argparse, so `args` can override any path."""
        b = self.bundle
        return [
            sys.executable,
            str(SENDER),
            "--app-config", str(b.app_config),
            "--token-file", str(b.token_file),
            "--config", str(b.settings),
            "--log-file", str(b.log_file),
            "--state-file", str(b.state_file),
            "--socket", str(self.socket_path),
            "--token-url", self.token_url,
            *args,
        ]  # fmt: skip

    def run(
        self, *args: str, env: EnvOverrides = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion (e.g. --once, --check, --status); output captured as text."""
        result = subprocess.run(
            self.argv(*args),
            env=sender_env(env),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        label = f"sender {' '.join(args)}"
        self.registry.add_text(f"{label} stdout", result.stdout)
        self.registry.add_text(f"{label} stderr", result.stderr)
        return result

    def start(self, *args: str, env: EnvOverrides = None) -> SenderDaemon:
        """Start as a daemon; use wait_for_log() to know when it got somewhere."""
        self._runs += 1
        out = self.workdir / f"sender-{self._runs}.stdout"
        err = self.workdir / f"sender-{self._runs}.stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                self.argv(*args),
                env=sender_env(env),
                cwd=self.workdir,
                stdout=stdout,
                stderr=stderr,
            )
        daemon = SenderDaemon(proc, self.bundle.log_file, out, err)
        self.daemons.append(daemon)
        self.registry.add_path(out, err)
        return daemon

    def cleanup(self) -> None:
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


@pytest.fixture
def sender(
    bundle: Bundle,
    schwab: FakeSchwab,
    bot: FakeBot,
    tmp_path: Path,
    secret_registry: SecretRegistry,
) -> Iterator[Sender]:
    workdir = tmp_path / "cwd"  # not the bundle: default paths must not depend on the cwd
    workdir.mkdir()
    s = Sender(bundle, schwab.url, bot.path, secret_registry, workdir)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def run_sender(sender: Sender) -> Any:
    """run_sender(*args, env=None, timeout=30.0) -> CompletedProcess[str]."""
    return sender.run


@pytest.fixture
def start_sender(sender: Sender) -> Any:
    """start_sender(*args, env=None) -> SenderDaemon (killed at teardown if still running)."""
    return sender.start
