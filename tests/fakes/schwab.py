"""A fake Schwab OAuth token endpoint: a real HTTP(S) server on 127.0.0.1.

    python3 -m tests.fakes.schwab --port 8443 --app-key K --app-secret S --refresh-token RT

It checks what Schwab checks (HTTP Basic client auth, a form body, the grant type, a refresh
token or authorization code it issued) and can be scripted to answer every way the real
endpoint has been seen to fail (shared/notes/facts.md section 2). Every token it hands out
looks like "FAKE-AT-<n>-<hex>", so nothing here can be mistaken for a real credential.

Scripting: ``script(mode, times=1, **params)`` queues one-shot answers, ``set_default(mode)``
sets the answer once the queue is empty. Modes in PROCESSING_MODES validate the request and
issue tokens like the real endpoint; every other mode is a canned answer that changes no state.

Stdlib only, Python 3.9+.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Deque, Dict, Iterable, List, Optional, Set, Tuple, Union
from urllib.parse import parse_qs

TOKEN_PATH = "/v1/oauth/token"
REDIRECT_TARGET_PATH = "/v1/oauth/token-redirected"
MAX_FORM_BYTES = 64 * 1024
OVERSIZED_CHUNK = 64 * 1024

# Modes that validate the request and issue tokens like the real endpoint.
PROCESSING_MODES = frozenset({"success", "success_without_refresh_token", "delay", "slow_drip"})
# Modes that answer with a fixed response (or none) whatever was asked; no state changes.
CANNED_MODES = frozenset(
    {
        "invalid_grant",
        "unsupported_token_type",
        "invalid_client",
        "html_403",
        "rate_limited",
        "server_error",
        "hang",
        "oversized",
        "malformed_json",
        "json_array",
        "empty_body",
        "missing_access_token",
        "expires_in_string",
        "access_token_number",
        "redirect",
        "reset",
    }
)
MODES = PROCESSING_MODES | CANNED_MODES

# How an unknown, used-up or revoked refresh token is rejected (all seen from Schwab).
REJECTIONS = frozenset({"invalid_grant", "unsupported_token_type", "invalid_client"})

ACCESS_DENIED_HTML = (
    "<HTML><HEAD>\n<TITLE>Access Denied</TITLE>\n</HEAD><BODY>\n<H1>Access Denied</H1>\n \n"
    "You don't have permission to access \"http&#58;&#47;&#47;api&#46;schwabapi&#46;com"
    '&#47;v1&#47;oauth&#47;token" on this server.<P>\nReference&#32;&#35;18&#46;fake\n'
    "</BODY>\n</HTML>\n"
)


def fingerprint(value: str) -> str:
    """Short non-secret identifier of a token: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def _token_digest(value: str) -> str:
    # Schwab's rejection messages quote a base64 SHA-256 digest of the token, never the token.
    return base64.b64encode(hashlib.sha256(value.encode()).digest()).decode()


@dataclass(frozen=True)
class Answer:
    """One scripted answer. Parameters not used by the mode are ignored."""

    mode: str = "success"
    status: Optional[int] = None  # server_error: 500 (default), 502, 503; invalid_client: 401/400
    retry_after: int = 1  # rate_limited: the Retry-After header, in seconds
    seconds: float = 1.0  # delay: wait before answering; slow_drip: pause between bytes
    size: Optional[int] = None  # oversized: announced and sent body length; None = endless
    location: Optional[str] = None  # redirect: target (default: another path on this server)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(sorted(MODES))}")


@dataclass(frozen=True)
class RequestRecord:
    """What the fake saw and how it answered (no secret values, only fingerprints)."""

    time: float
    method: str
    path: str
    grant_type: Optional[str]
    token_fingerprint: Optional[str]  # fingerprint() of the refresh token or code sent
    mode: str
    status: Optional[int]  # None when no HTTP status line was sent (hang, reset)
    error: Optional[str]  # the OAuth "error" sent, if any
    client_ok: bool  # Basic auth matched app_key:app_secret


@dataclass(frozen=True)
class IssuedTokens:
    time: float
    grant_type: str
    access_token: str
    refresh_token: str  # the refresh token valid after this answer (returned or not)
    id_token: str
    expires_in: int
    refresh_token_returned: bool


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: List[Tuple[str, str]] = field(default_factory=list)
    error: Optional[str] = None


def _json_reply(status: int, obj: Any, error: Optional[str] = None) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), error=error)


def _oauth_error(status: int, error: str, description: str) -> _Reply:
    return _json_reply(status, {"error": error, "error_description": description}, error=error)


@dataclass
class _Code:
    redirect_uri: str
    expires_at: float
    used: bool = False


class FakeSchwab:
    """The fake endpoint. Use as a context manager, or call start() and stop()."""

    def __init__(
        self,
        app_key: str,
        app_secret: str,
        refresh_tokens: Union[str, Iterable[str]] = (),
        *,
        lifetime: int = 1800,
        rotate: bool = False,
        mode: str = "success",
        rejection: str = "invalid_grant",
        refresh_token_lifetime: Optional[float] = None,
        port: int = 0,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        if rejection not in REJECTIONS:
            raise ValueError(f"rejection must be one of {sorted(REJECTIONS)}")
        self.app_key = app_key
        self.app_secret = app_secret
        self.lifetime = lifetime  # expires_in of issued access tokens; may be changed live
        self.rotate = rotate  # each refresh issues a new refresh token, old one dies
        self.rejection = rejection
        self.refresh_token_lifetime = refresh_token_lifetime  # None = refresh tokens never age
        self._port = port
        self._ssl_context = ssl_context
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._default = Answer(mode)
        self._queue: Deque[Answer] = collections.deque()
        self._valid: Dict[str, float] = {}  # refresh token -> when it was issued
        self._codes: Dict[str, _Code] = {}
        self._requests: List[RequestRecord] = []
        self._issued: List[IssuedTokens] = []
        self._secret_values: Set[str] = {app_key, app_secret}
        self._counter = 0
        self._connections: Set[socket.socket] = set()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        for token in [refresh_tokens] if isinstance(refresh_tokens, str) else refresh_tokens:
            self.add_refresh_token(token)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> FakeSchwab:
        self._stopping.clear()
        self._server = _Server(self, ("127.0.0.1", self._port), self._ssl_context)
        self._port = self._server.server_address[1]  # keep the port across restarts
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop at once, even with hanging or dripping connections open."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            _force_shutdown(conn)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeSchwab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """The token endpoint URL, to pass as the sender's --token-url."""
        return self.base_url + TOKEN_PATH

    # -- scripting --------------------------------------------------------------------------

    def script(self, mode: str, times: int = 1, **params: Any) -> None:
        """Queue `times` one-shot answers; the next token requests get them in order."""
        answer = Answer(mode, **params)
        with self._cond:
            self._queue.extend([answer] * times)

    def set_default(self, mode: str, **params: Any) -> None:
        """The answer once the scripted queue is empty."""
        answer = Answer(mode, **params)
        with self._cond:
            self._default = answer

    def clear_script(self) -> None:
        with self._cond:
            self._queue.clear()

    @property
    def pending_script(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- credentials ------------------------------------------------------------------------

    def add_refresh_token(self, token: str) -> None:
        with self._cond:
            self._valid[token] = time.time()
            self._secret_values.add(token)

    def revoke_refresh_tokens(self) -> None:
        """Like a login elsewhere: every refresh token known so far is rejected from now on."""
        with self._cond:
            self._valid.clear()

    @property
    def valid_refresh_tokens(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._valid)

    def issue_code(self, redirect_uri: str, lifetime: float = 30.0) -> str:
        """An authorization code as Schwab's login redirect would carry (it ends in '@')."""
        code = f"FAKE-CODE-{self._next_number()}-{secrets.token_hex(8)}@"
        with self._cond:
            self._codes[code] = _Code(redirect_uri, time.time() + lifetime)
            self._secret_values.add(code)
        return code

    # -- what happened ----------------------------------------------------------------------

    @property
    def requests(self) -> List[RequestRecord]:
        with self._cond:
            return list(self._requests)

    @property
    def token_requests(self) -> List[RequestRecord]:
        """Requests to the token path only (not redirect targets or stray paths)."""
        return [r for r in self.requests if r.path == TOKEN_PATH]

    @property
    def issued(self) -> List[IssuedTokens]:
        with self._cond:
            return list(self._issued)

    @property
    def latest(self) -> Optional[IssuedTokens]:
        with self._cond:
            return self._issued[-1] if self._issued else None

    def secret_values(self) -> Set[str]:
        """Every secret this fake knows or sent: app key/secret, tokens, codes."""
        with self._cond:
            return set(self._secret_values)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least `count` token requests have arrived."""
        with self._cond:
            return self._cond.wait_for(
                lambda: sum(r.path == TOKEN_PATH for r in self._requests) >= count, timeout
            )

    # -- request handling (runs in the server's threads) ------------------------------------

    def _next_number(self) -> int:
        with self._cond:
            self._counter += 1
            return self._counter

    def _new_value(self, kind: str) -> str:
        value = f"FAKE-{kind}-{self._next_number()}-{secrets.token_hex(8)}"
        with self._cond:
            self._secret_values.add(value)
        return value

    def _next_answer(self) -> Answer:
        with self._cond:
            return self._queue.popleft() if self._queue else self._default

    def _record(
        self, handler: _Handler, form: Dict[str, str], mode: str, reply: Optional[_Reply]
    ) -> None:
        # hang and reset never complete an HTTP answer.
        status = reply.status if reply is not None and mode != "reset" else None
        secret = form.get("refresh_token") or form.get("code")
        record = RequestRecord(
            time=time.time(),
            method=handler.command,
            path=handler.path.split("?", 1)[0],
            grant_type=form.get("grant_type"),
            token_fingerprint=fingerprint(secret) if secret else None,
            mode=mode,
            status=status,
            error=reply.error if reply is not None else None,
            client_ok=self._client_ok(handler),
        )
        with self._cond:
            self._requests.append(record)
            self._cond.notify_all()

    def _client_ok(self, handler: _Handler) -> bool:
        expected = base64.b64encode(f"{self.app_key}:{self.app_secret}".encode()).decode()
        got = handler.headers.get("Authorization", "")
        return secrets.compare_digest(got.encode(), f"Basic {expected}".encode())

    def _handle(self, handler: _Handler) -> None:
        path = handler.path.split("?", 1)[0]
        form = _read_form(handler)
        if path != TOKEN_PATH:
            reply = _json_reply(404, {"error": "not_found"})
            self._record(handler, form, "not_found", reply)
            _send(handler, reply)
            return
        if handler.command != "POST":
            reply = _json_reply(405, {"error": "method_not_allowed"})
            self._record(handler, form, "method_not_allowed", reply)
            _send(handler, reply)
            return
        answer = self._next_answer()
        if answer.mode in PROCESSING_MODES:
            omit_refresh = answer.mode == "success_without_refresh_token"
            answer_reply: Optional[_Reply] = self._process(handler, form, omit_refresh)
        else:
            answer_reply = self._canned(form, answer)
        self._record(handler, form, answer.mode, answer_reply)
        self._deliver(handler, answer, answer_reply)

    def _process(self, handler: _Handler, form: Dict[str, str], omit_refresh: bool) -> _Reply:
        content_type = handler.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _oauth_error(400, "invalid_request", "Content-Type must be form-urlencoded")
        if not self._client_ok(handler):
            reply = _oauth_error(401, "invalid_client", "Client authentication failed")
            reply.headers.append(("WWW-Authenticate", 'Basic realm="oauth"'))
            return reply
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            return self._refresh(form.get("refresh_token", ""), omit_refresh)
        if grant_type == "authorization_code":
            return self._exchange_code(form.get("code", ""), form.get("redirect_uri", ""))
        return _oauth_error(400, "unsupported_grant_type", "Unsupported grant type")

    def _refresh(self, refresh_token: str, omit_refresh: bool) -> _Reply:
        with self._cond:
            issued_at = self._valid.get(refresh_token)
            aged = (
                issued_at is not None
                and self.refresh_token_lifetime is not None
                and time.time() >= issued_at + self.refresh_token_lifetime
            )
            if issued_at is None or aged:
                return self._rejection(refresh_token, aged)
            new_refresh = refresh_token
            if self.rotate and not omit_refresh:
                new_refresh = self._new_value("RT")
                del self._valid[refresh_token]
                # A rotated token keeps the original login's 7-day clock.
                self._valid[new_refresh] = issued_at
            return self._issue("refresh_token", new_refresh, return_refresh=not omit_refresh)

    def _rejection(self, refresh_token: str, aged: bool) -> _Reply:
        if aged or self.rejection == "invalid_client":
            return _oauth_error(401, "invalid_client", "refresh token invalid")
        if self.rejection == "unsupported_token_type":
            return _unsupported_token_type(refresh_token)
        return _oauth_error(400, "invalid_grant", "Invalid or expired refresh token")

    def _exchange_code(self, code: str, redirect_uri: str) -> _Reply:
        with self._cond:
            entry = self._codes.get(code)
            if entry is None:
                return _oauth_error(400, "invalid_grant", "Unknown authorization code")
            if entry.used:
                return _oauth_error(400, "invalid_grant", "Authorization code already used")
            if time.time() >= entry.expires_at:
                return _oauth_error(400, "invalid_grant", "Authorization code expired")
            if redirect_uri != entry.redirect_uri:
                return _oauth_error(400, "invalid_grant", "redirect_uri mismatch")
            entry.used = True
            # A new login invalidates every earlier refresh token.
            self._valid.clear()
            new_refresh = self._new_value("RT")
            self._valid[new_refresh] = time.time()
            return self._issue("authorization_code", new_refresh, return_refresh=True)

    def _issue(self, grant_type: str, refresh_token: str, return_refresh: bool) -> _Reply:
        tokens = IssuedTokens(
            time=time.time(),
            grant_type=grant_type,
            access_token=self._new_value("AT"),
            refresh_token=refresh_token,
            id_token=self._new_value("ID"),
            expires_in=self.lifetime,
            refresh_token_returned=return_refresh,
        )
        with self._cond:
            self._issued.append(tokens)
        body: Dict[str, Any] = {
            "expires_in": tokens.expires_in,
            "token_type": "Bearer",
            "scope": "api",
            "refresh_token": tokens.refresh_token,
            "access_token": tokens.access_token,
            "id_token": tokens.id_token,
        }
        if not return_refresh:
            del body["refresh_token"]
        return _json_reply(200, body)

    def _fake_success_body(self, form: Dict[str, str]) -> Dict[str, Any]:
        # Looks like a success but is not registered: canned answers change no state.
        return {
            "expires_in": self.lifetime,
            "token_type": "Bearer",
            "scope": "api",
            "refresh_token": form.get("refresh_token") or self._new_value("RT"),
            "access_token": self._new_value("AT"),
            "id_token": self._new_value("ID"),
        }

    def _canned(self, form: Dict[str, str], answer: Answer) -> Optional[_Reply]:
        mode = answer.mode
        if mode == "invalid_grant":
            return _oauth_error(400, "invalid_grant", "Invalid or expired refresh token")
        if mode == "unsupported_token_type":
            return _unsupported_token_type(form.get("refresh_token", ""))
        if mode == "invalid_client":
            return _oauth_error(answer.status or 401, "invalid_client", "refresh token invalid")
        if mode == "html_403":
            return _Reply(403, ACCESS_DENIED_HTML.encode(), "text/html")
        if mode == "rate_limited":
            reply = _json_reply(429, {"message": "Too Many Requests"})
            reply.headers.append(("Retry-After", str(answer.retry_after)))
            return reply
        if mode == "server_error":
            return _server_error(answer.status or 500)
        if mode == "hang":
            return None
        if mode == "oversized":
            return _Reply(200)  # the body is streamed by _send_oversized
        if mode == "malformed_json":
            text = json.dumps(self._fake_success_body(form))
            return _Reply(200, text[: len(text) // 2].encode())
        if mode == "json_array":
            return _json_reply(200, [self._fake_success_body(form)])
        if mode == "empty_body":
            return _Reply(200, b"")
        if mode == "missing_access_token":
            body = self._fake_success_body(form)
            del body["access_token"]
            return _json_reply(200, body)
        if mode == "expires_in_string":
            body = self._fake_success_body(form)
            body["expires_in"] = str(body["expires_in"])
            return _json_reply(200, body)
        if mode == "access_token_number":
            body = self._fake_success_body(form)
            body["access_token"] = 1234567890
            return _json_reply(200, body)
        if mode == "redirect":
            reply = _Reply(302, b"", "text/plain")
            reply.headers.append(
                ("Location", answer.location or self.base_url + REDIRECT_TARGET_PATH)
            )
            return reply
        if mode == "reset":
            return _json_reply(200, self._fake_success_body(form))
        raise AssertionError(f"unhandled mode {mode}")

    def _deliver(self, handler: _Handler, answer: Answer, reply: Optional[_Reply]) -> None:
        mode = answer.mode
        if mode == "hang":
            self._stopping.wait()
        elif mode == "oversized":
            self._send_oversized(handler, answer.size)
        elif reply is None:
            raise AssertionError(f"mode {mode} produced no reply")
        elif mode == "delay":
            if not self._stopping.wait(answer.seconds):
                _send(handler, reply)
        elif mode == "slow_drip":
            _send_headers(handler, reply)
            for i in range(len(reply.body)):
                if self._stopping.wait(answer.seconds if i else 0):
                    return
                handler.wfile.write(reply.body[i : i + 1])
        elif mode == "reset":
            _send_headers(handler, reply)
            handler.wfile.write(reply.body[: len(reply.body) // 2])
            _reset(handler)
        else:
            _send(handler, reply)

    def _send_oversized(self, handler: _Handler, size: Optional[int]) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if size is not None:
            handler.send_header("Content-Length", str(size))
        handler.send_header("Connection", "close")
        handler.end_headers()
        # The same buffer again and again: a multi-GB (or endless) body, never allocated.
        chunk = b"A" * OVERSIZED_CHUNK
        piece = (b'{"access_token": "' + chunk)[:OVERSIZED_CHUNK]
        remaining = size
        while not self._stopping.is_set() and (remaining is None or remaining > 0):
            if remaining is not None:
                piece = piece[:remaining]
                remaining -= len(piece)
            handler.wfile.write(piece)
            piece = chunk

    # -- connection bookkeeping (so stop() can unblock every handler thread) -----------------

    def _track(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.add(conn)
        if self._stopping.is_set():
            _force_shutdown(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.discard(conn)


def _unsupported_token_type(refresh_token: str) -> _Reply:
    # The exact shape Schwab sends for an invalidated refresh token (a digest, not the token).
    digest = _token_digest(refresh_token)
    inner = json.dumps(
        {
            "error_description": "Exception while authenticating refresh token "
            f"[tokenDigest={digest}, Exception=Failed refresh token authentication "
            f"[tokenDigest={digest}]]",
            "error": "refresh_token_authentication_error",
        },
        separators=(",", ":"),
    )
    return _oauth_error(400, "unsupported_token_type", f'400 Bad Request: "{inner}"')


def _server_error(status: int) -> _Reply:
    if status == 500:
        return _oauth_error(500, "server_error", "Internal Server Error")
    reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(
        status, "Error"
    )
    html = f"<html><head><title>{status} {reason}</title></head><body>{reason}</body></html>\n"
    return _Reply(status, html.encode(), "text/html")


def _read_form(handler: _Handler) -> Dict[str, str]:
    try:
        length = min(int(handler.headers.get("Content-Length", "0")), MAX_FORM_BYTES)
    except ValueError:
        length = 0
    raw = handler.rfile.read(length) if length > 0 else b""
    parsed = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


def _send_headers(handler: _Handler, reply: _Reply) -> None:
    handler.send_response(reply.status)
    handler.send_header("Content-Type", reply.content_type)
    handler.send_header("Content-Length", str(len(reply.body)))
    handler.send_header("Cache-Control", "no-store")
    for name, value in reply.headers:
        handler.send_header(name, value)
    handler.send_header("Connection", "close")
    handler.end_headers()


def _send(handler: _Handler, reply: _Reply) -> None:
    _send_headers(handler, reply)
    handler.wfile.write(reply.body)


def _reset(handler: _Handler) -> None:
    """Close with a TCP RST: SO_LINGER 0, then close the only descriptor of the socket."""
    conn = handler.connection
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    # detach() hands back the fd even while rfile/wfile hold references, so the close is real.
    os.close(socket.socket.detach(conn))


def _force_shutdown(conn: socket.socket) -> None:
    # The base-class call skips SSLSocket.shutdown, which would drop TLS state under the
    # handler's feet; shutting the TCP socket down wakes any blocked recv/send.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.close_connection = True
        # OSError: the client went away or stop() shut the socket; nothing left to answer.
        with contextlib.suppress(OSError):
            self.server.fake._handle(self)

    do_GET = do_POST
    do_PUT = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is FakeSchwab.requests


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hanging handler must never keep the process alive
    allow_reuse_address = True

    def __init__(
        self, fake: FakeSchwab, address: Tuple[str, int], tls: Optional[ssl.SSLContext]
    ) -> None:
        self.fake = fake
        self.tls = tls
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (DNS); loopback needs no name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn: socket.socket = request
        if self.tls is not None:
            # Handshake here, in the connection's own thread, and trackable for stop().
            conn = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        self.fake._track(conn)
        try:
            if isinstance(conn, ssl.SSLSocket):
                conn.do_handshake()
            _Handler(conn, client_address, self)
        except OSError:
            pass
        finally:
            self.fake._untrack(conn)
            if conn is not request:
                _force_shutdown(conn)
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and aborted clients are the point of this server


# -- command line ---------------------------------------------------------------------------


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m tests.fakes.schwab", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any)")
    parser.add_argument("--app-key", required=True)
    parser.add_argument("--app-secret", required=True)
    parser.add_argument("--refresh-token", action="append", default=[], help="repeatable")
    parser.add_argument("--lifetime", type=int, default=1800, help="expires_in of access tokens")
    parser.add_argument("--rotate", action="store_true", help="issue a new refresh token each time")
    parser.add_argument("--mode", default="success", choices=sorted(MODES), help="default answer")
    parser.add_argument("--rejection", default="invalid_grant", choices=sorted(REJECTIONS))
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--issue-code", metavar="REDIRECT_URI", help="print an authorization code for this URI"
    )
    parser.add_argument("--verbose", action="store_true", help="one stderr line per request")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    fake = FakeSchwab(
        args.app_key,
        args.app_secret,
        args.refresh_token,
        lifetime=args.lifetime,
        rotate=args.rotate,
        mode=args.mode,
        rejection=args.rejection,
        port=args.port,
        ssl_context=context,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake.start()
    print(f"listening on {fake.url}", flush=True)
    if args.issue_code:
        print(f"authorization code: {fake.issue_code(args.issue_code, 600)}", flush=True)
    seen = 0
    while not stop.wait(0.2):
        if args.verbose:
            for r in fake.requests[seen:]:
                print(
                    f"{r.method} {r.path} grant_type={r.grant_type} token={r.token_fingerprint}"
                    f" mode={r.mode} -> {r.status}",
                    file=sys.stderr,
                    flush=True,
                )
                seen += 1
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
