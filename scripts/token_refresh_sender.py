#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = ["pyyaml>=6"]
# ///
"""Keep a trading bot supplied with fresh Schwab access tokens.

What the daemon does, step by step:

1. Resolve settings: built-in defaults, then the optional settings file
   (``configs/token_refresh_sender.yaml``), then the command line. Default paths are
   relative to the bundle root (the folder above ``scripts/``), never to the working
   directory.
2. Validate the app config (``app_key``, ``app_secret``) and the schwab-py token file,
   including their permissions; fail fast with one line and a sysexits code.
3. Tell systemd READY=1 (when ``NOTIFY_SOCKET`` is set) and remove temporary files that
   a crash may have left next to the token file.
4. If the access token on disk is valid for longer than the margin, hand it to the bot
   now; otherwise refresh first.
5. Refresh at ``expires_at - refresh_margin_seconds`` (never later than
   ``max_refresh_interval_seconds`` after the last refresh): under an exclusive lock,
   re-read the file, adopt a fresher token another writer left there, or call Schwab's
   ``refresh_token`` grant, then rewrite the file atomically keeping
   ``creation_timestamp`` and every unknown field.
6. Push ``{"access_token", "refresh_token", "expires_at"}`` to the bot's Unix socket,
   after checking that the path is a socket whose listener is an allowed user.
7. Sleep on one ``select``: the refresh timer, the watchdog, inotify on the bot's socket
   (on its folder while it is missing) and on the token file's folder (a restarted bot
   gets a token at once; a new login written by another program is picked up), and
   signals.
8. Transient endpoint failures back off exponentially with full jitter; a rejected
   refresh token stops the refreshes, keeps delivering the still-valid access token, and
   waits for a new login (the token file changing) or SIGHUP/SIGUSR1.

Run it as ``scripts/run_token_sender.sh`` (uv), ``uv run scripts/token_refresh_sender.py``
or ``python3 scripts/token_refresh_sender.py`` where PyYAML is installed. ``--help`` lists
the options; README.md documents settings, exit codes, signals and log messages.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import pwd
import random
import secrets
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from types import FrameType
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Set,
    Tuple,
    Union,
)

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the host
    sys.stderr.write("token_refresh_sender: error: PyYAML is not installed: run the sender with "
                     "scripts/run_token_sender.sh (uv installs it) or 'pip install pyyaml'\n")
    raise SystemExit(78) from None

VERSION = "1.0.0"
PROG = "token_refresh_sender"

BUNDLE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_APP_CONFIG = BUNDLE_ROOT / "configs" / "schwab_app_config.yaml"
DEFAULT_TOKEN_FILE = BUNDLE_ROOT / "configs" / "schwab_tokens.json"
DEFAULT_SETTINGS_FILE = BUNDLE_ROOT / "configs" / "token_refresh_sender.yaml"
DEFAULT_LOG_FILE = BUNDLE_ROOT / "logs" / "token_refresh_sender.log"
DEFAULT_STATE_FILE = BUNDLE_ROOT / "logs" / "token_refresh_sender.state.json"
DEFAULT_SOCKET = Path("/tmp/bigbrother_token.sock")  # noqa: S108 - the bot's fixed path
DEFAULT_TOKEN_URL = "https://api.schwabapi.com/v1/oauth/token"  # noqa: S105 - a URL
LOGIN_COMMAND = "scripts/run_token_sender.sh --login"

# sysexits.h codes: systemd units and cron wrappers can tell the failure classes apart.
EXIT_OK = 0
EXIT_USAGE = 64
EXIT_DATAERR = 65  # a file is malformed
EXIT_NOINPUT = 66  # a file is missing
EXIT_UNAVAILABLE = 69  # the bot rejected the token, or the socket's listener is not allowed
EXIT_SOFTWARE = 70  # a bug
EXIT_CANTCREAT = 73  # the token file (or log) could not be written
EXIT_TEMPFAIL = 75  # the endpoint failed transiently
EXIT_NOPERM = 77  # the refresh token was rejected: a new login is needed
EXIT_CONFIG = 78  # bad settings or unsafe permissions

BOT_MAX_MESSAGE = 4096  # the bot does one recv() of at most 4095 bytes
BOT_EXPIRY_MARGIN = 300  # the bot treats a token as expired 5 minutes early
MAX_RESPONSE_BYTES = 256 * 1024  # a token response is about 2 KiB
MAX_BOT_REPLY = 64
ONCE_REFRESH_ATTEMPTS = 3
POLL_INTERVAL = 2.0  # used only where inotify is unavailable
WARN_REPEAT_SECONDS = 6 * 3600
WARN_EVERY_REFRESH_SECONDS = 12 * 3600
FINGERPRINT_HEX = 8
WRITE_RETRY_SECONDS = 30
URGENT_BACKOFF_SECONDS = 30  # longest backoff while the bot's token is about to die
QUICK_RETRY_WINDOW = 1.0  # after a new bot socket appears, retry a refused connect ...
QUICK_RETRY_SECONDS = 0.05  # ... this often, so the bot has its token within a second


# --------------------------------------------------------------------------- errors


class SenderError(Exception):
    """An expected failure: one line for the user, and the exit code that classifies it."""

    exit_code = EXIT_SOFTWARE


class SettingsError(SenderError):
    exit_code = EXIT_CONFIG


class UnsafePermissions(SenderError):
    exit_code = EXIT_CONFIG


class MissingFile(SenderError):
    exit_code = EXIT_NOINPUT


class MalformedFile(SenderError):
    exit_code = EXIT_DATAERR


class WriteFailed(SenderError):
    exit_code = EXIT_CANTCREAT


class LockTimeout(SenderError):
    """Another process held the token file's lock for too long: try again later."""

    exit_code = EXIT_TEMPFAIL


class RefreshRejected(SenderError):
    """Schwab refused the refresh token: only a new interactive login helps."""

    exit_code = EXIT_NOPERM


class LoginRejected(SenderError):
    """Schwab refused the authorization code (expired, reused, wrong redirect or client)."""

    exit_code = EXIT_NOPERM


class BadRedirect(SenderError):
    """The URL pasted after the login is not the callback of this app."""

    exit_code = EXIT_DATAERR


class TransientRefreshError(SenderError):
    """The endpoint failed in a way that retrying may fix."""

    exit_code = EXIT_TEMPFAIL

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StopRequested(Exception):
    """Raised from the signal handler to abandon a blocking network call on SIGTERM."""


# ------------------------------------------------------------------- secret hygiene


def fingerprint(value: str) -> str:
    """Identify a token in logs without revealing it."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]


class Redactor(logging.Filter):
    """Last line of defence: replace any known secret that reaches a log line."""

    RECENT = 12  # tokens of the last few refreshes; older ones are dead anyway

    def __init__(self) -> None:
        super().__init__()
        self._pinned: Set[str] = set()  # the app secret
        self._recent: Dict[str, None] = {}  # insertion-ordered: a bounded set of tokens

    def pin(self, value: str) -> None:
        if value:
            self._pinned.add(value)

    def add(self, *values: Optional[str]) -> None:
        for value in values:
            if value and len(value) >= 6:
                self._recent.pop(value, None)
                self._recent[value] = None
        while len(self._recent) > self.RECENT:  # a daemon must not grow with every refresh
            del self._recent[next(iter(self._recent))]

    def redact(self, text: str) -> str:
        for value in [*self._pinned, *self._recent]:
            if value in text:
                text = text.replace(value, f"<redacted:{fingerprint(value)}>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        return True


REDACTOR = Redactor()
log = logging.getLogger(PROG)


def printable(text: str, limit: int = 200) -> str:
    """Cap and flatten text that came from outside (an error description) for one log line."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    return flat if len(flat) <= limit else flat[:limit] + "..."


def when(ts: float) -> str:
    """A Unix time as local time and UTC, e.g. '2026-12-03 17:20:00 CET (16:20:00 UTC)'."""
    try:
        utc = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
        local = utc.astimezone()
    except (ValueError, OverflowError, OSError):
        return f"Unix time {ts!r}"
    if local.utcoffset() == dt.timedelta(0):
        return f"{utc:%Y-%m-%d %H:%M:%S} UTC"
    return f"{local:%Y-%m-%d %H:%M:%S %Z} ({utc:%Y-%m-%d %H:%M:%S} UTC)"


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "forever"
    seconds = int(abs(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def login_command(app_path: Path, token_path: Path, settings_path: Optional[Path]) -> str:
    """The exact command that performs the weekly login for the files in use."""
    import shlex

    words = [str(BUNDLE_ROOT / "scripts" / "run_token_sender.sh"), "--login"]
    if app_path != DEFAULT_APP_CONFIG:
        words += ["--app-config", str(app_path)]
    if token_path != DEFAULT_TOKEN_FILE:
        words += ["--token-file", str(token_path)]
    if settings_path is not None:
        words += ["--config", str(settings_path.absolute())]
    return " ".join(shlex.quote(word) for word in words)


# ------------------------------------------------------------------------ settings

Number = Union[int, float]


@dataclasses.dataclass
class Settings:
    """Every tunable, with its default. The settings file may set each field by name."""

    token_url: str = DEFAULT_TOKEN_URL
    socket_path: Path = DEFAULT_SOCKET
    refresh_margin_seconds: float = 600
    max_refresh_interval_seconds: float = 1500
    http_timeout_seconds: float = 30
    socket_timeout_seconds: float = 5
    socket_retries: int = 3
    socket_retry_delay_seconds: float = 5
    backoff_initial_seconds: float = 5
    backoff_max_seconds: float = 300
    refresh_token_lifetime_days: float = 7
    refresh_token_warn_hours: float = 48
    allowed_peer_users: Tuple[Union[str, int], ...] = ()
    log_file: Optional[Path] = DEFAULT_LOG_FILE
    log_level: str = "INFO"
    state_file: Path = DEFAULT_STATE_FILE
    ca_file: Optional[Path] = None

    @property
    def allowed_uids(self) -> Set[int]:
        """Root and our own user are always trusted; the rest were resolved at load time."""
        uids = {0, os.geteuid()}
        for user in self.allowed_peer_users:
            uids.add(user if isinstance(user, int) else pwd.getpwnam(user).pw_uid)
        return uids


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# name -> (minimum, exclusive?) for numeric settings
# name -> (minimum, is the minimum excluded?, maximum) for numeric settings. The maxima only
# keep absurd values (1e30, inf) from reaching timers and date arithmetic.
_NUMERIC_LIMITS: Dict[str, Tuple[float, bool, float]] = {
    "refresh_margin_seconds": (0, False, 86400),
    "max_refresh_interval_seconds": (0, True, 7 * 86400),
    "http_timeout_seconds": (0, True, 3600),
    "socket_timeout_seconds": (0, True, 3600),
    "socket_retries": (0, False, 1000),
    "socket_retry_delay_seconds": (0, False, 3600),
    "backoff_initial_seconds": (0, True, 86400),
    "backoff_max_seconds": (0, True, 86400),
    "refresh_token_lifetime_days": (0, True, 3650),
    "refresh_token_warn_hours": (0, False, 3650 * 24),
}
_PATH_SETTINGS = ("socket_path", "log_file", "state_file", "ca_file")


def _setting_number(name: str, value: Any) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"setting {name}: expected a number, got {value!r}")
    if name == "socket_retries" and not isinstance(value, int):
        raise SettingsError(f"setting {name}: expected a whole number, got {value!r}")
    minimum, exclusive, maximum = _NUMERIC_LIMITS[name]
    if not math.isfinite(value):
        raise SettingsError(f"setting {name}: expected a finite number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        bound = "greater than" if exclusive else "at least"
        raise SettingsError(f"setting {name}: must be {bound} {minimum}, got {value!r}")
    if value > maximum:
        raise SettingsError(f"setting {name}: must be at most {maximum:g}, got {value!r}")
    return value


def _setting_path(name: str, value: Any) -> Optional[Path]:
    if name == "log_file" and value in ("-", None):
        return None
    if name == "ca_file" and value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SettingsError(f"setting {name}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else BUNDLE_ROOT / path


def _setting_users(value: Any) -> Tuple[Union[str, int], ...]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise SettingsError(f"setting allowed_peer_users: expected a list of users, got {value!r}")
    users: List[Union[str, int]] = []
    for user in value:
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise SettingsError(f"setting allowed_peer_users: {user!r} is not a user name or uid")
        if isinstance(user, str):
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise SettingsError(
                    f"setting allowed_peer_users: no such user {user!r} on this host"
                ) from None
        users.append(user)
    return tuple(users)


def validate_token_url(url: Any) -> str:
    """https:// only, except plain http:// to a loopback host (local fakes and trials)."""
    if not isinstance(url, str):
        raise SettingsError(f"setting token_url: expected a URL, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise SettingsError(f"setting token_url: {url!r} is not an https:// URL")
    if parts.scheme == "http" and not _is_loopback(host):
        raise SettingsError(
            f"setting token_url: {url!r} uses plain http; only https:// is allowed "
            "(http:// only for loopback hosts such as 127.0.0.1)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingsError(f"setting token_url: {url!r} has an invalid port") from None
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def apply_setting(settings: Settings, name: str, value: Any) -> None:
    """Validate one setting by name and store it; every source of settings goes through here."""
    if name == "token_url":
        settings.token_url = validate_token_url(value)
    elif name in _NUMERIC_LIMITS:
        setattr(settings, name, _setting_number(name, value))
    elif name in _PATH_SETTINGS:
        path = _setting_path(name, value)
        if path is None and name in ("socket_path", "state_file"):
            raise SettingsError(f"setting {name}: expected a path, got {value!r}")
        setattr(settings, name, path)
    elif name == "allowed_peer_users":
        settings.allowed_peer_users = _setting_users(value)
    elif name == "log_level":
        if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"setting log_level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}"
            )
        settings.log_level = value.upper()
    else:
        known = ", ".join(f.name for f in dataclasses.fields(Settings))
        raise SettingsError(f"unknown setting {name!r} (known settings: {known})")


def _check_consistency(settings: Settings) -> None:
    if settings.backoff_max_seconds < settings.backoff_initial_seconds:
        raise SettingsError(
            "setting backoff_max_seconds: must be at least backoff_initial_seconds "
            f"({settings.backoff_max_seconds} < {settings.backoff_initial_seconds})"
        )
    if settings.ca_file is not None and not settings.ca_file.is_file():
        raise SettingsError(f"setting ca_file: {settings.ca_file} is not a readable file")


def read_settings_file(path: Path) -> Dict[str, Any]:
    """The settings file as a mapping; an empty file means all defaults."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFile(
            f"settings file {path} does not exist "
            "(copy configs/token_refresh_sender.yaml.example, or omit --config)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"settings file {path}: cannot read it: {_reason(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path}: invalid YAML{_yaml_where(exc)}") from None
    except RecursionError:
        raise SettingsError(f"settings file {path}: nested too deeply to be settings") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"settings file {path}: expected a mapping of settings, got {type(data).__name__}"
        )
    return data


def load_settings(
    path: Path, explicit: bool, overrides: Mapping[str, Any]
) -> Settings:
    """Defaults, then the settings file, then the command line."""
    settings = Settings()
    if explicit or path.exists():
        for name, value in read_settings_file(path).items():
            try:
                apply_setting(settings, str(name), value)
            except SettingsError as exc:
                raise SettingsError(f"settings file {path}: {exc}") from None
    for name, value in overrides.items():
        if value is not None:
            apply_setting(settings, name, value)
    _check_consistency(settings)
    return settings


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or ""
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}".rstrip(": ")
    return f": {problem}" if problem else ""


# ---------------------------------------------------------------------- app config


@dataclasses.dataclass(frozen=True)
class AppConfig:
    app_key: str
    app_secret: str = dataclasses.field(repr=False)
    callback_url: Optional[str] = None


def check_secret_permissions(path: Path, what: str) -> None:
    """Refuse a secret file that other users can read or write; warn once about group access."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it will report the problem
    if stat.S_ISDIR(mode):
        raise MalformedFile(f"{what} {path} is a directory, not a file (a container bind "
                            "mount of a missing file creates one): remove it and put the file "
                            "there")
    if not stat.S_ISREG(mode):
        raise MalformedFile(f"{what} {path} is not a regular file")
    if mode & 0o007:
        raise UnsafePermissions(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}): "
            f"run 'chmod 600 {path}'"
        )
    if mode & 0o070:
        log.warning(
            "%s %s is accessible by its group (mode %04o); fine if a dashboard shares it, "
            "otherwise run 'chmod 600 %s'",
            what, path, stat.S_IMODE(mode), path,
        )


def load_app_config(path: Path) -> AppConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFile(
            f"app config {path} does not exist: copy configs/schwab_app_config.yaml.example "
            "there, fill in app_key and app_secret, and chmod 600 it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedFile(f"app config {path}: cannot read it: {_reason(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MalformedFile(f"app config {path}: invalid YAML{_yaml_where(exc)}") from None
    except RecursionError:
        raise MalformedFile(f"app config {path}: nested too deeply to be an app config") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise MalformedFile(f"app config {path}: expected a mapping with app_key and app_secret, "
                            f"the file is {kind}")
    values: Dict[str, str] = {}
    for key in ("app_key", "app_secret"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise MalformedFile(f"app config {path}: {key}: expected a non-empty string, "
                                f"{'missing' if value is None else 'got ' + type(value).__name__}")
        if not is_token_text(value.strip()):
            raise MalformedFile(f"app config {path}: {key}: contains characters an app "
                                "credential cannot have (expected printable ASCII)")
        values[key] = value.strip()
    callback = data.get("callback_url")
    config = AppConfig(values["app_key"], values["app_secret"],
                       callback if isinstance(callback, str) else None)
    REDACTOR.pin(config.app_secret)
    return config


# ---------------------------------------------------------------------- token file


@dataclasses.dataclass(frozen=True)
class Token:
    """A parsed schwab-py token file. ``document`` keeps every field for the rewrite."""

    document: Dict[str, Any] = dataclasses.field(repr=False)

    @property
    def body(self) -> Dict[str, Any]:
        token: Dict[str, Any] = self.document["token"]
        return token

    @property
    def access_token(self) -> str:
        return str(self.body.get("access_token") or "")

    @property
    def refresh_token(self) -> str:
        return str(self.body["refresh_token"])

    @property
    def expires_at(self) -> int:
        return int(self.body["expires_at"])

    @property
    def lifetime(self) -> float:
        """The access token's lifetime as issued (Schwab: 1800 s)."""
        expires_in = self.body.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
            return 1800.0
        return float(expires_in) if expires_in > 0 else 1800.0

    @property
    def creation_timestamp(self) -> Optional[float]:
        value = self.document.get("creation_timestamp")
        return float(value) if isinstance(value, (int, float)) else None

    def valid_for(self, now: float) -> float:
        return self.expires_at - now

    def refresh_margin(self, margin: float) -> float:
        """Refresh this long before expires_at: the setting, at most half the lifetime."""
        return min(margin, self.lifetime / 2)

    def refresh_token_expiry(self, lifetime_days: float) -> Optional[float]:
        """When the refresh token dies: lifetime_days after the login, if that is known."""
        created = self.creation_timestamp
        return None if created is None else created + lifetime_days * 86400


def give_to_folder_owner(fd: int, folder: Path) -> None:
    """Run as root (a manual --once or --login), leave files the service user can open."""
    if os.geteuid() != 0:
        return
    st = folder.stat()
    if os.fstat(fd).st_uid != st.st_uid:
        os.fchown(fd, st.st_uid, st.st_gid)


def parse_token_document(raw: bytes, path: Path) -> Token:
    """Parse and check the fields we rely on; keep everything else untouched."""
    where = f"token file {path}"
    if not raw.strip():
        raise MalformedFile(f"{where} is empty (a writer may have been interrupted): "
                            f"restore it from a backup or run {LOGIN_COMMAND}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise MalformedFile(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MalformedFile(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                            f"{exc.msg} (truncated or half-written?)") from None
    except ValueError as exc:
        raise MalformedFile(f"{where}: invalid JSON: {exc}") from None
    except RecursionError:
        raise MalformedFile(f"{where}: nested too deeply to be a token file") from None
    if not isinstance(doc, dict):
        raise MalformedFile(f"{where}: expected a JSON object, got {_json_type(doc)}")
    token = doc.get("token")
    if not isinstance(token, dict):
        raise MalformedFile(f"{where}: token: expected an object with the tokens, "
                            f"{'missing' if token is None else 'got ' + _json_type(token)}")
    _expect(token, "refresh_token", str, where, nonempty=True)
    _expect(token, "access_token", str, where, nonempty=False)
    _expect(token, "expires_at", int, where, nonempty=False)
    for key in ("access_token", "refresh_token"):
        if not is_token_text(token[key]):
            raise MalformedFile(f"{where}: token.{key}: contains characters no token has "
                                "(expected printable ASCII)")
    if not plausible_time(token["expires_at"]):
        raise MalformedFile(f"{where}: token.expires_at: expected a Unix time in seconds, "
                            f"got {token['expires_at']}")
    created = doc.get("creation_timestamp")
    if created is not None and (isinstance(created, bool)
                                or not isinstance(created, (int, float))
                                or not plausible_time(created)):
        shown = _json_type(created) if not isinstance(created, (int, float)) else repr(created)
        raise MalformedFile(f"{where}: creation_timestamp: expected a Unix time in seconds, "
                            f"got {shown}")
    parsed = Token(doc)
    REDACTOR.add(parsed.access_token, parsed.refresh_token, token.get("id_token"))
    return parsed


def is_token_text(value: str) -> bool:
    """OAuth tokens are printable ASCII; anything else cannot be sent in a header or JSON."""
    return value.isascii() and value.isprintable()


def plausible_time(value: float) -> bool:
    """Between 1970 and 9999: the range datetime (and every reader of the file) can show."""
    return math.isfinite(value) and 0 <= value < 253402300800


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _expect(obj: Dict[str, Any], key: str, kind: type, where: str, nonempty: bool) -> None:
    value = obj.get(key)
    wanted = "an integer" if kind is int else "a string"
    if value is None:
        raise MalformedFile(f"{where}: token.{key}: missing (expected {wanted})")
    if isinstance(value, bool) or not isinstance(value, kind) or (nonempty and not value):
        got = "an empty string" if value == "" else _json_type(value)
        raise MalformedFile(f"{where}: token.{key}: expected {wanted}, got {got}")


def merge_refresh(token: Token, answer: Dict[str, Any], now: float) -> Token:
    """The token file after a refresh: new values in, creation_timestamp and unknowns kept."""
    doc = copy.deepcopy(token.document)
    body = doc["token"]
    body["access_token"] = answer["access_token"]
    # Schwab does not document whether it rotates refresh tokens: keep whatever came back.
    body["refresh_token"] = answer.get("refresh_token") or token.refresh_token
    body["expires_in"] = int(answer["expires_in"])
    body["expires_at"] = int(now + int(answer["expires_in"]))
    for key in ("token_type", "scope", "id_token"):
        if key in answer:
            body[key] = answer[key]
    return Token(doc)


class AtomicFile:
    """Write-then-rename with fsyncs: a reader sees the old file or the new one, never a mix."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def remove_temps(self) -> int:
        """Remove the temporary files of writes that a crash interrupted."""
        removed = 0
        for temp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                temp.unlink()
                removed += 1
        return removed

    def write(self, data: bytes, durable: bool = True, mode: int = 0o600) -> None:
        folder = self.path.parent
        owner: Optional[Tuple[int, int]] = None
        try:
            old = self.path.stat()
            # Never wider than it was, and never anything for "other".
            mode = stat.S_IMODE(old.st_mode) & 0o660 | 0o600
            owner = (old.st_uid, old.st_gid)
        except FileNotFoundError:
            # A first file created by root (e.g. --login) belongs to whoever owns the folder:
            # the service user must be able to rewrite it.
            folder_stat = folder.stat()
            owner = (folder_stat.st_uid, folder_stat.st_gid)
        temp = folder / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)  # umask may have narrowed it
                if owner is not None and os.geteuid() == 0:
                    os.fchown(handle.fileno(), *owner)
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            temp.replace(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        if durable:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class TokenStore:
    """The token file: read, lock, rewrite atomically, clean crash leftovers."""

    LOCK_POLL = 0.05

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.file = AtomicFile(path)

    def read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise MissingFile(
                f"token file {self.path} does not exist: log in once with {LOGIN_COMMAND} "
                "or copy a schwab-py token file there (chmod 600)"
            ) from None
        except OSError as exc:
            raise MalformedFile(f"token file {self.path}: cannot read it: {_reason(exc)}") from None

    def read(self, attempts: int = 3) -> Token:
        """Parse the file, giving an in-place writer (schwab-py) a moment to finish."""
        for attempt in range(attempts):
            try:
                return parse_token_document(self.read_bytes(), self.path)
            except MalformedFile:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def signature(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Exclusive flock on the sidecar lock file, so two senders never refresh twice.

        When the folder cannot be written at all (read-only, full, wrong owner), the lock is
        taken on a read-only descriptor or skipped: the token file cannot be written either,
        but the bot must still get the refreshed token.
        """
        fd = self._open_lock()
        if fd is None:
            yield
            return
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"lock file {self.lock_path} is held by another process for "
                            f"over {timeout:.0f}s"
                        ) from None
                    time.sleep(self.LOCK_POLL)
            yield
        finally:
            os.close(fd)

    def _open_lock(self) -> Optional[int]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            give_to_folder_owner(fd, self.lock_path.parent)
            return fd
        except OSError as exc:
            reason = _reason(exc)
        try:
            return os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            log.warning("cannot create lock file %s (%s): refreshing without the lock; "
                        "the folder %s must be writable by this user", self.lock_path, reason,
                        self.path.parent)
            return None

    def write(self, token: Token) -> None:
        data = (json.dumps(token.document, indent=2) + "\n").encode()
        try:
            self.file.write(data)
        except OSError as exc:
            raise WriteFailed(
                f"could not write token file {self.path}: {_reason(exc)}; "
                "the previous file is intact"
            ) from None

    def clean_stale_temps(self) -> int:
        """Remove temporary files a crash left behind (call with the lock held)."""
        return self.file.remove_temps()


# -------------------------------------------------------------------- OAuth client


class OAuthClient:
    """Schwab's token endpoint: one bounded attempt per call, errors classified for retry."""

    def __init__(self, settings: Settings, app: AppConfig) -> None:
        self.url = urllib.parse.urlsplit(settings.token_url)
        self.timeout = settings.http_timeout_seconds
        self.ca_file = settings.ca_file
        self.app = app
        self._context: Any = None

    def refresh(self, refresh_token: str) -> Dict[str, Any]:
        return self._token_request({"grant_type": "refresh_token",
                                    "refresh_token": refresh_token})

    def exchange_code(self, code: str, redirect_uri: str) -> Dict[str, Any]:
        """The authorization-code grant of the interactive login."""
        try:
            answer = self._token_request({"grant_type": "authorization_code", "code": code,
                                          "redirect_uri": redirect_uri})
        except RefreshRejected as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise LoginRejected(f"Schwab rejected the login: {detail}; authorization codes "
                                "are single-use and expire within minutes: log in again"
                                ) from None
        if not answer.get("refresh_token"):
            raise TransientRefreshError("token endpoint answered the login without a "
                                        "refresh_token")
        return answer

    def _token_request(self, form: Dict[str, str]) -> Dict[str, Any]:
        body = urllib.parse.urlencode(form).encode()
        credentials = f"{self.app.app_key}:{self.app.app_secret}".encode()
        headers = {
            "Authorization": "Basic " + base64.b64encode(credentials).decode(),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": f"{PROG}/{VERSION}",
        }
        status, reply_headers, data = self._post(body, headers)
        return classify_answer(status, reply_headers, data)

    def _connection(self) -> Any:
        import http.client  # imported on first refresh: keeps start-up and idle memory small

        host = self.url.hostname or ""
        port = self.url.port
        proxy = _proxy_for(self.url)
        target_host, target_port = (proxy.hostname or "", proxy.port) if proxy else (host, port)
        conn: Any
        if self.url.scheme == "https":
            conn = http.client.HTTPSConnection(target_host, target_port or (
                (proxy and 3128) or 443), timeout=self.timeout, context=self._tls_context())
        else:
            conn = http.client.HTTPConnection(target_host, target_port or 80,
                                              timeout=self.timeout)
        if proxy:
            conn.set_tunnel(host, port or 443)
        return conn

    def _tls_context(self) -> Any:
        """Built once: loading the CA store costs ~50 ms of CPU and memory at each refresh."""
        if self._context is None:
            import ssl

            self._context = ssl.create_default_context()
            if self.ca_file is not None:
                self._context.load_verify_locations(cafile=str(self.ca_file))
        return self._context

    def _post(self, body: bytes, headers: Dict[str, str]) -> Tuple[int, Any, bytes]:
        """One POST with a hard deadline on the whole exchange, not only on each read."""
        import http.client
        import ssl

        conn = self._connection()
        expired = threading.Event()
        deadline = time.monotonic() + self.timeout
        # http.client forgets conn.sock when the server says "Connection: close", while the
        # response still reads from it: keep our own reference so the deadline can cut it.
        opened: List[socket.socket] = []

        def cut() -> None:
            expired.set()
            for sock in [*opened, conn.sock]:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout, cut)
        timer.daemon = True
        timer.start()
        path = self.url.path or "/"
        if self.url.query:
            path += "?" + self.url.query
        endpoint = f"{self.url.scheme}://{self.url.netloc}"
        try:
            conn.connect()
            opened.append(conn.sock)
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            data = _read_bounded(response, MAX_RESPONSE_BYTES, deadline)
            if expired.is_set():  # the cut reads as a clean end of a truncated body
                raise socket.timeout
            return response.status, response.headers, data
        except ssl.SSLCertVerificationError as exc:
            raise TransientRefreshError(
                f"TLS certificate of {endpoint} could not be verified ({exc.verify_message}); "
                "if a proxy intercepts TLS here, set ca_file to its CA bundle"
            ) from None
        except ssl.SSLError as exc:
            raise TransientRefreshError(f"TLS error talking to {endpoint}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set() or isinstance(exc, socket.timeout):
                raise TransientRefreshError(
                    f"{endpoint} did not answer within {self.timeout:g}s"
                ) from None
            raise TransientRefreshError(
                f"cannot reach {endpoint}: {_network_reason(exc)}"
            ) from None
        finally:
            timer.cancel()
            conn.close()


def _proxy_for(url: urllib.parse.SplitResult,
               environ: Mapping[str, str] = os.environ) -> Optional[urllib.parse.SplitResult]:
    """Honour https_proxy and no_proxy as curl and urllib do (a CONNECT tunnel)."""
    proxy = environ.get("https_proxy") or environ.get("HTTPS_PROXY")
    if url.scheme != "https" or not proxy:
        return None
    host = (url.hostname or "").lower()
    for entry in (environ.get("no_proxy") or environ.get("NO_PROXY") or "").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)


def _network_reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed ({exc.strerror})"
    return printable(_reason(exc), 120)


def _read_bounded(response: Any, limit: int, deadline: float) -> bytes:
    """Read the body: at most `limit` bytes, and not past the deadline however slow it drips."""
    chunks: List[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise socket.timeout
        chunk = response.read1(16384)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise TransientRefreshError(
                f"token endpoint sent more than {limit // 1024} KiB; answer ignored"
            )
        chunks.append(chunk)


def _retry_after(headers: Any) -> Optional[float]:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


REJECTION_ERRORS = {"invalid_grant", "invalid_client", "unsupported_token_type",
                    "unauthorized_client"}


def classify_answer(status: int, headers: Any, data: bytes) -> Dict[str, Any]:
    """A usable token answer, or the exception that says what went wrong (never the body)."""
    try:
        parsed: Any = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        parsed = None
    error = description = ""
    if isinstance(parsed, dict):
        error = printable(str(parsed.get("error") or ""), 60)
        description = printable(str(parsed.get("error_description") or ""), 200)
    oauth = f" ({error}: {description})" if error or description else ""

    if status == 200:
        return _usable_answer(parsed)
    if 300 <= status < 400:
        location = headers.get("Location", "") if headers is not None else ""
        target = urllib.parse.urlsplit(location).netloc or "elsewhere"
        raise TransientRefreshError(
            f"token endpoint answered HTTP {status} redirecting to {printable(target, 80)}; "
            "redirects are not followed (check token_url)"
        )
    if status in (400, 401) and (error in REJECTION_ERRORS or "refresh" in description.lower()
                                 or "refresh_token" in error):
        raise RefreshRejected(
            f"Schwab rejected the refresh token: HTTP {status}{oauth}"
        )
    kind = "not JSON" if parsed is None else "JSON"
    if status == 429:
        raise TransientRefreshError(f"token endpoint is rate limiting: HTTP 429{oauth}",
                                    _retry_after(headers))
    if status >= 500:
        raise TransientRefreshError(f"token endpoint failed: HTTP {status}{oauth}",
                                    _retry_after(headers))
    raise TransientRefreshError(f"token endpoint answered HTTP {status} ({kind}){oauth}",
                                _retry_after(headers))


def _usable_answer(parsed: Any) -> Dict[str, Any]:
    if not isinstance(parsed, dict):
        what = "not JSON" if parsed is None else _json_type(parsed)
        raise TransientRefreshError(f"token endpoint answered HTTP 200 with {what}")
    access = parsed.get("access_token")
    if not isinstance(access, str) or not access:
        raise TransientRefreshError("token endpoint answered HTTP 200 without an access_token")
    if not is_token_text(access):
        raise TransientRefreshError("token endpoint answered HTTP 200 with an access_token "
                                    "that is not printable ASCII")
    refresh = parsed.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not is_token_text(refresh)
                                or not refresh):
        raise TransientRefreshError("token endpoint answered HTTP 200 with an invalid "
                                    "refresh_token")
    expires_in = parsed.get("expires_in", 1800)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or not (
            0 < expires_in <= 86400):
        raise TransientRefreshError("token endpoint answered HTTP 200 with an invalid "
                                    "expires_in")
    for key in ("token_type", "scope", "id_token"):
        if key in parsed and not isinstance(parsed[key], str):
            raise TransientRefreshError(f"token endpoint answered HTTP 200 with an invalid {key}")
    REDACTOR.add(access, refresh, parsed.get("id_token"))
    return dict(parsed, expires_in=expires_in)


def backoff_delay(attempt: int, settings: Settings, retry_after: Optional[float],
                  rng: Callable[[float, float], float] = random.uniform,
                  urgent: bool = False) -> float:
    """Exponential backoff with full jitter, never shorter than a Retry-After (capped).

    urgent: the bot's token dies (by its 5-minute rule) before the next ceiling would be
    reached; back off at most URGENT_BACKOFF_SECONDS so a recovered endpoint is used soon.
    """
    longest = settings.backoff_max_seconds
    if urgent:
        longest = min(longest, URGENT_BACKOFF_SECONDS)
    ceiling = min(longest, settings.backoff_initial_seconds * 2 ** max(0, attempt - 1))
    delay = rng(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.backoff_max_seconds))
    return delay


# ---------------------------------------------------------------------- bot client


class Delivery:
    """Outcomes of one delivery attempt."""

    DELIVERED = "delivered"
    ABSENT = "bot not running"  # no socket file: nobody to deliver to
    RETRY = "no answer"  # refused, timed out or closed without a reply
    REJECTED = "rejected by the bot"
    UNSENDABLE = "not sendable"  # too large for the bot's single read: never sent
    REFUSED = "refused for security"  # not a socket, or a listener we do not trust


@dataclasses.dataclass
class DeliveryResult:
    outcome: str
    detail: str = ""

    @property
    def final(self) -> bool:
        return self.outcome != Delivery.RETRY


class BotClient:
    """The bot's receiver: one message per connection, answered OK or ERROR, then closed."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.socket_path
        self.timeout = settings.socket_timeout_seconds
        self.allowed_uids = settings.allowed_uids

    def inspect(self) -> DeliveryResult:
        """Check the path without sending: exists? a socket (not a link)? who listens?"""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return DeliveryResult(Delivery.ABSENT, f"{self.path} does not exist")
        except OSError as exc:
            return DeliveryResult(Delivery.REFUSED, f"cannot inspect {self.path}: {_reason(exc)}")
        if not stat.S_ISSOCK(st.st_mode):
            return DeliveryResult(Delivery.REFUSED,
                                  f"{self.path} is {_file_kind(st.st_mode)}, not a socket")
        return DeliveryResult(Delivery.DELIVERED)

    def deliver(self, token: Token) -> DeliveryResult:
        payload = json.dumps({"access_token": token.access_token,
                              "refresh_token": token.refresh_token,
                              "expires_at": token.expires_at}, separators=(",", ":")).encode()
        if len(payload) >= BOT_MAX_MESSAGE:
            return DeliveryResult(Delivery.UNSENDABLE,
                                  f"message of {len(payload)} bytes does not fit the bot's "
                                  f"{BOT_MAX_MESSAGE - 1}-byte read; not sent")
        found = self.inspect()
        if found.outcome != Delivery.DELIVERED:
            return found
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except FileNotFoundError:
                return DeliveryResult(Delivery.ABSENT, f"{self.path} disappeared")
            except (ConnectionRefusedError, socket.timeout) as exc:
                return DeliveryResult(Delivery.RETRY, f"connect: {_network_reason(exc)}")
            uid = _peer_uid(sock)
            if uid not in self.allowed_uids:
                return DeliveryResult(
                    Delivery.REFUSED,
                    f"the listener on {self.path} runs as uid {uid} ({_user_name(uid)}), "
                    "which is not in allowed_peer_users; nothing sent")
            sock.sendall(payload)
            reply = _read_reply(sock)
        except socket.timeout:
            return DeliveryResult(Delivery.RETRY, f"no reply within {self.timeout:g}s")
        except OSError as exc:
            return DeliveryResult(Delivery.RETRY, _network_reason(exc))
        finally:
            sock.close()
        if reply == b"OK":
            return DeliveryResult(Delivery.DELIVERED)
        if reply == b"":
            return DeliveryResult(Delivery.RETRY, "the bot closed without a reply")
        if reply == b"ERROR":
            return DeliveryResult(Delivery.REJECTED, "the bot answered ERROR")
        return DeliveryResult(Delivery.REJECTED,
                              f"unexpected reply {printable(reply.decode('latin-1'), 40)!r}")


def _read_reply(sock: socket.socket) -> bytes:
    """Read until the bot closes, bounded in size and (via the socket timeout) in time."""
    deadline = time.monotonic() + (sock.gettimeout() or 5.0)
    reply = b""
    while len(reply) <= MAX_BOT_REPLY:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(MAX_BOT_REPLY)
        except ConnectionResetError:
            if reply:  # the bot answered, then closed with our bytes unread: keep the answer
                break
            raise
        if not chunk:
            break
        reply += chunk
    return reply


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "unknown user"


def _file_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


# ------------------------------------------------------------------------- watcher


class PathWatcher:
    """Tell when watched paths change: inotify, else a 2 s stat poll.

    The token file is watched through its folder. The bot's socket usually lives in /tmp,
    where every other program's files would wake us: while the socket exists only the socket
    itself is watched (for its unlink), and its folder only while it is missing (for its
    creation). Callers compare what is at the path; a spurious report costs one lstat.
    """

    IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
    IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
    IN_DONT_FOLLOW, IN_NONBLOCK, IN_CLOEXEC = 0x2000000, 0o4000, 0o2000000
    MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
            | IN_DELETE_SELF | IN_MOVE_SELF)
    SOCKET_MASK = IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_DONT_FOLLOW
    CREATION_MASK = IN_CREATE | IN_MOVED_TO
    EVENT = struct.Struct("iIII")

    def __init__(self, paths: List[Path], socket_path: Optional[Path] = None,
                 use_inotify: bool = True) -> None:
        self.paths = paths + ([socket_path] if socket_path is not None else [])
        folders = {path.parent for path in paths}
        # A socket sharing a watched folder is seen through that folder's watch.
        self.socket_path = socket_path if socket_path and socket_path.parent not in folders \
            else None
        if socket_path is not None and self.socket_path is None:
            paths = [*paths, socket_path]
        self.fd: Optional[int] = None
        self._libc: Any = None
        self._folders: Dict[int, Path] = {}  # wd -> watched folder
        self._socket_wd: Optional[int] = None  # the socket file itself, or its folder
        self._stats = {path: _stat_signature(path) for path in self.paths}
        if use_inotify:
            self._start_inotify({path.parent for path in paths})

    @property
    def poll_interval(self) -> Optional[float]:
        return None if self.fd is not None else POLL_INTERVAL

    def _start_inotify(self, folders: Set[Path]) -> None:
        try:
            import ctypes

            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self.fd = fd
            for folder in folders:
                self._folders[self._add(folder, self.MASK)] = folder
            self._arm_socket()
            self.changes()  # drop the IN_IGNORED of arming, so an idle start stays asleep
        except (OSError, AttributeError) as exc:
            self.close()
            log.info("inotify unavailable (%s); checking the socket every %gs instead",
                     _reason(exc), POLL_INTERVAL)

    def _add(self, path: Path, mask: int) -> int:
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            import ctypes

            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def _arm_socket(self) -> None:
        """Watch the socket file while it exists, else its folder for its creation."""
        if self.socket_path is None:
            return
        if self._socket_wd is not None:
            self._libc.inotify_rm_watch(self.fd, self._socket_wd)
        # The folder first: a socket created meanwhile is then seen either way.
        self._socket_wd = self._add(self.socket_path.parent, self.CREATION_MASK)
        if os.path.lexists(self.socket_path):
            folder_wd = self._socket_wd
            try:
                self._socket_wd = self._add(self.socket_path, self.SOCKET_MASK)
            except FileNotFoundError:
                return  # gone again: keep watching the folder
            self._libc.inotify_rm_watch(self.fd, folder_wd)

    def changes(self) -> Set[Path]:
        """Watched paths that changed since the last call (drains pending events)."""
        if self.fd is None:
            return self._poll()
        names: Set[Path] = set()
        socket_event = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + self.EVENT.size <= len(data):
                wd, _mask, _cookie, length = self.EVENT.unpack_from(data, offset)
                offset += self.EVENT.size
                name = data[offset:offset + length].rstrip(b"\0")
                offset += length
                if wd == self._socket_wd:
                    socket_event = True
                elif wd in self._folders:
                    names.add(self._folders[wd] / os.fsdecode(name))
        if socket_event and self.socket_path is not None:
            names.add(self.socket_path)
            try:
                self._arm_socket()
            except OSError as exc:  # its folder vanished: fall back to polling
                log.warning("cannot watch %s any more (%s); checking it every %gs",
                            self.socket_path, _reason(exc), POLL_INTERVAL)
                self.close()
        return {path for path in self.paths if path in names}

    def _poll(self) -> Set[Path]:
        changed = set()
        for path in self.paths:
            now = _stat_signature(path)
            if now != self._stats.get(path):
                self._stats[path] = now
                changed.add(path)
        return changed

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _stat_signature(path: Path) -> Optional[Tuple[int, int, int, int]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def release_memory() -> None:
    """Hand freed heap back to the OS (start-up's compiler, a refresh's TLS buffers): the
    daemon then idles at its real size instead of its peak. glibc only; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------- signals and loop


class Signals:
    """Handlers only set flags (and wake the loop through a pipe); the loop acts on them."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False
        self.refresh_now = False
        self.interruptible = False
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop = True
            if self.interruptible:
                raise StopRequested
        elif signum == signal.SIGHUP:
            self.reload = True
        elif signum == signal.SIGUSR1:
            self.refresh_now = True

    @contextlib.contextmanager
    def network_call(self) -> Iterator[None]:
        """A blocking network call that SIGTERM may abandon (no file write happens inside)."""
        if self.stop:
            raise StopRequested
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    @property
    def pending(self) -> bool:
        return self.stop or self.reload or self.refresh_now

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 512):
                pass


class EventLoop:
    """The one place the daemon sleeps: until a timeout, a signal or a watched path changes."""

    def __init__(self, signals: Signals, watcher: PathWatcher) -> None:
        self.signals = signals
        self.watcher = watcher

    def wait(self, timeout: float) -> Set[Path]:
        if self.signals.pending:
            return self.watcher.changes() if self.watcher.fd is not None else set()
        poll = self.watcher.poll_interval
        if poll is not None:
            timeout = min(timeout, poll)
        fds = [self.signals.fileno()] + ([self.watcher.fd] if self.watcher.fd is not None else [])
        with contextlib.suppress(InterruptedError):
            select.select(fds, [], [], max(0.0, timeout))
        self.signals.drain()
        return self.watcher.changes()


# ------------------------------------------------------------------- systemd notify


class Notifier:
    """sd_notify in a few lines of stdlib; a no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        # WATCHDOG_PID is uv's pid when run through the wrapper: do not insist it is ours.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        self._sock: Optional[socket.socket] = None

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(fields).encode()
        for _attempt in range(2):  # the socket is kept (cheaper pings); reopen it once
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.connect(self.address)
                self._sock.sendall(message)
                return
            except OSError as exc:
                log.debug("sd_notify failed: %s", _reason(exc))
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None


# ---------------------------------------------------------------------- state file


class StateFile:
    """What --status shows: outcomes and times, never a secret."""

    def __init__(self, path: Path) -> None:
        self.file = AtomicFile(path)
        # Start from what the last run (or the daemon, for a manual --once) recorded.
        self.data: Dict[str, Any] = {"consecutive_failures": 0, **self.load(path),
                                     "pid": os.getpid()}
        self._warned = False
        self.file.remove_temps()  # at worst a concurrent --once loses one status update

    def update(self, **fields: Any) -> None:
        self.data.update(fields, updated_at=int(time.time()))
        try:
            self.file.write((json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode(),
                            durable=False, mode=0o640)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write state file %s: %s (status output will be stale)",
                            self.file.path, _reason(exc))
                self._warned = True

    @staticmethod
    def load(path: Path) -> Dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------- the daemon


class Clock:
    """Wall time for expiry (Schwab's clock), monotonic time for waiting: injected for tests."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class Sender:
    """Refresh on schedule, persist safely, deliver at once; one cycle or forever."""

    def __init__(self, settings: Settings, app: AppConfig, store: TokenStore,
                 signals: Signals, notifier: Notifier, state: StateFile,
                 rng: Callable[[float, float], float] = random.uniform,
                 clock: Optional[Clock] = None) -> None:
        self.clock = clock or Clock()
        self.settings = settings
        self.app = app
        self.store = store
        self.signals = signals
        self.notifier = notifier
        self.state = state
        self.rng = rng
        self.oauth = OAuthClient(settings, app)
        self.bot = BotClient(settings)
        self.token: Optional[Token] = None
        self.file_signature: Optional[Tuple[int, int, int]] = None
        self.unsaved = False  # a refreshed token we could not write yet: it lives only here
        self.next_write_retry: Optional[float] = None  # monotonic
        self.rejected = False
        self.failures = 0
        self.next_refresh = 0.0  # monotonic
        self.last_refresh_mono: Optional[float] = None
        self.delivered: Optional[str] = None  # fingerprint of the token the bot holds
        self.attempted: Optional[str] = None  # ... of the last token whose delivery ended
        self.delivery_attempts = 0
        self.next_delivery: Optional[float] = None  # monotonic; retry of a failed delivery
        self.quick_retry_until = 0.0  # monotonic; see Daemon.deliver
        self.bot_inode: Optional[Tuple[int, int, int]] = None
        self.last_age_warning: Optional[float] = None
        self.expired_reported = False
        self.refused_reported: Optional[str] = None
        self.login_command = LOGIN_COMMAND

    # -- loading ---------------------------------------------------------------

    def load(self) -> Token:
        """Read the token file at start (and after SIGHUP); clean crash leftovers."""
        with self.store.locked(self.lock_timeout):
            removed = self.store.clean_stale_temps()
            token = self.store.read()
            self.file_signature = self.store.signature()
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted write", removed)
        self.token = token
        return token

    @property
    def lock_timeout(self) -> float:
        return self.settings.http_timeout_seconds + 15

    # -- scheduling ------------------------------------------------------------

    def refresh_due_at(self, token: Token, now_wall: float, now_mono: float) -> float:
        """Monotonic time of the next refresh: expires_at - margin, capped by the interval."""
        margin = token.refresh_margin(self.settings.refresh_margin_seconds)
        by_expiry = now_mono + (token.expires_at - margin - now_wall)
        if self.last_refresh_mono is None:
            issued_wall = token.expires_at - token.lifetime
            self.last_refresh_mono = now_mono - max(0.0, now_wall - issued_wall)
        by_interval = self.last_refresh_mono + self.settings.max_refresh_interval_seconds
        return min(by_expiry, by_interval)

    def schedule_from(self, token: Token) -> None:
        self.next_refresh = self.refresh_due_at(token, self.clock.time(), self.clock.monotonic())

    # -- refreshing ------------------------------------------------------------

    def refresh(self, force: bool) -> Token:
        """Under the lock: adopt a fresher token from the file, or refresh and write."""
        assert self.token is not None
        with self.store.locked(self.lock_timeout):
            try:
                on_disk = self.store.read()
            except MalformedFile as exc:
                log.warning("%s; using the token in memory", exc)
                on_disk = self.token
            if self.unsaved:
                on_disk = self.token  # ours is newer than the file we failed to write
            elif self.adopt_if_newer(on_disk, why="refresh") and not force:
                return on_disk
            current = on_disk
            with self.signals.network_call():
                answer = self.oauth.refresh(current.refresh_token)
            now = self.clock.time()
            fresh = merge_refresh(current, answer, now)
            self.last_refresh_mono = self.clock.monotonic()
            self.token = fresh
            rotated = fresh.refresh_token != current.refresh_token
            log.info("refreshed access token %s, valid until %s%s",
                     fingerprint(fresh.access_token), when(fresh.expires_at),
                     "; Schwab issued a new refresh token" if rotated else "")
            self.persist(fresh)
        return fresh

    def persist(self, token: Token) -> None:
        """Write the token file (lock held); on failure keep the token in memory, retry later."""
        try:
            self.store.write(token)
        except WriteFailed:
            self.unsaved = True
            self.next_write_retry = self.clock.monotonic() + self.write_retry_delay
            raise
        if self.unsaved:
            log.info("token file %s written after the earlier failure", self.store.path)
        self.unsaved = False
        self.next_write_retry = None
        self.file_signature = self.store.signature()

    def retry_write(self) -> None:
        """The token in memory may be the only copy of a rotated refresh token: save it."""
        assert self.token is not None
        try:
            with self.store.locked(self.lock_timeout):
                self.persist(self.token)
        except WriteFailed as exc:
            log.error("%s; retrying in %gs", exc, self.write_retry_delay)

    @property
    def write_retry_delay(self) -> float:
        return min(WRITE_RETRY_SECONDS, self.settings.backoff_max_seconds)

    def adopt_if_newer(self, on_disk: Token, why: str) -> bool:
        """Take a token another writer (a manual --once, schwab-py, a login) left in the file."""
        mine = self.token
        if mine is None or (on_disk.access_token == mine.access_token and (
                on_disk.refresh_token == mine.refresh_token)):
            return False
        new_login = (on_disk.creation_timestamp or 0) > (mine.creation_timestamp or 0)
        newer = on_disk.expires_at > mine.expires_at or (
            self.rejected and on_disk.refresh_token != mine.refresh_token)
        if not (new_login or newer):
            return False
        self.token = on_disk
        self.last_refresh_mono = None
        if new_login:
            log.info("new login detected in %s: refresh token valid until %s",
                     self.store.path, when(self.refresh_token_expiry(on_disk) or 0))
            self.expired_reported = False
            self.last_age_warning = None
        else:
            log.info("token file %s was updated by another program (%s): using access token "
                     "%s, valid until %s", self.store.path, why,
                     fingerprint(on_disk.access_token), when(on_disk.expires_at))
        if self.rejected:
            log.info("resuming refreshes with the new refresh token %s",
                     fingerprint(on_disk.refresh_token))
            self.rejected = False
            self.failures = 0
        return True

    def refresh_token_expiry(self, token: Token) -> Optional[float]:
        return token.refresh_token_expiry(self.settings.refresh_token_lifetime_days)

    def report_refresh_token_age(self, at_refresh: bool) -> None:
        """WARNING days before the weekly re-login is due; ERROR once it is past."""
        assert self.token is not None
        expiry = self.refresh_token_expiry(self.token)
        if expiry is None:
            return
        left = expiry - self.clock.time()
        login = f"run {self.login_command}"
        if left <= 0:
            if not self.expired_reported:
                log.error("the refresh token expired at %s (%s ago); a new login is needed: %s",
                          when(expiry), duration(left), login)
                self.expired_reported = True
            return
        if left > self.settings.refresh_token_warn_hours * 3600:
            return
        now = self.clock.monotonic()
        due = (self.last_age_warning is None
               or now - self.last_age_warning >= WARN_REPEAT_SECONDS
               or (at_refresh and left <= WARN_EVERY_REFRESH_SECONDS))
        if due:
            log.warning("the refresh token expires in %s, at %s; log in again before then: %s",
                        duration(left), when(expiry), login)
            self.last_age_warning = now

    # -- delivering ------------------------------------------------------------

    def deliver(self, reason: str, quiet_retry: bool = False) -> DeliveryResult:
        """One attempt to hand the current token to the bot; logs the outcome."""
        assert self.token is not None
        token = self.token
        if token.valid_for(self.clock.time()) <= 0:
            result = DeliveryResult(Delivery.REJECTED, "the access token has expired; not sent")
            log.warning("not delivering to the bot (%s): %s", reason, result.detail)
            return result
        with self.signals.network_call():
            result = self.bot.deliver(token)
        fp = fingerprint(token.access_token)
        self.delivery_attempts += 1
        if result.final:
            self.attempted = fp
        if result.outcome == Delivery.DELIVERED:
            self.delivered = fp
            self.delivery_attempts = 0
            self.refused_reported = None
            log.info("delivered access token %s to the bot (%s); it expires at %s",
                     fp, reason, when(token.expires_at))
        elif result.outcome == Delivery.ABSENT:
            log.info("bot not running (%s); the token will be delivered when it starts",
                     result.detail)
        elif result.outcome == Delivery.REFUSED:
            if self.refused_reported != result.detail:
                log.error("security: refusing to deliver to %s: %s", self.bot.path, result.detail)
                self.refused_reported = result.detail
        elif result.outcome == Delivery.REJECTED:
            log.error("the bot did not accept access token %s: %s", fp, result.detail)
        elif result.outcome == Delivery.UNSENDABLE:
            log.error("not delivering access token %s: %s", fp, result.detail)
        elif quiet_retry:
            self.delivery_attempts -= 1  # does not count against socket_retries
            log.debug("bot not answering yet (%s); trying again at once", result.detail)
        else:
            log.warning("delivery attempt %d of %d failed: %s", self.delivery_attempts,
                        self.settings.socket_retries + 1, result.detail)
        self.state.update(last_delivery={"time": int(self.clock.time()), "outcome": result.outcome,
                                         "detail": result.detail, "token": fp})
        self.notify_status()
        return result

    def bot_socket_identity(self) -> Optional[Tuple[int, int, int]]:
        """Which socket is at the path: the inode alone is reused at once after unlink+bind."""
        try:
            st = os.lstat(self.settings.socket_path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    # -- status ----------------------------------------------------------------

    def notify_status(self) -> None:
        last = self.state.data.get("last_refresh", {})
        delivery = self.state.data.get("last_delivery", {})
        wall_next = self.clock.time() + (self.next_refresh - self.clock.monotonic())
        parts = [f"refresh {last.get('outcome', 'none yet')}",
                 f"delivery {delivery.get('outcome', 'none yet')}",
                 "refreshes stopped: new login needed" if self.rejected
                 else f"next refresh {dt.datetime.fromtimestamp(wall_next):%H:%M:%S}"]
        self.notifier.send("STATUS=" + "; ".join(parts))

    def record_refresh(self, outcome: str) -> None:
        assert self.token is not None
        expiry = self.refresh_token_expiry(self.token)
        wall_next = self.clock.time() + (self.next_refresh - self.clock.monotonic())
        self.state.update(
            last_refresh={"time": int(self.clock.time()), "outcome": outcome},
            consecutive_failures=self.failures,
            access_token_expires_at=self.token.expires_at,
            refresh_token_expires_at=int(expiry) if expiry else None,
            next_refresh_at=None if self.rejected else int(wall_next),
            refreshes_stopped=self.rejected,
        )
        self.notify_status()


# ----------------------------------------------------------------------------- modes


class Daemon:
    """The long-running loop: every wake-up handles signals, paths, refresh and delivery."""

    def __init__(self, sender: Sender, loop: EventLoop) -> None:
        self.sender = sender
        self.loop = loop
        self.next_watchdog: Optional[float] = None
        self.reload_settings: Optional[Callable[[], None]] = None

    def run(self) -> int:
        try:
            self.start()
            release_memory()
            while not self.sender.signals.stop:
                self.step()
        except StopRequested:
            pass
        self.sender.notifier.send("STOPPING=1")
        log.info("stopping on signal")
        return EXIT_OK

    def start(self) -> None:
        """Load, tell systemd we are ready, and give the bot a token or refresh first."""
        s = self.sender
        token = s.load()
        s.notifier.send("READY=1", f"STATUS=started; access token valid until "
                                   f"{dt.datetime.fromtimestamp(token.expires_at):%H:%M:%S}")
        interval = s.notifier.watchdog_interval
        if interval:
            self.next_watchdog = self.sender.clock.monotonic() + interval
        s.schedule_from(token)
        # Before any delivery: a bot that starts while we deliver must look new afterwards.
        s.bot_inode = s.bot_socket_identity()
        margin = token.refresh_margin(s.settings.refresh_margin_seconds)
        if token.valid_for(self.sender.clock.time()) > margin:
            log.info("access token %s on disk is valid until %s; next refresh in %s",
                     fingerprint(token.access_token), when(token.expires_at),
                     duration(s.next_refresh - self.sender.clock.monotonic()))
            s.report_refresh_token_age(at_refresh=False)
            self.deliver("start-up")
        else:
            s.next_refresh = self.sender.clock.monotonic()

    def step(self) -> None:
        """Act on whatever is due, then sleep until the next thing is."""
        s = self.sender
        self.handle_signals()
        now = self.sender.clock.monotonic()
        if not s.rejected and now >= s.next_refresh:
            self.refresh(force=False)
        if s.next_delivery is not None and self.sender.clock.monotonic() >= s.next_delivery:
            s.next_delivery = None
            self.deliver("retry")
        if s.next_write_retry is not None and self.sender.clock.monotonic() >= (
                s.next_write_retry):
            s.retry_write()
        self.ping_watchdog()
        if s.signals.stop:
            return
        changed = self.loop.wait(self.sleep_for())
        self.handle_changes(changed)

    def sleep_for(self) -> float:
        s = self.sender
        now = self.sender.clock.monotonic()
        deadlines = [now + 86400.0]
        if not s.rejected:
            deadlines.append(s.next_refresh)
        if s.next_delivery is not None:
            deadlines.append(s.next_delivery)
        if s.next_write_retry is not None:
            deadlines.append(s.next_write_retry)
        if self.next_watchdog is not None:
            deadlines.append(self.next_watchdog)
        if s.rejected and s.token is not None:
            # wake when the access token the bot may still need has expired, to say so once
            deadlines.append(now + max(0.0, s.token.valid_for(self.sender.clock.time())) + 1)
        return max(0.0, min(deadlines) - now)

    def ping_watchdog(self) -> None:
        interval = self.sender.notifier.watchdog_interval
        now = self.sender.clock.monotonic()
        if interval and self.next_watchdog is not None and now >= self.next_watchdog:
            self.sender.notifier.send("WATCHDOG=1")
            self.next_watchdog = now + interval

    def handle_signals(self) -> None:
        s = self.sender
        if s.signals.reload:
            s.signals.reload = False
            log.info("SIGHUP: reloading settings and re-reading both files")
            if self.reload_settings is not None:
                self.reload_settings()
            self.resume_or_adopt("SIGHUP")
        if s.signals.refresh_now:
            s.signals.refresh_now = False
            log.info("SIGUSR1: refreshing now")
            if s.rejected:
                self.resume_or_adopt("SIGUSR1")
                s.rejected = False
            self.refresh(force=True)

    def resume_or_adopt(self, why: str) -> None:
        s = self.sender
        try:
            on_disk = s.store.read()
        except SenderError as exc:
            log.error("%s", exc)
            return
        if not s.adopt_if_newer(on_disk, why) and s.rejected:
            log.info("%s: retrying the refresh token once more", why)
            s.rejected = False
        if s.token is not None:
            s.schedule_from(s.token)
            if s.delivered != fingerprint(s.token.access_token):
                self.deliver(why)

    def handle_changes(self, changed: Set[Path]) -> None:
        s = self.sender
        if s.store.path in changed and s.store.signature() != s.file_signature:
            s.file_signature = s.store.signature()
            try:
                on_disk = parse_token_document(s.store.read_bytes(), s.store.path)
            except SenderError as exc:
                log.debug("token file changed but is not readable yet: %s", exc)
                on_disk = None
            if on_disk is not None and s.adopt_if_newer(on_disk, why="file changed"):
                s.schedule_from(on_disk)
                self.deliver("token file changed")
        if s.settings.socket_path in changed:
            identity = s.bot_socket_identity()
            if identity is not None and identity != s.bot_inode:
                s.bot_inode = identity
                s.delivery_attempts = 0
                s.quick_retry_until = s.clock.monotonic() + QUICK_RETRY_WINDOW
                self.deliver("bot socket appeared")
            elif identity is None:
                s.bot_inode = None

    def refresh(self, force: bool) -> None:
        s = self.sender
        try:
            token = s.refresh(force=force)
        except RefreshRejected as exc:
            s.rejected = True
            s.failures += 1
            log.error("%s; a new login is needed: run %s; refreshes stop until the token file "
                      "changes or on SIGHUP/SIGUSR1", exc, s.login_command)
            s.record_refresh("rejected: new login needed")
            self.deliver_if_needed("refresh rejected")
            return
        except TransientRefreshError as exc:
            s.failures += 1
            delay = backoff_delay(s.failures, s.settings, exc.retry_after, s.rng,
                                  urgent=self.bot_token_at_risk())
            s.next_refresh = self.sender.clock.monotonic() + delay
            log.warning("refresh attempt %d failed: %s; retrying in %.1fs",
                        s.failures, exc, delay)
            s.record_refresh(f"failed: {exc}")
            self.deliver_if_needed("refresh failed")
            return
        except WriteFailed as exc:
            log.error("%s; the new token is kept in memory and delivered to the bot", exc)
            token = s.token  # type: ignore[assignment]
            s.failures = 0
        except SenderError as exc:
            s.failures += 1
            delay = backoff_delay(s.failures, s.settings, None, s.rng,
                                  urgent=self.bot_token_at_risk())
            s.next_refresh = self.sender.clock.monotonic() + delay
            log.error("refresh failed: %s; retrying in %.1fs", exc, delay)
            self.deliver_if_needed("refresh failed")
            return
        else:
            s.failures = 0
        assert token is not None
        s.schedule_from(token)
        s.report_refresh_token_age(at_refresh=True)
        s.record_refresh("ok")
        if s.delivered != fingerprint(token.access_token):
            s.delivery_attempts = 0
            self.deliver("refresh")
        release_memory()

    def bot_token_at_risk(self) -> bool:
        """Would the bot hold an expired token (its rule) before a full backoff ends?"""
        s = self.sender
        if s.token is None:
            return True
        left_for_bot = s.token.valid_for(s.clock.time()) - BOT_EXPIRY_MARGIN
        return left_for_bot < s.settings.backoff_max_seconds

    def deliver_if_needed(self, reason: str) -> None:
        """Give the bot the token we hold unless it has it or the last try was final."""
        s = self.sender
        if s.token is None or s.next_delivery is not None:
            return
        fp = fingerprint(s.token.access_token)
        if fp not in (s.delivered, s.attempted):
            self.deliver(reason)

    def deliver(self, reason: str) -> None:
        s = self.sender
        now = s.clock.monotonic()
        # A bot binds its new socket a moment before it listens: retry that quickly.
        quick = now < s.quick_retry_until
        result = s.deliver(reason, quiet_retry=quick)
        if result.outcome == Delivery.RETRY and quick:
            s.next_delivery = now + QUICK_RETRY_SECONDS
        elif result.outcome == Delivery.RETRY and s.delivery_attempts <= s.settings.socket_retries:
            s.next_delivery = now + s.settings.socket_retry_delay_seconds
        else:
            s.next_delivery = None


def run_once(sender: Sender, force: bool) -> int:
    """One cycle for cron or a timer: refresh if due (or forced), write, deliver."""
    s = sender
    token = s.load()
    write_failed = False
    margin = token.refresh_margin(s.settings.refresh_margin_seconds)
    if force or token.valid_for(s.clock.time()) <= margin:
        for attempt in range(1, ONCE_REFRESH_ATTEMPTS + 1):
            try:
                token = s.refresh(force=force)
                s.failures = 0
                break
            except WriteFailed as exc:
                log.error("%s; delivering the new token anyway", exc)
                write_failed = True
                break
            except RefreshRejected as exc:
                log.error("%s; a new login is needed: run %s", exc, s.login_command)
                s.state.update(last_refresh={"time": int(s.clock.time()),
                                             "outcome": "rejected: new login needed"})
                return EXIT_NOPERM
            except TransientRefreshError as exc:
                s.failures = attempt
                if attempt == ONCE_REFRESH_ATTEMPTS:
                    log.error("refresh failed after %d attempts: %s", attempt, exc)
                    s.state.update(last_refresh={"time": int(s.clock.time()),
                                                 "outcome": f"failed: {exc}"})
                    return EXIT_TEMPFAIL
                delay = backoff_delay(attempt, s.settings, exc.retry_after, s.rng)
                log.warning("refresh attempt %d failed: %s; retrying in %.1fs",
                            attempt, exc, delay)
                if _interruptible_sleep(s.signals, delay):
                    return EXIT_OK
        s.schedule_from(s.token or token)
        s.record_refresh("ok")
    else:
        log.info("access token %s is valid until %s: no refresh due",
                 fingerprint(token.access_token), when(token.expires_at))
    s.report_refresh_token_age(at_refresh=True)
    delivered = deliver_with_retries(s, "--once")
    return EXIT_CANTCREAT if write_failed else delivered


def deliver_with_retries(sender: Sender, reason: str) -> int:
    """Deliver for a one-shot mode, retrying as the settings say; the mode's exit code."""
    s = sender
    result = s.deliver(reason)
    while result.outcome == Delivery.RETRY and s.delivery_attempts <= s.settings.socket_retries:
        if _interruptible_sleep(s.signals, s.settings.socket_retry_delay_seconds):
            return EXIT_OK
        result = s.deliver(f"{reason} retry")
    if result.outcome in (Delivery.DELIVERED, Delivery.ABSENT):
        return EXIT_OK
    if result.outcome == Delivery.RETRY:
        log.error("the bot did not take the token after %d attempts: %s",
                  s.delivery_attempts, result.detail)
    return EXIT_UNAVAILABLE


def _interruptible_sleep(signals: Signals, seconds: float) -> bool:
    """Sleep unless a stop signal arrives; True means stop."""
    deadline = time.monotonic() + seconds
    while not signals.stop:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(InterruptedError):
            select.select([signals.fileno()], [], [], remaining)
        signals.drain()
    return True


# --------------------------------------------------------------------------- --login


def authorize_url(token_url: str, app_key: str, callback_url: str, state: str) -> str:
    """Schwab's authorization page lives next to its token endpoint."""
    parts = urllib.parse.urlsplit(token_url)
    path = parts.path.rsplit("/", 1)[0] + "/authorize"
    query = urllib.parse.urlencode({"client_id": app_key, "redirect_uri": callback_url,
                                    "state": state})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def _query_params(query: str) -> Dict[str, str]:
    """Decode %XX but not '+': an authorization code may contain a literal plus."""
    params: Dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name:
            params.setdefault(urllib.parse.unquote(name), urllib.parse.unquote(value))
    return params


def code_from_redirect(pasted: str, callback_url: str, state: str) -> str:
    """Check the URL the browser landed on and return the authorization code in it."""
    pasted = pasted.strip()
    got = urllib.parse.urlsplit(pasted)
    want = urllib.parse.urlsplit(callback_url)
    try:
        got_port, want_port = got.port, want.port
    except ValueError:
        raise BadRedirect("the pasted text is not a URL with a valid port") from None
    if not got.scheme or not got.netloc:
        raise BadRedirect("the pasted text is not a URL: paste the whole address the browser "
                          f"shows after the login (it starts with {callback_url})")
    same = (got.scheme.lower() == want.scheme.lower()
            and (got.hostname or "") == (want.hostname or "")
            and (got_port or _default_port(got.scheme)) == (want_port or _default_port(
                want.scheme))
            and (got.path or "/") == (want.path or "/"))
    if not same:
        raise BadRedirect(f"the pasted URL does not go to this app's callback_url "
                          f"({callback_url}): paste the address of the page Schwab sent the "
                          "browser to")
    params = _query_params(got.query)
    if "error" in params:
        raise BadRedirect(f"Schwab did not grant access: error={printable(params['error'], 60)}"
                          f" {printable(params.get('error_description', ''), 120)}".rstrip())
    if "state" in params and params["state"] != state:
        raise BadRedirect("the pasted URL belongs to another login attempt (state does not "
                          "match): open the URL printed above and paste the result")
    code = params.get("code", "")
    if not code:
        raise BadRedirect("the pasted URL has no code parameter: paste the full address, "
                          "including everything after '?'")
    return code


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def new_login_document(existing: Optional[Token], answer: Dict[str, Any], now: float) -> Token:
    """The token file after a login: a new creation_timestamp (the only place it changes)."""
    doc: Dict[str, Any] = copy.deepcopy(existing.document) if existing else {"token": {}}
    doc["creation_timestamp"] = int(now)
    body = doc["token"]
    for key in ("access_token", "refresh_token", "id_token", "token_type", "scope"):
        if key in answer:
            body[key] = answer[key]
    body["expires_in"] = int(answer["expires_in"])
    body["expires_at"] = int(now + int(answer["expires_in"]))
    return Token(doc)


def read_redirect(redirect_url: Optional[str]) -> str:
    if redirect_url is not None:
        return redirect_url
    if sys.stdin is None:
        raise BadRedirect("no --redirect-url given and no standard input to read it from")
    if sys.stdin.isatty():
        import getpass

        # Not echoed: the URL carries the authorization code.
        return getpass.getpass("Paste the full URL the browser was redirected to: ")
    return sys.stdin.readline()


def run_login(sender: Sender, redirect_url: Optional[str]) -> int:
    """The weekly interactive login: authorize, exchange the code, write, deliver."""
    s = sender
    callback = s.app.callback_url
    if not callback:
        raise MalformedFile("app config: callback_url: missing; --login needs the callback "
                            "URL registered for the app (e.g. https://127.0.0.1:8182)")
    state = secrets.token_urlsafe(16)
    url = authorize_url(s.settings.token_url, s.app.app_key, callback, state)
    print("1. Open this URL in a browser and log in to Schwab:\n\n"
          f"   {url}\n\n2. The browser then shows an error page or nothing at "
          f"{callback}: that is expected. Copy the whole address from its address bar.",
          file=sys.stderr, flush=True)
    code = code_from_redirect(read_redirect(redirect_url), callback, state)
    REDACTOR.add(code)
    with s.signals.network_call():
        answer = s.oauth.exchange_code(code, callback)
    now = s.clock.time()
    with s.store.locked(s.lock_timeout):
        try:
            existing: Optional[Token] = s.store.read(attempts=1)
        except MissingFile:
            existing = None
        except MalformedFile as exc:
            log.warning("%s; replacing it with the new login", exc)
            existing = None
        token = new_login_document(existing, answer, now)
        s.store.write(token)
    s.token = token
    expiry = s.refresh_token_expiry(token) or 0
    log.info("logged in: access token %s valid until %s; refresh token %s valid until %s",
             fingerprint(token.access_token), when(token.expires_at),
             fingerprint(token.refresh_token), when(expiry))
    return deliver_with_retries(s, "login")


# ----------------------------------------------------------------- --check/--status


class Report:
    """Human report for --check: one line per check, the first failure's exit code."""

    def __init__(self) -> None:
        self.exit_code = EXIT_OK
        self.lines: List[str] = []

    def ok(self, text: str) -> None:
        self.lines.append(f"ok    {text}")

    def warn(self, text: str) -> None:
        self.lines.append(f"warn  {text}")

    def fail(self, text: str, code: int) -> None:
        self.lines.append(f"FAIL  {text}")
        if self.exit_code == EXIT_OK:
            self.exit_code = code

    def print(self) -> None:
        for line in self.lines:
            print(REDACTOR.redact(line))


def run_check(settings: Settings, app_path: Path, token_path: Path, settings_note: str,
              login: str = LOGIN_COMMAND) -> int:
    """Validate everything without network or writes (the Ansible role runs this)."""
    report = Report()
    report.ok(f"settings: {settings_note}")
    try:
        check_secret_permissions(app_path, "app config")
        load_app_config(app_path)
        report.ok(f"app config: {app_path}")
    except SenderError as exc:
        report.fail(str(exc), exc.exit_code)
    try:
        check_secret_permissions(token_path, "token file")
        token = TokenStore(token_path).read()
        report.ok(f"token file: {token_path}")
    except SenderError as exc:
        report.fail(str(exc), exc.exit_code)
    else:
        _check_token(report, settings, token, login)
        folder = token_path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            report.fail(f"token folder {folder} is not writable by this user "
                        f"({_user_name(os.geteuid())}): the token file cannot be replaced "
                        "atomically", EXIT_CANTCREAT)
    _check_socket(report, settings)
    report.print()
    return report.exit_code


def _check_token(report: Report, settings: Settings, token: Token, login: str) -> None:
    now = time.time()
    left = token.valid_for(now)
    if left > 0:
        report.ok(f"access token {fingerprint(token.access_token)} valid for {duration(left)} "
                  f"(until {when(token.expires_at)})")
    else:
        report.warn(f"access token expired {duration(left)} ago; the sender refreshes it "
                    "at start")
    expiry = token.refresh_token_expiry(settings.refresh_token_lifetime_days)
    if expiry is None:
        report.warn("token file has no creation_timestamp: refresh-token age unknown")
        return
    left = expiry - now
    if left <= 0:
        report.fail(f"refresh token expired at {when(expiry)}: run {login}", EXIT_NOPERM)
    elif left <= settings.refresh_token_warn_hours * 3600:
        report.warn(f"refresh token expires in {duration(left)} (at {when(expiry)}): "
                    f"run {login} before then")
    else:
        report.ok(f"refresh token valid for {duration(left)} (until {when(expiry)})")


def _check_socket(report: Report, settings: Settings) -> None:
    client = BotClient(settings)
    found = client.inspect()
    if found.outcome == Delivery.ABSENT:
        report.warn(f"bot socket {settings.socket_path} absent: the bot is not running "
                    "(tokens are delivered when it starts)")
        return
    if found.outcome == Delivery.REFUSED:
        report.fail(f"security: {found.detail}", EXIT_UNAVAILABLE)
        return
    # Connect and close without sending: the bot reads nothing and answers nothing.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(settings.socket_timeout_seconds)
        try:
            sock.connect(str(settings.socket_path))
        except OSError as exc:
            report.warn(f"bot socket {settings.socket_path}: {_network_reason(exc)} "
                        "(stale socket? the bot may be down)")
            return
        uid = _peer_uid(sock)
    if uid in client.allowed_uids:
        report.ok(f"bot socket {settings.socket_path}: listener uid {uid} ({_user_name(uid)})")
    else:
        report.fail(f"security: the listener on {settings.socket_path} runs as uid {uid} "
                    f"({_user_name(uid)}), not in allowed_peer_users", EXIT_UNAVAILABLE)


def run_status(settings: Settings, token_path: Path, login: str = LOGIN_COMMAND) -> int:
    """Read-only summary from the token file and the state file."""
    token = TokenStore(token_path).read()
    now = time.time()
    left = token.valid_for(now)
    print(f"token file      {token_path}")
    fp = fingerprint(token.access_token)
    if left > 0:
        print(f"access token    {fp} valid, expires {when(token.expires_at)} "
              f"(in {duration(left)})")
    else:
        print(f"access token    {fp} EXPIRED at {when(token.expires_at)} ({duration(left)} ago)")
    created = token.creation_timestamp
    expiry = token.refresh_token_expiry(settings.refresh_token_lifetime_days)
    if created is None or expiry is None:
        print("refresh token   age unknown (no creation_timestamp)")
    else:
        rleft = expiry - now
        print(f"refresh token   obtained {when(created)} ({duration(now - created)} ago), "
              f"expires {when(expiry)} "
              f"({'in ' + duration(rleft) if rleft > 0 else 'EXPIRED: run ' + login})")
    data = StateFile.load(settings.state_file)
    for key, label in (("last_refresh", "last refresh"), ("last_delivery", "last delivery")):
        entry = data.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("time"), (int, float)):
            print(f"{label:<15} {when(entry['time'])}: {printable(str(entry.get('outcome')))}")
        else:
            print(f"{label:<15} none recorded in {settings.state_file}")
    if data.get("consecutive_failures"):
        print(f"failures        {data['consecutive_failures']} in a row")
    found = BotClient(settings).inspect()
    sock_state = "present" if found.outcome == Delivery.DELIVERED else found.detail
    print(f"bot socket      {settings.socket_path}: {sock_state}")
    return EXIT_OK


# ------------------------------------------------------------------------- logging


class JournalFormatter(logging.Formatter):
    """stderr under systemd: '<N>message', so journald keeps each line once with its priority."""

    PRIORITY: ClassVar[Dict[int, int]] = {
        logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{record.getMessage()}"


LOG_FORMAT = logging.Formatter("[%(asctime)s] %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    stream = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_console_logging(environ: Mapping[str, str]) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal(environ) else LOG_FORMAT)
    handler.addFilter(REDACTOR)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def setup_file_logging(path: Path, level: str) -> None:
    log.setLevel(level)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # WatchedFileHandler reopens the file after logrotate moves it away.
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        with contextlib.suppress(OSError):
            path.chmod(0o640)
            if handler.stream is not None:
                give_to_folder_owner(handler.stream.fileno(), path.parent)
    except OSError as exc:
        raise WriteFailed(f"cannot open log file {path}: {_reason(exc)} (it and its folder "
                          "must be writable by this user; or use --log-file -)") from None
    handler.setFormatter(LOG_FORMAT)
    handler.addFilter(REDACTOR)
    log.addHandler(handler)


# ----------------------------------------------------------------------------- CLI


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="token_refresh_sender.py",
        description="Refresh Schwab OAuth access tokens before they expire and push them to "
                    "the trading bot over its Unix socket.",
        epilog="Exit codes: 0 ok, 64 usage, 65 malformed file, 66 missing file, 69 bot "
               "refused or untrusted socket, 73 cannot write, 75 endpoint unavailable, "
               "77 new login needed, 78 bad settings or permissions. See README.md.")
    paths = parser.add_argument_group("files")
    paths.add_argument("--app-config", type=Path, metavar="PATH",
                       help=f"app key and secret (default: {DEFAULT_APP_CONFIG})")
    paths.add_argument("--token-file", type=Path, metavar="PATH",
                       help=f"schwab-py token file (default: {DEFAULT_TOKEN_FILE})")
    paths.add_argument("--config", type=Path, metavar="PATH",
                       help=f"settings file (default: {DEFAULT_SETTINGS_FILE}, if present)")
    paths.add_argument("--log-file", metavar="PATH",
                       help=f"log file, '-' for none (default: {DEFAULT_LOG_FILE})")
    paths.add_argument("--state-file", metavar="PATH",
                       help=f"status file read by --status (default: {DEFAULT_STATE_FILE})")
    net = parser.add_argument_group("peers")
    net.add_argument("--socket", metavar="PATH",
                     help=f"the bot's Unix socket (default: {DEFAULT_SOCKET})")
    net.add_argument("--token-url", metavar="URL",
                     help=f"token endpoint (default: {DEFAULT_TOKEN_URL})")
    parser.add_argument("--log-level", metavar="LEVEL", type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", action="store_true",
                       help="one cycle (refresh if due, write, deliver), then exit")
    modes.add_argument("--check", action="store_true",
                       help="validate settings, files, permissions and the socket; no network")
    modes.add_argument("--check-config", action="store_true",
                       help="validate only the settings file given by --config")
    modes.add_argument("--status", action="store_true",
                       help="print token expiry, last refresh and delivery; read-only")
    modes.add_argument("--login", action="store_true",
                       help="interactive login (authorization code): writes a new token file "
                            "and hands the token to the bot")
    modes.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    parser.add_argument("--force", action="store_true",
                        help="with --once: refresh even if the access token is still valid")
    parser.add_argument("--redirect-url", metavar="URL",
                        help="with --login: the URL the browser was redirected to (otherwise "
                             "it is read from standard input)")
    return parser


def resolve_settings(args: argparse.Namespace) -> Tuple[Settings, str]:
    settings_path = args.config or DEFAULT_SETTINGS_FILE
    explicit = args.config is not None
    def from_cwd(value: Optional[str]) -> Optional[str]:
        # Paths on the command line are relative to the working directory, as users expect;
        # only those in the settings file are relative to the bundle root.
        return value if value in (None, "-") else str(Path(value).absolute())

    overrides = {"token_url": args.token_url, "socket_path": from_cwd(args.socket),
                 "log_file": from_cwd(args.log_file), "log_level": args.log_level,
                 "state_file": from_cwd(args.state_file)}
    settings = load_settings(settings_path, explicit, overrides)
    used = explicit or settings_path.exists()
    note = str(settings_path) if used else "defaults (no settings file)"
    return settings, note


def main(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    if args.force and not args.once:
        build_parser().error("--force only makes sense with --once")
    if args.redirect_url is not None and not args.login:
        build_parser().error("--redirect-url only makes sense with --login")
    # Whatever the caller's umask, nothing the sender creates (log folder, log, state, lock)
    # is writable by the group or readable by others; secret files get explicit modes.
    os.umask(os.umask(0o027) | 0o027)
    console = setup_console_logging(environ)
    try:
        return _run(args, environ)
    except SenderError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except StopRequested:
        log.info("stopping on signal")
        return EXIT_OK
    finally:
        console.flush()


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings, note = resolve_settings(args)
    if args.check_config:
        print(f"ok    settings: {note}")
        return EXIT_OK
    app_path = (args.app_config or DEFAULT_APP_CONFIG).absolute()
    token_path = (args.token_file or DEFAULT_TOKEN_FILE).absolute()
    log.setLevel(settings.log_level)
    login = login_command(app_path, token_path, args.config)
    if args.check:
        return run_check(settings, app_path, token_path, note, login)
    if args.status:
        return run_status(settings, token_path, login)
    if settings.log_file is not None:
        setup_file_logging(settings.log_file, settings.log_level)
    check_secret_permissions(app_path, "app config")
    if not args.login:
        check_secret_permissions(token_path, "token file")
    app = load_app_config(app_path)
    signals = Signals()
    signals.install()
    sender = Sender(settings, app, TokenStore(token_path), signals, Notifier(environ),
                    StateFile(settings.state_file))
    sender.login_command = login
    if args.once:
        return run_once(sender, args.force)
    if args.login:
        return run_login(sender, args.redirect_url)
    log.info("%s %s starting: token file %s, bot socket %s, endpoint %s", PROG, VERSION,
             token_path, settings.socket_path, settings.token_url)
    watcher = PathWatcher([token_path], socket_path=settings.socket_path)
    daemon = Daemon(sender, EventLoop(signals, watcher))
    daemon.reload_settings = lambda: _reload(sender, args)
    try:
        return daemon.run()
    finally:
        watcher.close()


def _reload(sender: Sender, args: argparse.Namespace) -> None:
    """SIGHUP: new settings and app config, or keep the old ones with an ERROR."""
    try:
        settings, _note = resolve_settings(args)
        app = load_app_config((args.app_config or DEFAULT_APP_CONFIG).absolute())
    except SenderError as exc:
        log.error("reload failed, keeping the previous settings: %s", exc)
        return
    if settings.socket_path != sender.settings.socket_path:
        log.warning("socket_path changes take effect at the next restart")
        settings.socket_path = sender.settings.socket_path
    sender.settings, sender.app = settings, app
    sender.oauth = OAuthClient(settings, app)
    sender.bot = BotClient(settings)
    log.setLevel(settings.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
