"""Bad input, one table row per case: the real sender as a subprocess against the fakes.

Every row asserts the exit code, the one line that tells the user what is wrong (the file,
the field and what was expected), that no traceback escaped, and that the token file on disk
is exactly as it was (same inode, mode and bytes): a failure never damages the refresh token.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from tests.conftest import ACCESS_TOKEN, APP_KEY, REFRESH_TOKEN, Bundle
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import REDIRECT_TARGET_PATH, FakeSchwab

RunSender = Callable[..., "subprocess.CompletedProcess[str]"]

EX_DATAERR = 65
EX_NOINPUT = 66
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
ONCE_ATTEMPTS = 3  # the sender's --once makes this many refresh attempts


# -- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What is at a path: kind, inode, mode and content (bytes, or a folder's listing)."""

    kind: str
    inode: int = 0
    mode: int = 0
    content: Any = None


def snapshot(path: Path) -> Snapshot:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Snapshot("missing")
    if path.is_dir():
        return Snapshot("dir", st.st_ino, st.st_mode, sorted(p.name for p in path.iterdir()))
    return Snapshot("file", st.st_ino, st.st_mode, path.read_bytes())


def problem_lines(result: subprocess.CompletedProcess[str]) -> List[str]:
    """The lines that report a problem: ERROR log lines (stderr) and FAIL lines (--check)."""
    lines = [line for line in result.stderr.splitlines() if " ERROR: " in line]
    lines += [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    return lines


def bytes_sent(bot: FakeBot) -> bytes:
    """Everything the bot read (--check connects to check the listener, but sends nothing)."""
    return b"".join(c.data or b"" for c in bot.connections)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        assert "Traceback" not in text, f"traceback on {name}:\n{text}"


def assert_one_problem_line(
    result: subprocess.CompletedProcess[str], fragments: Tuple[str, ...], pattern: Optional[str]
) -> str:
    """Exactly one line reports the problem, and it says what the user needs to know."""
    lines = problem_lines(result)
    assert len(lines) == 1, (
        f"expected one problem line, got {len(lines)}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    line = lines[0]
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the message: {line!r}"
    if pattern is not None:
        assert re.search(pattern, line), f"/{pattern}/ does not match the message: {line!r}"
    return line


def dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=4).encode()


def with_token(doc: Dict[str, Any], **fields: Any) -> Dict[str, Any]:
    """A copy of the token document with fields inside "token" set (None drops one)."""
    out = copy.deepcopy(doc)
    for key, value in fields.items():
        if value is None:
            out["token"].pop(key, None)
        else:
            out["token"][key] = value
    return out


def with_top(doc: Dict[str, Any], **fields: Any) -> Dict[str, Any]:
    """A copy of the token document with top-level fields set (None drops one)."""
    out = copy.deepcopy(doc)
    for key, value in fields.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# -- malformed token files --------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCase:
    id: str
    make: Callable[[Dict[str, Any]], bytes]  # the valid document -> the file's bytes
    fragments: Tuple[str, ...]
    pattern: Optional[str] = None
    code: int = EX_DATAERR


TOKEN_CASES = [
    TokenCase("empty-file", lambda d: b"", ("is empty",)),
    TokenCase("whitespace-only", lambda d: b"  \n\t\n   \n", ("is empty",)),
    TokenCase(
        "truncated-json",
        lambda d: dump(d)[: len(dump(d)) // 2],
        ("invalid JSON",),
        r"line \d+, column \d+",
    ),
    TokenCase(
        "trailing-garbage-after-the-object",
        lambda d: dump(d) + b'\n{"token": {}}\n',
        ("invalid JSON",),
        r"line \d+, column \d+",
    ),
    TokenCase("a-json-array", lambda d: dump([d]), ("expected a JSON object", "array")),
    TokenCase("a-json-string", lambda d: dump("token"), ("expected a JSON object", "string")),
    TokenCase("token-missing", lambda d: dump(with_top(d, token=None)), ("token:", "missing")),
    TokenCase(
        "token-not-an-object",
        lambda d: dump(with_top(d, token=REFRESH_TOKEN)),
        ("token:", "expected an object", "string"),
    ),
    TokenCase(
        "refresh-token-missing",
        lambda d: dump(with_token(d, refresh_token=None)),
        ("token.refresh_token", "missing"),
    ),
    TokenCase(
        "refresh-token-empty",
        lambda d: dump(with_token(d, refresh_token="")),
        ("token.refresh_token", "expected a string", "empty"),
    ),
    TokenCase(
        "refresh-token-a-number",
        lambda d: dump(with_token(d, refresh_token=12345678)),
        ("token.refresh_token", "expected a string", "integer"),
    ),
    TokenCase(
        "access-token-a-number",
        lambda d: dump(with_token(d, access_token=12345678)),
        ("token.access_token", "expected a string", "integer"),
    ),
    TokenCase(
        "expires-at-a-string",
        lambda d: dump(with_token(d, expires_at=str(d["token"]["expires_at"]))),
        ("token.expires_at", "expected an integer", "string"),
    ),
    TokenCase(
        "expires-at-a-float",
        lambda d: dump(with_token(d, expires_at=d["token"]["expires_at"] + 0.5)),
        ("token.expires_at", "expected an integer", "number"),
    ),
    TokenCase(
        "expires-at-a-boolean",
        lambda d: dump(with_token(d, expires_at=True)),
        ("token.expires_at", "expected an integer", "boolean"),
    ),
    TokenCase(
        "expires-at-missing",
        lambda d: dump(with_token(d, expires_at=None)),
        ("token.expires_at", "missing"),
    ),
    TokenCase(
        "creation-timestamp-a-string",
        lambda d: dump(with_top(d, creation_timestamp="2025-12-01T10:00:00Z")),
        ("creation_timestamp", "expected a Unix time", "string"),
    ),
    TokenCase(
        "expires-at-NaN",
        lambda d: dump(with_token(d, expires_at=float("nan"))),
        ("invalid JSON", "NaN"),
    ),
    TokenCase(
        "invalid-utf8-bytes",
        lambda d: dump(d).replace(b'"Bearer"', b'"Bea\xff\xfer"'),
        ("not UTF-8",),
    ),
]

TOKEN_MODES = ["--once", "--check"]
# --check parses with the same code as --once: a few rows show it reports them the same way.
CHECK_TOKEN_CASES = [
    c
    for c in TOKEN_CASES
    if c.id
    in {"truncated-json", "refresh-token-missing", "expires-at-a-float", "invalid-utf8-bytes"}
]


def _token_params() -> List[Any]:
    rows = [pytest.param(c, "--once", id=f"{c.id}---once") for c in TOKEN_CASES]
    rows += [pytest.param(c, "--check", id=f"{c.id}---check") for c in CHECK_TOKEN_CASES]
    return rows


@pytest.mark.parametrize(("case", "mode"), _token_params())
def test_a_malformed_token_file_is_refused_with_one_line_naming_the_field(
    case: TokenCase,
    mode: str,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
    bot: FakeBot,
) -> None:
    valid = bundle.write_tokens()
    bundle.write_token_text(case.make(valid))
    before = snapshot(bundle.token_file)

    result = run_sender(mode)

    assert_no_traceback(result)
    assert result.returncode == case.code, result.stderr + result.stdout
    assert_one_problem_line(result, (str(bundle.token_file), *case.fragments), case.pattern)
    assert snapshot(bundle.token_file) == before, "the token file was changed"
    assert schwab.requests == [], "a malformed file must not lead to a refresh"
    assert bytes_sent(bot) == b"", "a malformed file must not lead to a delivery"


@pytest.mark.parametrize("mode", TOKEN_MODES)
@pytest.mark.parametrize(
    "dir_mode",
    [
        # What mkdir, or Docker bind-mounting a file that does not exist yet, leaves there.
        pytest.param(0o755, id="mode-0755-as-mkdir-or-a-bind-mount-makes-it"),
        pytest.param(0o700, id="mode-0700"),
    ],
)
def test_a_directory_where_the_token_file_should_be_is_reported_as_a_directory(
    dir_mode: int,
    mode: str,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
) -> None:
    bundle.token_file.unlink()
    bundle.token_file.mkdir()
    bundle.token_file.chmod(dir_mode)
    before = snapshot(bundle.token_file)

    result = run_sender(mode)

    assert_no_traceback(result)
    assert result.returncode == EX_DATAERR, result.stderr + result.stdout
    assert_one_problem_line(result, (str(bundle.token_file), "directory"), None)
    assert snapshot(bundle.token_file) == before
    assert schwab.requests == []


@pytest.mark.parametrize("mode", TOKEN_MODES)
def test_a_missing_token_file_exits_66_and_says_how_to_create_it(
    mode: str, bundle: Bundle, run_sender: RunSender, schwab: FakeSchwab
) -> None:
    bundle.token_file.unlink()

    result = run_sender(mode)

    assert_no_traceback(result)
    assert result.returncode == EX_NOINPUT, result.stderr + result.stdout
    assert_one_problem_line(result, (str(bundle.token_file), "does not exist", "log in"), None)
    assert not bundle.token_file.exists(), "a missing token file must not be created"
    assert schwab.requests == []


# -- app config, permissions ------------------------------------------------------------------


@dataclass(frozen=True)
class FileCase:
    id: str
    setup: Callable[[Bundle], None]
    code: int
    fragments: Tuple[str, ...]  # formatted with {app_config}, {token_file}, {settings}
    pattern: Optional[str] = None
    args: Tuple[str, ...] = field(default_factory=tuple)


def _app_text(text: str) -> Callable[[Bundle], None]:
    def setup(b: Bundle) -> None:
        b.app_config.write_text(text, encoding="utf-8")
        b.app_config.chmod(0o600)

    return setup


def _app(**overrides: Any) -> Callable[[Bundle], None]:
    def setup(b: Bundle) -> None:
        b.write_app_config(**overrides)

    return setup


def _chmod(which: str, mode: int) -> Callable[[Bundle], None]:
    def setup(b: Bundle) -> None:
        getattr(b, which).chmod(mode)

    return setup


def _unlink_app(b: Bundle) -> None:
    b.app_config.unlink()


APP_CASES = [
    FileCase(
        "app-config-missing",
        _unlink_app,
        EX_NOINPUT,
        ("{app_config}", "does not exist", "app_key", "app_secret"),
    ),
    FileCase("app-config-empty", _app_text(""), EX_DATAERR, ("{app_config}", "mapping", "empty")),
    FileCase(
        "app-config-a-list-not-a-mapping",
        _app_text(f"- app_key: {APP_KEY}\n"),
        EX_DATAERR,
        ("{app_config}", "expected a mapping", "list"),
    ),
    FileCase(
        "app-config-invalid-yaml-with-line-and-column",
        _app_text(f"app_key: {APP_KEY}\napp_secret: 'not closed\napp_name: x\n"),
        EX_DATAERR,
        ("{app_config}", "invalid YAML"),
        r"line \d+, column \d+",
    ),
    FileCase(
        "app-key-missing",
        _app(app_key=None),
        EX_DATAERR,
        ("{app_config}", "app_key", "missing"),
    ),
    FileCase(
        "app-secret-empty",
        _app(app_secret=""),
        EX_DATAERR,
        ("{app_config}", "app_secret", "expected a non-empty string"),
    ),
    FileCase(
        "app-secret-a-number",
        _app(app_secret=123456),
        EX_DATAERR,
        ("{app_config}", "app_secret", "expected a non-empty string", "int"),
    ),
    FileCase(
        "app-config-readable-by-others",
        _chmod("app_config", 0o644),
        EX_CONFIG,
        ("{app_config}", "0644", "chmod 600 {app_config}"),
    ),
    FileCase(
        "token-file-readable-by-others",
        _chmod("token_file", 0o644),
        EX_CONFIG,
        ("{token_file}", "0644", "chmod 600 {token_file}"),
    ),
    FileCase(
        "token-file-writable-by-others",
        _chmod("token_file", 0o602),
        EX_CONFIG,
        ("{token_file}", "0602", "chmod 600 {token_file}"),
    ),
]


def _fmt(fragments: Tuple[str, ...], b: Bundle) -> Tuple[str, ...]:
    paths = {"app_config": b.app_config, "token_file": b.token_file, "settings": b.settings}
    return tuple(f.format(**paths) for f in fragments)


@pytest.mark.parametrize("mode", ["--once", "--check"])
@pytest.mark.parametrize("case", APP_CASES, ids=[c.id for c in APP_CASES])
def test_a_bad_app_config_or_unsafe_secret_is_refused_with_one_clear_line(
    case: FileCase,
    mode: str,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
    bot: FakeBot,
) -> None:
    case.setup(bundle)
    before = snapshot(bundle.token_file)

    result = run_sender(mode, *case.args)

    assert_no_traceback(result)
    assert result.returncode == case.code, result.stderr + result.stdout
    assert_one_problem_line(result, _fmt(case.fragments, bundle), case.pattern)
    assert snapshot(bundle.token_file) == before, "the token file was changed"
    assert schwab.requests == []
    assert bytes_sent(bot) == b""


# -- the settings file ------------------------------------------------------------------------


def _settings(**settings: Any) -> Callable[[Bundle], None]:
    def setup(b: Bundle) -> None:
        b.write_settings(**settings)

    return setup


def _settings_text(text: str) -> Callable[[Bundle], None]:
    def setup(b: Bundle) -> None:
        b.settings.write_text(text, encoding="utf-8")

    return setup


def _nothing(b: Bundle) -> None:
    pass


SETTINGS_CASES = [
    FileCase(
        "unknown-key-is-named",
        _settings(refresh_margin=600),
        EX_CONFIG,
        ("{settings}", "unknown setting 'refresh_margin'"),
    ),
    FileCase(
        "negative-timeout",
        _settings(http_timeout_seconds=-5),
        EX_CONFIG,
        ("{settings}", "http_timeout_seconds", "greater than 0", "-5"),
    ),
    FileCase(
        "string-where-a-number-is-expected",
        _settings(socket_timeout_seconds="five"),
        EX_CONFIG,
        ("{settings}", "socket_timeout_seconds", "expected a number", "'five'"),
    ),
    FileCase(
        "socket-retries-not-a-whole-number",
        _settings(socket_retries=1.5),
        EX_CONFIG,
        ("{settings}", "socket_retries", "whole number"),
    ),
    FileCase(
        "plain-http-to-a-non-loopback-host",
        _settings(token_url="http://api.schwabapi.com/v1/oauth/token"),
        EX_CONFIG,
        ("{settings}", "token_url", "https://"),
    ),
    FileCase(
        "ftp-url",
        _settings(token_url="ftp://127.0.0.1/v1/oauth/token"),
        EX_CONFIG,
        ("{settings}", "token_url", "ftp://127.0.0.1", "https://"),
    ),
    FileCase(
        "backoff-max-below-backoff-initial",
        _settings(backoff_initial_seconds=10, backoff_max_seconds=5),
        EX_CONFIG,
        ("backoff_max_seconds", "backoff_initial_seconds"),
    ),
    FileCase(
        "bad-log-level",
        _settings(log_level="VERBOSE"),
        EX_CONFIG,
        ("{settings}", "log_level", "'VERBOSE'", "DEBUG, INFO, WARNING, ERROR"),
    ),
    FileCase(
        "unknown-allowed-peer-user",
        _settings(allowed_peer_users=["no-such-user-q7z"]),
        EX_CONFIG,
        ("{settings}", "allowed_peer_users", "'no-such-user-q7z'"),
    ),
    FileCase(
        "socket-path-empty",
        _settings(socket_path=""),
        EX_CONFIG,
        ("{settings}", "socket_path", "expected a path"),
    ),
    FileCase(
        "invalid-yaml-with-line-and-column",
        _settings_text("http_timeout_seconds: 5\nsocket_retries: [1, 2\nlog_level: INFO\n"),
        EX_CONFIG,
        ("{settings}", "invalid YAML"),
        r"line \d+, column \d+",
    ),
    FileCase(
        "a-list-instead-of-a-mapping",
        _settings_text("- http_timeout_seconds: 5\n- socket_retries: 2\n"),
        EX_CONFIG,
        ("{settings}", "expected a mapping", "list"),
    ),
    FileCase(
        "explicit-config-that-does-not-exist",
        _nothing,
        EX_NOINPUT,
        ("{settings}.missing", "does not exist"),
        args=("--config", "{settings}.missing"),
    ),
]


@pytest.mark.parametrize("mode", ["--once", "--check-config"])
@pytest.mark.parametrize("case", SETTINGS_CASES, ids=[c.id for c in SETTINGS_CASES])
def test_a_bad_settings_file_is_refused_with_one_line_naming_the_setting(
    case: FileCase,
    mode: str,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
    bot: FakeBot,
) -> None:
    case.setup(bundle)
    before = snapshot(bundle.token_file)

    result = run_sender(mode, *_fmt(case.args, bundle))

    assert_no_traceback(result)
    assert result.returncode == case.code, result.stderr + result.stdout
    assert_one_problem_line(result, _fmt(case.fragments, bundle), case.pattern)
    assert snapshot(bundle.token_file) == before, "the token file was changed"
    assert schwab.requests == []
    assert bytes_sent(bot) == b""


@pytest.mark.parametrize("which", ["token_file", "app_config"])
def test_a_group_readable_secret_runs_with_exactly_one_group_warning(
    which: str, bundle: Bundle, run_sender: RunSender, schwab: FakeSchwab, bot: FakeBot
) -> None:
    path: Path = getattr(bundle, which)
    path.chmod(0o640)

    result = run_sender("--once")

    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING: " in line]
    assert len(warnings) == 1, result.stderr
    assert str(path) in warnings[0]
    assert "group" in warnings[0]
    assert problem_lines(result) == []
    assert bot.wait_for(1, timeout=1), "the token was not delivered"
    assert bundle.read_tokens()["token"]["access_token"] != ACCESS_TOKEN, "no refresh happened"
    assert path.stat().st_mode & 0o777 == 0o640, "the file's mode was changed"


# -- the token endpoint's answers -------------------------------------------------------------


@dataclass(frozen=True)
class EndpointCase:
    id: str
    mode: str
    fragments: Tuple[str, ...]
    params: Dict[str, Any] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    pattern: Optional[str] = None


FAST_BACKOFF: Dict[str, Any] = {
    "http_timeout_seconds": 2,
    "backoff_initial_seconds": 0.1,
    "backoff_max_seconds": 0.2,
}

REJECTION_CASES = [
    EndpointCase("invalid_grant", "invalid_grant", ("HTTP 400", "invalid_grant")),
    EndpointCase("invalid_client-401", "invalid_client", ("HTTP 401", "invalid_client")),
    EndpointCase(
        "invalid_client-400", "invalid_client", ("HTTP 400", "invalid_client"), {"status": 400}
    ),
    EndpointCase(
        "unsupported_token_type", "unsupported_token_type", ("HTTP 400", "unsupported_token_type")
    ),
]


@pytest.mark.parametrize("case", REJECTION_CASES, ids=[c.id for c in REJECTION_CASES])
def test_a_rejected_refresh_token_exits_77_at_once_and_says_a_new_login_is_needed(
    case: EndpointCase,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
    bot: FakeBot,
) -> None:
    bundle.write_settings(**FAST_BACKOFF)
    before = snapshot(bundle.token_file)
    schwab.set_default(case.mode, **case.params)

    result = run_sender("--once")

    assert_no_traceback(result)
    assert result.returncode == EX_NOPERM, result.stderr
    line = assert_one_problem_line(result, case.fragments, None)
    assert "refresh token" in line
    assert "new login" in line
    assert re.search(r"run \S+", line), f"the message does not say how to log in: {line!r}"
    assert len(schwab.token_requests) == 1, "a rejected refresh token must not be retried"
    assert snapshot(bundle.token_file) == before, "the token file was changed"
    assert bot.connections == [], "the expired token must not be sent"


TIMED_OUT = r"did not answer within 0\.5s|timed out"

TRANSIENT_CASES = [
    EndpointCase("html_403", "html_403", ("HTTP 403", "not JSON")),
    EndpointCase(
        "rate_limited-honours-retry-after",
        "rate_limited",
        ("HTTP 429",),
        {"retry_after": 1},
        {"backoff_max_seconds": 2},
    ),
    EndpointCase("server_error-500", "server_error", ("HTTP 500",)),
    EndpointCase("server_error-503-html", "server_error", ("HTTP 503",), {"status": 503}),
    EndpointCase("malformed_json", "malformed_json", ("HTTP 200", "not JSON")),
    EndpointCase("json_array", "json_array", ("HTTP 200", "array")),
    EndpointCase("missing_access_token", "missing_access_token", ("HTTP 200", "access_token")),
    EndpointCase("expires_in_string", "expires_in_string", ("HTTP 200", "expires_in")),
    EndpointCase("access_token_number", "access_token_number", ("HTTP 200", "access_token")),
    EndpointCase("redirect-not-followed", "redirect", ("HTTP 302", "redirect")),
    EndpointCase("connection-reset", "reset", ()),
    EndpointCase("empty_body", "empty_body", ("HTTP 200",)),
    EndpointCase("oversized-body", "oversized", ("KiB",)),
    # A byte every 0.2 s: each read succeeds, only a deadline on the whole answer stops it.
    EndpointCase(
        "slow_drip-cut-by-the-deadline",
        "slow_drip",
        (),
        {"seconds": 0.2},
        {"http_timeout_seconds": 0.5},
        TIMED_OUT,
    ),
    EndpointCase(
        "hang-cut-by-the-timeout", "hang", (), {}, {"http_timeout_seconds": 0.5}, TIMED_OUT
    ),
]


@pytest.mark.parametrize("case", TRANSIENT_CASES, ids=[c.id for c in TRANSIENT_CASES])
def test_a_transient_endpoint_failure_is_retried_then_exits_75_leaving_everything_intact(
    case: EndpointCase,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
    bot: FakeBot,
) -> None:
    settings = bundle.write_settings(**{**FAST_BACKOFF, **case.settings})
    before = snapshot(bundle.token_file)
    schwab.set_default(case.mode, **case.params)

    # 3 attempts of at most http_timeout_seconds each, backoff of at most 2 s in all.
    limit = 3 * float(settings["http_timeout_seconds"]) + 2 * settings["backoff_max_seconds"] + 4
    started = time.monotonic()
    try:
        result = run_sender("--once", timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"--once was still running after {limit:.0f}s: the endpoint's answer is not "
            f"bounded by http_timeout_seconds={settings['http_timeout_seconds']}"
        )
    elapsed = time.monotonic() - started

    assert_no_traceback(result)
    assert result.returncode == EX_TEMPFAIL, result.stderr
    fragments = (f"after {ONCE_ATTEMPTS} attempts", *case.fragments)
    line = assert_one_problem_line(result, fragments, case.pattern)
    assert "<HTML" not in line.upper() and "Access Denied" not in result.stderr, "body logged"
    warnings = [ln for ln in result.stderr.splitlines() if " WARNING: " in ln]
    assert [bool(re.search(rf"attempt {n}\b", w)) for n, w in enumerate(warnings, 1)] == [True] * (
        ONCE_ATTEMPTS - 1
    ), f"one WARNING per retried attempt expected:\n{result.stderr}"
    assert all("retrying in" in w for w in warnings), result.stderr
    requests = schwab.token_requests
    assert len(requests) == ONCE_ATTEMPTS, [r.mode for r in requests]
    assert not any(r.path == REDIRECT_TARGET_PATH for r in schwab.requests), "redirect followed"
    assert snapshot(bundle.token_file) == before, "the token file was changed"
    assert bot.connections == [], "the bot must receive nothing"
    assert elapsed < limit
    if case.mode == "rate_limited":
        gaps = [b.time - a.time for a, b in zip(requests, requests[1:])]
        assert all(gap >= 0.9 for gap in gaps), f"Retry-After: 1 not honoured: {gaps}"


def test_an_endpoint_that_refuses_connections_is_retried_then_exits_75(
    bundle: Bundle, run_sender: RunSender, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_settings(**FAST_BACKOFF)
    before = snapshot(bundle.token_file)
    schwab.stop()

    result = run_sender("--once")

    assert_no_traceback(result)
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert_one_problem_line(result, ("after 3 attempts", "connection refused"), None)
    assert snapshot(bundle.token_file) == before
    assert bot.connections == []


@pytest.mark.parametrize("rotate", [True, False], ids=["new-refresh-token", "same-refresh-token"])
@pytest.mark.parametrize("mode", ["success", "success_without_refresh_token"])
def test_a_successful_refresh_rewrites_only_what_the_endpoint_returned(
    mode: str,
    rotate: bool,
    bundle: Bundle,
    run_sender: RunSender,
    schwab: FakeSchwab,
    bot: FakeBot,
) -> None:
    before = bundle.read_tokens()
    schwab.rotate = rotate
    schwab.set_default(mode)

    started = int(time.time())
    result = run_sender("--once")
    finished = int(time.time())

    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert problem_lines(result) == []
    issued = schwab.latest
    assert issued is not None
    after = bundle.read_tokens()
    token = after["token"]
    assert token["access_token"] == issued.access_token != ACCESS_TOKEN
    if mode == "success" and rotate:
        assert issued.refresh_token != REFRESH_TOKEN
        assert token["refresh_token"] == issued.refresh_token, "the returned one must be kept"
    else:
        assert token["refresh_token"] == REFRESH_TOKEN, "the old one must be kept"
    assert token["id_token"] == issued.id_token
    assert type(token["expires_at"]) is int
    assert started + issued.expires_in <= token["expires_at"] <= finished + issued.expires_in
    assert token["expires_in"] == issued.expires_in
    assert after["creation_timestamp"] == before["creation_timestamp"]
    assert after["x_unknown_top_level"] == "kept"
    assert token["x_unknown_token_field"] == {"kept": True}
    assert set(after) == set(before)
    assert set(token) == set(before["token"])
    assert bot.wait_for(1, timeout=1)
    assert bot.payloads[0] == {
        "access_token": issued.access_token,
        "refresh_token": token["refresh_token"],
        "expires_at": token["expires_at"],
    }
