"""Bad input at every door, fuzzed with hypothesis: token file, app config, settings, answers.

For every generated input the sender may only (a) accept it, if it is valid, or (b) refuse it
with one of its own SenderError classes and an exit code from the documented set; never a
traceback, and never a write to the token file unless the input was a valid success.

Each door is fuzzed twice: in-process (hundreds of examples, fast) through the functions the
sender itself uses -- the parser or loader, then --status, --check and one daemon step over
whatever was accepted -- and end to end (a dozen examples) with the real script as a
subprocess. A small oracle written from the specification (issue 2, facts.md) says which
inputs are valid, invalid, or implausible enough that either outcome is fine.

Runs are reproducible: derandomize=True, no example database. FUZZ_SCALE=<n> multiplies the
number of examples (default 1). Known-bad inputs are pinned with @example and run first; while
one fails, hypothesis generates nothing more: FUZZ_EXPLICIT=0 skips them, to see what the
generated examples find beyond them.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import math
import os
import select
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    APP_KEY,
    APP_SECRET,
    REFRESH_TOKEN,
    Bundle,
    SecretRegistry,
    Sender,
)
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab
from tests.sender_module import tsr

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
NOW = int(time.time())  # one "now" per run: strategies must not depend on the clock
DOCUMENTED_EXIT_CODES = {0, 64, 65, 66, 69, 73, 75, 77, 78}

_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
if os.environ.get("FUZZ_EXPLICIT", "1") == "0":
    _PHASES.remove(Phase.explicit)
_BASE = settings(
    phases=_PHASES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)
IN_PROCESS = settings(_BASE, max_examples=100 * SCALE)
END_TO_END = settings(_BASE, max_examples=10 * SCALE)


class Verdict(enum.Enum):
    VALID = "valid"  # the sender must accept it
    INVALID = "invalid"  # the sender must refuse it with a SenderError
    EITHER = "either"  # implausible but well-formed: accept or refuse, never crash


def worst(*verdicts: Verdict) -> Verdict:
    if Verdict.INVALID in verdicts:
        return Verdict.INVALID
    if Verdict.EITHER in verdicts:
        return Verdict.EITHER
    return Verdict.VALID


def has_surrogate(value: Any) -> bool:
    """A lone surrogate: legal in JSON escapes and YAML, impossible to encode as UTF-8."""
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    return False


# Unix times Python can show as a date (year 1 to 9999); the sender prints expiries as dates.
MIN_TIME, MAX_TIME = -62135596800, 253402300799


def odd_text(*values: Any) -> bool:
    """A string no OAuth token or app credential has (they are printable ASCII): the
    specification does not say, so the sender may refuse it or take it."""
    return any(isinstance(v, str) and not (v.isascii() and v.isprintable()) for v in values)


def plausible_time(value: float) -> bool:
    return math.isfinite(value) and MIN_TIME < value < MAX_TIME


def reject_constant(name: str) -> Any:
    raise ValueError(name)


# -- JSON building blocks -------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON literal written as is, e.g. 1e400 (a float overflow Python reads as inf)."""

    text: str


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {to_json(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


def from_json_text(text: str) -> Any:
    return json.loads(text, parse_constant=reject_constant)


NASTY_NUMBERS = ["1e400", "-1e400", "1e12", "-1e12", "1e300", "100000000000000000000000",
                 "-0", "0.5", "253402300800", "-62135596801", "1.0"]
NASTY_STRINGS = ["", " ", "\ud800", "a\x00b", "\u202e", "é", "x" * 4100, "null", "0"]
KEYS = st.sampled_from(["token", "access_token", "refresh_token", "expires_at", "x", ""])

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(NASTY_NUMBERS).map(Raw),
    st.sampled_from(NASTY_STRINGS),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)


def distinctive(kind: str) -> st.SearchStrategy[str]:
    """A fake token the secret scan can look for: FAKE-<kind>-FUZZ-x<16 hex>."""
    # "x": the tail the secret scan looks for alone can never read as a number.
    return st.binary(min_size=8, max_size=8).map(lambda b: f"FAKE-{kind}-FUZZ-x{b.hex()}")


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes missing (the sentinel MISSING) or anything at all."""
    return st.one_of(valid, valid, valid, st.just(MISSING), json_values)


MISSING = Raw("<missing>")


def drop_missing(mapping: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not MISSING}


def mutate(text: str) -> st.SearchStrategy[bytes]:
    """The document as written, or damaged the ways files get damaged."""
    data = text.encode("utf-8", "surrogatepass")
    return st.one_of(
        st.just(data),
        st.just(data),
        st.integers(0, max(0, len(data) - 1)).map(lambda n: data[:n]),  # truncated
        st.binary(min_size=1, max_size=8).map(lambda junk: data + junk),  # trailing garbage
        st.just(b"\xef\xbb\xbf" + data),  # a byte-order mark
        st.just(text.encode("utf-16", "surrogatepass")),
        st.just(b"\0" * len(data)),  # a crash on some filesystems leaves zeros
    )


# -- (a) the token file ---------------------------------------------------------------------


@st.composite
def token_documents(draw: st.DrawFn) -> bytes:
    now = NOW
    token = drop_missing({
        "access_token": draw(maybe(distinctive("AT") | st.sampled_from(NASTY_STRINGS))),
        "refresh_token": draw(maybe(st.just(REFRESH_TOKEN) | st.sampled_from(NASTY_STRINGS))),
        "id_token": draw(maybe(distinctive("ID"))),
        "token_type": draw(maybe(st.just("Bearer"))),
        "scope": draw(maybe(st.just("api"))),
        "expires_in": draw(maybe(st.sampled_from([1800, 0, -5, 7200]) | st.sampled_from(
            NASTY_NUMBERS).map(Raw))),
        "expires_at": draw(maybe(
            st.integers(now - 4000, now + 4000)
            | st.sampled_from([0, -1, 2**31, 2**63, 10**12, -(10**12)])
            | st.sampled_from(NASTY_NUMBERS).map(Raw))),
    })
    doc = drop_missing({
        "creation_timestamp": draw(maybe(st.integers(now - 8 * 86400, now)
                                         | st.sampled_from(NASTY_NUMBERS).map(Raw))),
        "token": draw(st.one_of(st.just(token), st.just(token), st.just(token), json_values)),
        "x_unknown": draw(json_values),
    })
    whole = draw(st.one_of(st.just(doc), st.just(doc), st.just(doc), json_values))
    return draw(mutate(to_json(whole)))


def token_verdict(raw: bytes) -> Verdict:
    try:
        doc = from_json_text(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Verdict.INVALID
    if not isinstance(doc, dict) or not isinstance(doc.get("token"), dict):
        return Verdict.INVALID
    token = doc["token"]
    refresh, access, expires = (token.get(k) for k in ("refresh_token", "access_token",
                                                        "expires_at"))
    if not isinstance(refresh, str) or not refresh:
        return Verdict.INVALID
    if isinstance(expires, bool) or not isinstance(expires, int):
        return Verdict.INVALID
    created = doc.get("creation_timestamp")
    if created is not None and (isinstance(created, bool) or not isinstance(created,
                                                                             (int, float))):
        return Verdict.INVALID
    if access is not None and not isinstance(access, str):
        return Verdict.INVALID
    verdicts = [Verdict.VALID]
    if access is None:
        verdicts.append(Verdict.EITHER)  # the specification only names the refresh token
    if not plausible_time(expires) or (created is not None and not plausible_time(
            created + 30 * 86400)):
        verdicts.append(Verdict.EITHER)
    if has_surrogate(token) or odd_text(access, refresh):
        verdicts.append(Verdict.EITHER)
    return worst(*verdicts)


# -- in-process harness ---------------------------------------------------------------------


class OneWait:
    """Stands in for EventLoop: checks the timeout as select() would, then stops the daemon."""

    def __init__(self, signals: Any) -> None:
        self.signals = signals
        self._read, write = os.pipe()
        os.write(write, b"x")  # always readable: select() validates, then returns at once
        os.close(write)

    def wait(self, timeout: float) -> Set[Path]:
        select.select([self._read], [], [], timeout)
        self.signals.stop = True
        return set()


@dataclass
class Harness:
    """The sender's own functions over files in a temporary folder."""

    root: Path
    token_url: str
    signals: Any = field(default_factory=lambda: tsr.Signals())
    loop: Optional[OneWait] = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.loop = OneWait(self.signals)

    @property
    def token_file(self) -> Path:
        return self.root / "tokens.json"

    def __repr__(self) -> str:
        return f"Harness({self.root})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' reports
        printer.text(repr(self))

    def write_private(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        path.chmod(0o600)

    def settings(self, path: Optional[Path] = None) -> Any:
        overrides = {"token_url": self.token_url,
                     "socket_path": str(self.root / "no-bot.sock"),
                     "state_file": str(self.root / "state.json"), "log_file": "-"}
        if path is None:
            path = self.root / "absent-settings.yaml"
            return tsr.load_settings(path, False, overrides)
        return tsr.load_settings(path, True, overrides)

    def read_only_modes(self, settings: Any) -> int:
        """--status and --check over the token file, output discarded."""
        with contextlib.redirect_stdout(io.StringIO()):
            tsr.run_status(settings, self.token_file)
            code: int = tsr.run_check(settings, self.root / "app.yaml", self.token_file, "fuzz")
        return code

    def daemon_step(self, settings: Any, app: Any) -> int:
        """Start the daemon on the token file and let it run until its first sleep."""
        assert self.loop is not None
        self.signals.stop = False
        sender = tsr.Sender(settings, app, tsr.TokenStore(self.token_file), self.signals,
                            tsr.Notifier({}), tsr.StateFile(self.root / "state.json"))
        code: int = tsr.Daemon(sender, self.loop).run()
        return code

    def sender_error_code(self, call: Any) -> int:
        """Run `call`; the sender's exit code for it (0, or the SenderError's)."""
        try:
            result = call()
        except tsr.SenderError as exc:
            code: int = exc.exit_code
            return code
        return result if isinstance(result, int) else 0


@pytest.fixture
def harness(tmp_path: Path, schwab: FakeSchwab) -> Harness:
    h = Harness(tmp_path / "fuzz", schwab.url)
    h.write_private(h.root / "app.yaml",
                    yaml.safe_dump({"app_key": APP_KEY, "app_secret": APP_SECRET}).encode())
    return h


def app_config() -> Any:
    return tsr.AppConfig(APP_KEY, APP_SECRET, None)


@IN_PROCESS
@given(raw=token_documents())
@example(raw=b"[" * 100_000)
@example(raw=b'{"token": {"refresh_token": "r", "access_token": "a", "expires_at": 1000000000000}}')
@example(raw=b'{"creation_timestamp": 1e400, '
             b'"token": {"refresh_token": "r", "access_token": "a", "expires_at": 1}}')
def test_any_token_file_is_accepted_only_if_valid_and_never_crashes_status_check_or_daemon(
    raw: bytes, harness: Harness
) -> None:
    verdict = token_verdict(raw)
    try:
        tsr.parse_token_document(raw, harness.token_file)
    except tsr.MalformedFile as exc:
        assert verdict is not Verdict.VALID, f"a valid token file was refused: {exc}"
        return
    assert verdict is not Verdict.INVALID, "an invalid token file was accepted"
    harness.write_private(harness.token_file, raw)
    settings = harness.settings()
    assert harness.sender_error_code(lambda: harness.read_only_modes(settings)) in (
        DOCUMENTED_EXIT_CODES)
    assert harness.sender_error_code(lambda: harness.daemon_step(settings, app_config())) in (
        DOCUMENTED_EXIT_CODES)


# -- end-to-end helpers ---------------------------------------------------------------------


@dataclass
class Door:
    """What an end-to-end run needs; the short repr keeps hypothesis' reports readable."""

    sender: Sender
    bundle: Bundle
    schwab: FakeSchwab
    registry: SecretRegistry

    def __repr__(self) -> str:
        return "Door(the sender script, a bundle, the fake endpoint and bot)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' reports
        printer.text(repr(self))


@pytest.fixture
def door(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot,
    secret_registry: SecretRegistry,
) -> Door:
    return Door(sender, bundle, schwab, secret_registry)


@dataclass(frozen=True)
class FileState:
    data: bytes
    inode: int
    mtime_ns: int


def file_state(path: Path) -> FileState:
    st_ = path.stat()
    return FileState(path.read_bytes(), st_.st_ino, st_.st_mtime_ns)


def assert_clean_exit(result: Any) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in DOCUMENTED_EXIT_CODES, (result.returncode, result.stderr[-800:])


def assert_untouched(bundle: Bundle, before: FileState, why: str) -> None:
    after = file_state(bundle.token_file)
    assert after == before, f"the token file was written although {why}"
    assert list(bundle.configs.glob(".schwab_tokens.json.*.tmp")) == []


def assert_written_from(bundle: Bundle, fake: FakeSchwab) -> None:
    latest = fake.latest
    assert latest is not None
    assert bundle.read_tokens()["token"]["access_token"] == latest.access_token


@END_TO_END
@given(raw=token_documents())
@example(raw=b"[" * 100_000)
@example(raw=b'{"token": {"refresh_token": "r", "access_token": "a", "expires_at": 1000000000000}}')
@example(raw=(f'{{"token": {{"refresh_token": "{REFRESH_TOKEN}", "access_token": "\\ud800", '
              f'"expires_at": {NOW + 1800}}}}}').encode())
def test_the_script_given_any_token_file_exits_cleanly_and_writes_only_on_success(
    raw: bytes, door: Door
) -> None:
    sender, bundle, schwab, secret_registry = door.sender, door.bundle, door.schwab, door.registry
    bundle.write_token_text(raw)
    before = file_state(bundle.token_file)
    verdict = token_verdict(raw)
    result = sender.run("--once")
    assert_clean_exit(result)
    if verdict is Verdict.INVALID:
        assert result.returncode == 65, result.stderr[-800:]
    if result.returncode != 0 or verdict is Verdict.INVALID:
        assert_untouched(bundle, before, f"the run failed ({result.returncode})")
    elif file_state(bundle.token_file) != before:
        assert_written_from(bundle, schwab)  # a refresh was due and succeeded
    secret_registry.add_secret(*(t for t in _distinctive_in(raw)))


def _distinctive_in(raw: bytes) -> List[str]:
    text = raw.decode("utf-8", "replace")
    return [word.strip('"') for word in text.replace(",", " ").split()
            if word.strip('"').startswith("FAKE-") and "-FUZZ-" in word]


# -- (b) the app config ---------------------------------------------------------------------

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([*NASTY_STRINGS, "  padded  ", "yes", "~", "0x1F", "2026-12-03"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=5,
)


def yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=False, sort_keys=False)


RAW_YAML = st.sampled_from([
    "", "---\n", "app_key: [unclosed\n", "\tapp_key: tab\n", "app_key: a\napp_key: b\n",
    "&a [*a]\n", "? [a, b]\n: c\n", "app_key: !!python/object:os.system x\n",
    "- app_key\n- app_secret\n", "[" * 5000, "{" * 5000, "app_key: 'a\n",
    "%YAML 9.9\n---\napp_key: a\n",
])


def maybe_yaml(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, valid, st.just(MISSING), yaml_values)


@st.composite
def app_configs(draw: st.DrawFn) -> bytes:
    mapping = drop_missing({
        "app_key": draw(maybe_yaml(st.just(APP_KEY) | st.text(min_size=1, max_size=10))),
        "app_secret": draw(maybe_yaml(st.just(APP_SECRET) | st.text(min_size=1, max_size=10))),
        "app_name": draw(maybe_yaml(st.just("fuzz"))),
        "callback_url": draw(maybe_yaml(st.just("https://127.0.0.1:8182"))),
        "x_other_program": draw(yaml_values),
    })
    text = draw(st.one_of(st.just(yaml_text(mapping)), st.just(yaml_text(mapping)),
                          yaml_values.map(yaml_text), RAW_YAML))
    return draw(mutate(text))


def yaml_verdict(raw: bytes) -> Tuple[Verdict, Any]:
    try:
        return Verdict.VALID, yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return Verdict.INVALID, None


def app_config_verdict(raw: bytes) -> Verdict:
    verdict, data = yaml_verdict(raw)
    if verdict is Verdict.INVALID or not isinstance(data, dict):
        return Verdict.INVALID
    for key in ("app_key", "app_secret"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            return Verdict.INVALID
    key, secret = data.get("app_key"), data.get("app_secret")
    if has_surrogate([key, secret]) or odd_text(key.strip(), secret.strip()):
        return Verdict.EITHER
    return Verdict.VALID


@IN_PROCESS
@given(raw=app_configs())
@example(raw=b"[" * 5000)
def test_any_app_config_is_accepted_only_if_valid_and_refused_with_a_sender_error(
    raw: bytes, harness: Harness
) -> None:
    path = harness.root / "fuzz-app.yaml"
    harness.write_private(path, raw)
    verdict = app_config_verdict(raw)
    try:
        app = tsr.load_app_config(path)
    except (tsr.MalformedFile, tsr.MissingFile) as exc:
        assert verdict is not Verdict.VALID, f"a valid app config was refused: {exc}"
        return
    assert verdict is not Verdict.INVALID, "an invalid app config was accepted"
    assert isinstance(app.app_key, str) and app.app_key == app.app_key.strip()


@END_TO_END
@given(raw=app_configs())
@example(raw=b"[" * 5000)
@example(raw=f'app_key: "\\ud800"\napp_secret: "{APP_SECRET}"\n'.encode())
def test_the_script_given_any_app_config_exits_cleanly_and_writes_only_on_success(
    raw: bytes, door: Door
) -> None:
    sender, bundle, schwab = door.sender, door.bundle, door.schwab
    bundle.app_config.write_bytes(raw)
    bundle.app_config.chmod(0o600)
    bundle.write_tokens(valid_for=-60)
    before = file_state(bundle.token_file)
    verdict = app_config_verdict(raw)
    result = sender.run("--once")
    assert_clean_exit(result)
    if verdict is Verdict.INVALID:
        assert result.returncode == 65, result.stderr[-800:]
    if result.returncode == 0:
        assert_written_from(bundle, schwab)
    else:
        assert_untouched(bundle, before, f"the run failed ({result.returncode})")
    _, data = yaml_verdict(raw)
    if verdict is Verdict.VALID and isinstance(data, dict):
        right = (data["app_key"].strip(), data["app_secret"].strip()) == (APP_KEY, APP_SECRET)
        assert result.returncode == (0 if right else 77), result.stderr[-800:]


# -- (c) the settings file ------------------------------------------------------------------

NUMERIC = {  # name -> (minimum, exclusive), from issue 2's list of settings
    "refresh_margin_seconds": (0, False), "max_refresh_interval_seconds": (0, True),
    "http_timeout_seconds": (0, True), "socket_timeout_seconds": (0, True),
    "socket_retries": (0, False), "socket_retry_delay_seconds": (0, False),
    "backoff_initial_seconds": (0, True), "backoff_max_seconds": (0, True),
    "refresh_token_lifetime_days": (0, True), "refresh_token_warn_hours": (0, False),
}
SANE_LIMIT = 1e7  # larger durations are implausible: accepting or refusing them is fine
NUMBERS = st.sampled_from([0, -1, 1, 2, 0.5, 10**30, float("nan"), float("inf"),
                           float("-inf"), True, "5", None, [1]])


@st.composite
def settings_files(draw: st.DrawFn, end_to_end: bool = False) -> bytes:
    mapping: Dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(NUMERIC)), max_size=4, unique=True)):
        mapping[name] = draw(NUMBERS)
    if draw(st.booleans()):
        mapping["log_level"] = draw(st.sampled_from(["debug", "INFO", "CRITICAL", "", 3, None]))
    if draw(st.booleans()):
        mapping["allowed_peer_users"] = draw(st.sampled_from(
            ["root", "nobody", 0, 65534, "no-such-user-xq", True, 1.5, None, [], ["root", 0],
             ["root", "no-such-user-xq"], {"user": "root"}]))
    if draw(st.booleans()):
        key = draw(st.sampled_from(["token_url", "socket_path", "log_file", "state_file",
                                    "ca_file"]))
        mapping[key] = draw(st.sampled_from(PATH_VALUES[key]))
    if draw(st.integers(0, 5)) == 0:
        mapping[draw(st.sampled_from(["http_timeout", "Log_Level", "unknown", ""]))] = 1
    if not end_to_end:
        return draw(st.one_of(st.just(yaml_text(mapping)).map(str.encode),
                              st.just(yaml_text(mapping)).flatmap(mutate), RAW_YAML.map(
                                  str.encode)))
    return yaml_text(mapping).encode()


PATH_VALUES: Dict[str, List[Any]] = {
    # Only what needs no network: the command line overrides these in the end-to-end runs.
    "token_url": ["http://localhost:9/x", "http://[::1]:9/x", "http://example.com/x",
                  "ftp://127.0.0.1/", "https://", "https://h:99999/", "http://127.0.0.1:0x/",
                  5, None, []],
    "socket_path": ["/tmp/fuzz-bot.sock", "", None, 5, "relative.sock"],
    "log_file": ["-", None, "/tmp/fuzz.log", "", 5, "a\x00b"],
    "state_file": ["/tmp/fuzz.state", None, "", 5],
    "ca_file": [None, "/no/such/ca.pem", "", 5],
}


def settings_verdict(raw: bytes) -> Verdict:
    verdict, data = yaml_verdict(raw)
    if verdict is Verdict.INVALID:
        return Verdict.INVALID
    if data is None:
        return Verdict.VALID
    if not isinstance(data, dict):
        return Verdict.INVALID
    verdicts = [Verdict.VALID]
    merged = {"backoff_initial_seconds": 5.0, "backoff_max_seconds": 300.0}
    for name, value in data.items():
        verdicts.append(_one_setting(str(name), value))
        if name in merged and _one_setting(str(name), value) is not Verdict.INVALID:
            merged[name] = value
    if verdicts.count(Verdict.INVALID) == 0 and all(
            isinstance(v, (int, float)) for v in merged.values()) and (
            merged["backoff_max_seconds"] < merged["backoff_initial_seconds"]):
        verdicts.append(Verdict.INVALID)
    return worst(*verdicts)


def _one_setting(name: str, value: Any) -> Verdict:
    if name in NUMERIC:
        minimum, exclusive = NUMERIC[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return Verdict.INVALID
        if name == "socket_retries" and not isinstance(value, int):
            return Verdict.INVALID
        if value < minimum or (exclusive and value == minimum):
            return Verdict.INVALID
        return Verdict.EITHER if value > SANE_LIMIT else Verdict.VALID
    if name == "log_level":
        ok = isinstance(value, str) and value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR")
        return Verdict.VALID if ok else Verdict.INVALID
    if name == "allowed_peer_users":
        users = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(users, list):
            return Verdict.INVALID
        for user in users:
            if isinstance(user, bool) or not isinstance(user, (str, int)):
                return Verdict.INVALID
            if isinstance(user, str) and user == "no-such-user-xq":
                return Verdict.INVALID
        return Verdict.VALID
    if name == "token_url":
        return Verdict.VALID if value in ("http://localhost:9/x", "http://[::1]:9/x") else (
            Verdict.INVALID)
    if name in ("socket_path", "state_file"):
        return Verdict.VALID if isinstance(value, str) and value else Verdict.INVALID
    if name == "log_file":
        if value in ("-", None):
            return Verdict.VALID
        if not isinstance(value, str) or not value:
            return Verdict.INVALID
        return Verdict.EITHER if "\x00" in value else Verdict.VALID
    if name == "ca_file":
        return Verdict.VALID if value is None else Verdict.INVALID  # no such file
    return Verdict.INVALID  # unknown key: a typo must not pass silently


@IN_PROCESS
@given(raw=settings_files())
@example(raw=b"http_timeout_seconds: .nan\n")
@example(raw=b"refresh_margin_seconds: .nan\n")
@example(raw=b"refresh_token_lifetime_days: 1.0e+300\n")
@example(raw=b"[" * 5000)
def test_any_settings_file_is_accepted_only_if_valid_and_usable_by_every_mode(
    raw: bytes, harness: Harness, bundle: Bundle
) -> None:
    path = harness.root / "settings.yaml"
    path.write_bytes(raw)
    verdict = settings_verdict(raw)
    try:
        loaded = harness.settings(path)
    except (tsr.SettingsError, tsr.MissingFile) as exc:
        assert verdict is not Verdict.VALID, f"valid settings were refused: {exc}"
        assert exc.exit_code in DOCUMENTED_EXIT_CODES
        return
    assert verdict is not Verdict.INVALID, "invalid settings were accepted"
    # Whatever was accepted must work: status, check and the daemon on an expired token.
    harness.write_private(harness.token_file, bundle.token_bytes())
    assert harness.sender_error_code(lambda: harness.read_only_modes(loaded)) in (
        DOCUMENTED_EXIT_CODES)
    assert harness.sender_error_code(lambda: harness.daemon_step(loaded, app_config())) in (
        DOCUMENTED_EXIT_CODES)


@END_TO_END
@given(raw=settings_files(end_to_end=True))
@example(raw=b"http_timeout_seconds: .nan\n")
@example(raw=b"socket_timeout_seconds: .inf\n")
@example(raw=b"refresh_margin_seconds: .nan\n")
def test_the_script_given_any_settings_file_exits_cleanly_and_writes_only_on_success(
    raw: bytes, door: Door
) -> None:
    sender, bundle, schwab = door.sender, door.bundle, door.schwab
    bundle.settings.write_bytes(raw)
    bundle.write_tokens(valid_for=-60)
    before = file_state(bundle.token_file)
    verdict = settings_verdict(raw)
    result = sender.run("--once")
    assert_clean_exit(result)
    if verdict is Verdict.INVALID:
        assert result.returncode == 78, result.stderr[-800:]
        assert_untouched(bundle, before, "the settings were invalid")
    elif result.returncode == 0:
        assert_written_from(bundle, schwab)
    else:
        assert_untouched(bundle, before, f"the run failed ({result.returncode})")


# -- (d) the endpoint's answer --------------------------------------------------------------

REJECTIONS = ["invalid_grant", "invalid_client", "unsupported_token_type"]
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                    blacklist_characters="\x7f"), max_size=40)
RETRY_AFTER = st.one_of(HEADER_TEXT, st.sampled_from(
    ["1", "0", "-1", "\xb2", "9" * 400, "Wed, 21 Oct 2015 07:28:00 GMT",
     "Mon, 01 Jan 99999 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", " 2 ", "1.5"]))


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Tuple[Tuple[str, str], ...]
    body: bytes

    def message(self) -> Message:
        msg = Message()
        for name, value in self.headers:
            msg[name] = value
        return msg


@st.composite
def success_bodies(draw: st.DrawFn) -> bytes:
    body = drop_missing({
        "access_token": draw(maybe(distinctive("AT") | st.sampled_from(NASTY_STRINGS))),
        "refresh_token": draw(st.one_of(st.just(MISSING), distinctive("RT"), json_values)),
        "id_token": draw(maybe(distinctive("ID"))),
        "expires_in": draw(maybe(st.sampled_from([1800, 1, 86400, 86401, 0, -1, 2**70,
                                                  Raw("1e400"), Raw("1800.0"), "1800"]))),
        "token_type": draw(maybe(st.just("Bearer"))),
        "scope": draw(maybe(st.just("api"))),
    })
    return to_json(body).encode("utf-8", "surrogatepass")


@st.composite
def endpoint_answers(draw: st.DrawFn) -> Answer:
    status = draw(st.one_of(st.just(200), st.just(200), st.sampled_from(
        [400, 401, 403, 429, 500, 502, 503, 301, 302, 204, 304, 101, 418, 599]),
        st.integers(100, 599)))
    error = {"error": draw(st.sampled_from([*REJECTIONS, "invalid_request", "server_error",
                                            "", "refresh_token_authentication_error"])),
             "error_description": draw(st.text(max_size=30) | st.just("refresh token invalid"))}
    body = draw(st.one_of(
        success_bodies(), success_bodies(),
        st.just(json.dumps(error).encode()),
        st.binary(max_size=64),
        json_values.map(to_json).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b"<html>Access Denied</html>", b"[" * 100_000, b"null",
                         b'{"access_token": "x"} trailing', b"\xff\xfe{}"]),
    ))
    headers: List[Tuple[str, str]] = [("Content-Type", draw(st.sampled_from(
        ["application/json", "text/html", "application/json; charset=latin-1"])))]
    if draw(st.booleans()):
        headers.append(("Retry-After", draw(RETRY_AFTER)))
    if draw(st.booleans()):
        headers.append(("Location", draw(HEADER_TEXT)))
    return Answer(status, tuple(headers), body)


def answer_verdict(answer: Answer) -> Verdict:
    if answer.status != 200:
        return Verdict.INVALID
    try:
        body = from_json_text(answer.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Verdict.INVALID
    if not isinstance(body, dict):
        return Verdict.INVALID
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        return Verdict.INVALID
    verdicts = [Verdict.VALID]
    refresh = body.get("refresh_token", MISSING)
    if refresh is None:
        verdicts.append(Verdict.EITHER)  # null: "none came back"?
    elif refresh is not MISSING and (not isinstance(refresh, str) or not refresh):
        verdicts.append(Verdict.INVALID)
    expires_in = body.get("expires_in", 1800)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int):
        verdicts.append(Verdict.INVALID)
    elif not 0 < expires_in <= 86400:
        verdicts.append(Verdict.EITHER)
    for key in ("token_type", "scope", "id_token"):
        if key in body and not isinstance(body[key], str):
            verdicts.append(Verdict.EITHER)
    if has_surrogate(body) or odd_text(access, refresh):
        verdicts.append(Verdict.EITHER)
    return worst(*verdicts)


def expected_refusal(answer: Answer) -> Tuple[type, ...]:
    """Which SenderError a refused answer must raise, per issue 2 (8, 9) and facts.md."""
    error = ""
    with contextlib.suppress(Exception):
        error = str(from_json_text(answer.body.decode("utf-8")).get("error"))
    if answer.status in (400, 401) and error in REJECTIONS:
        return (tsr.RefreshRejected,)
    if answer.status == 429 or answer.status >= 500 or answer.status == 200:
        return (tsr.TransientRefreshError,)
    return (tsr.SenderError,)


@IN_PROCESS
@given(answer=endpoint_answers())
@example(answer=Answer(429, (("Retry-After", "\xb2"),), b"{}"))
@example(answer=Answer(200, (), b"[" * 100_000))
def test_any_endpoint_answer_is_classified_and_only_a_valid_success_makes_a_token_file(
    answer: Answer, harness: Harness
) -> None:
    verdict = answer_verdict(answer)
    try:
        accepted = tsr.classify_answer(answer.status, answer.message(), answer.body)
    except tsr.SenderError as exc:
        assert verdict is not Verdict.VALID, f"a valid success was refused: {exc}"
        assert isinstance(exc, expected_refusal(answer)), (type(exc).__name__, str(exc))
        return
    assert verdict is not Verdict.INVALID, "an invalid answer was accepted"
    # What the sender writes from it reads back, with every token as the endpoint sent it.
    base = tsr.parse_token_document(json.dumps({"creation_timestamp": 1, "token": {
        "access_token": "old", "refresh_token": REFRESH_TOKEN, "expires_at": 2}}).encode(),
        harness.token_file)
    merged = tsr.merge_refresh(base, accepted, time.time())
    tsr.TokenStore(harness.token_file).write(merged)
    again = tsr.parse_token_document(harness.token_file.read_bytes(), harness.token_file)
    assert again.access_token == accepted["access_token"]
    assert again.refresh_token == (accepted.get("refresh_token") or REFRESH_TOKEN)
    assert again.document["creation_timestamp"] == 1


class ScriptedEndpoint:
    """A token endpoint on 127.0.0.1 that answers every request with `answer`, byte for byte."""

    def __init__(self) -> None:
        self.answer = Answer(500, (), b"")
        self.requests = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                endpoint.requests += 1
                answer = endpoint.answer
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(answer.body)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/oauth/token"

    def __repr__(self) -> str:
        return f"ScriptedEndpoint({self.url})"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[ScriptedEndpoint]:
    endpoint = ScriptedEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.stop()


SURROGATE_SUCCESS = Answer(200, (("Content-Type", "application/json"),),
                           b'{"access_token": "\\ud800", "expires_in": 1800}')


@END_TO_END
@given(answer=endpoint_answers())
@example(answer=SURROGATE_SUCCESS)
@example(answer=Answer(429, (("Retry-After", "\xb2"),), b"{}"))
@example(answer=Answer(200, (), b"[" * 100_000))
def test_the_script_given_any_endpoint_answer_exits_cleanly_and_writes_only_on_success(
    answer: Answer, door: Door, scripted: ScriptedEndpoint
) -> None:
    sender, bundle, secret_registry = door.sender, door.bundle, door.registry
    bundle.write_settings(http_timeout_seconds=2, backoff_initial_seconds=0.01,
                          backoff_max_seconds=0.02)
    bundle.write_tokens(valid_for=-60)
    before = file_state(bundle.token_file)
    scripted.answer = answer
    verdict = answer_verdict(answer)
    result = sender.run("--once", "--force", "--token-url", scripted.url)
    secret_registry.add_secret(*_distinctive_in(answer.body))
    assert_clean_exit(result)
    if result.returncode == 0:
        assert verdict is not Verdict.INVALID, "an invalid answer was written"
        written = bundle.read_tokens()["token"]
        body = from_json_text(answer.body.decode("utf-8"))
        assert written["access_token"] == body["access_token"]
    else:
        assert verdict is not Verdict.VALID, f"a valid success failed: {result.stderr[-800:]}"
        assert result.returncode in (75, 77), result.stderr[-800:]
        assert_untouched(bundle, before, "the answer was not a valid success")


def test_the_fuzz_oracles_tell_valid_from_invalid_input() -> None:
    """The oracles themselves, on inputs whose verdict is known from the specification."""
    now = int(time.time())
    good = {"creation_timestamp": now, "token": {"access_token": "a", "refresh_token": "r",
                                                 "expires_at": now}}
    assert token_verdict(json.dumps(good).encode()) is Verdict.VALID
    assert token_verdict(json.dumps(good).encode()[:-1]) is Verdict.INVALID
    assert token_verdict(b'{"token": {"refresh_token": "r", "expires_at": true}}') is (
        Verdict.INVALID)
    assert app_config_verdict(b"app_key: k\napp_secret: s\n") is Verdict.VALID
    assert app_config_verdict(b"app_key: k\napp_secret: 5\n") is Verdict.INVALID
    assert settings_verdict(b"http_timeout_seconds: 3\n") is Verdict.VALID
    assert settings_verdict(b"http_timeout_seconds: .nan\n") is Verdict.INVALID
    assert settings_verdict(b"backoff_max_seconds: 1\n") is Verdict.INVALID  # below 5
    assert settings_verdict(b"htp_timeout_seconds: 3\n") is Verdict.INVALID
    assert answer_verdict(Answer(200, (), b'{"access_token": "a"}')) is Verdict.VALID
    assert answer_verdict(Answer(200, (), b'{"access_token": ""}')) is Verdict.INVALID
    assert answer_verdict(Answer(400, (), b'{"access_token": "a"}')) is Verdict.INVALID
