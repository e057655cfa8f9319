"""The fakes themselves: the bot answers byte for byte like the C++ receiver, the endpoint
checks and answers like Schwab's, and both stop at once whatever their clients are doing."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlencode

import pytest
import trustme

import tests.conftest
from tests.conftest import (
    APP_KEY,
    APP_SECRET,
    REFRESH_TOKEN,
    Bundle,
    SecretRegistry,
    Sender,
    TlsEndpoint,
)
from tests.fakes.bot import ERROR, OK, FakeBot, parse_message, read_record
from tests.fakes.schwab import REDIRECT_TARGET_PATH, TOKEN_PATH, FakeSchwab, fingerprint

REPO = Path(__file__).resolve().parent.parent
GOOD = {"access_token": "FAKE-AT-x", "refresh_token": "FAKE-RT-x", "expires_at": 1764501800}


# -- talking to the fake bot ----------------------------------------------------------------


def talk(path: Path, data: bytes, timeout: float = 2.0) -> bytes:
    """Send like the sender does (one sendall), then read until the bot closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        if not data:
            client.shutdown(socket.SHUT_WR)
        # A bot that closes at once (mode "close") may break the pipe before we are done.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.sendall(data)
        return read_until_close(client)


def read_until_close(client: socket.socket) -> bytes:
    reply = b""
    while True:
        try:
            chunk = client.recv(4096)
        except ConnectionResetError:
            return reply  # the bot closed with bytes it never read: the kernel resets
        if not chunk:
            return reply
        reply += chunk


def payload(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def test_bot_answers_ok_to_a_valid_message_and_records_it(bot: FakeBot) -> None:
    before = time.time()
    assert talk(bot.path, json.dumps(GOOD, separators=(",", ":")).encode()) == OK
    assert bot.wait_for(1, timeout=1)
    assert bot.payloads == [GOOD]
    assert before <= bot.received[0].time <= time.time()


def test_bot_tolerates_a_trailing_newline_and_extra_fields(bot: FakeBot) -> None:
    assert talk(bot.path, payload(extra="x") + b"\n") == OK


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(payload() + b"x", id="garbage-after-object"),
        pytest.param(payload() + payload(), id="two-objects"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(payload()[:-3], id="truncated"),
        pytest.param(json.dumps([GOOD]).encode(), id="array"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(payload(access_token=None), id="access-token-null"),
        pytest.param(payload(access_token=123), id="access-token-number"),
        pytest.param(payload(refresh_token=["x"]), id="refresh-token-list"),
        pytest.param(payload(expires_at="1764501800"), id="expires-at-string"),
        pytest.param(payload(expires_at=1764501800.0), id="expires-at-float"),
        pytest.param(payload(expires_at=True), id="expires-at-bool"),
        pytest.param(b'{"access_token":"a","refresh_token":"r","expires_at":NaN}', id="nan"),
        pytest.param(b'{"access_token":"\xff","refresh_token":"r","expires_at":1}', id="bad-utf8"),
        pytest.param(
            json.dumps({k: v for k, v in GOOD.items() if k != "expires_at"}).encode(),
            id="missing-expires-at",
        ),
    ],
)
def test_bot_answers_error_to_what_the_cpp_parser_rejects(bot: FakeBot, data: bytes) -> None:
    assert talk(bot.path, data) == ERROR
    assert parse_message(data) is None
    assert bot.received == []


def test_bot_replies_nothing_when_it_read_nothing(bot: FakeBot) -> None:
    assert talk(bot.path, b"") == b""
    assert bot.wait_for_connections(1)
    assert bot.connections[0].data == b""
    assert bot.connections[0].reply is None


def test_bot_reads_only_4095_bytes_so_a_longer_message_is_answered_error(bot: FakeBot) -> None:
    long_message = payload(access_token="A" * 5000)
    assert talk(bot.path, long_message) == ERROR
    assert bot.connections[0].data == long_message[:4095]


def test_bot_does_a_single_recv_so_a_message_sent_in_two_writes_is_cut(bot: FakeBot) -> None:
    message = payload()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        client.connect(str(bot.path))
        client.sendall(message[:10])
        assert bot.wait_for_connections(1)  # answered without waiting for the rest
        assert read_until_close(client) == ERROR
    assert bot.connections[0].data == message[:10]
    assert bot.connections[0].reply == ERROR


def test_bot_serves_one_client_at_a_time(bot: FakeBot) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(bot.path))  # holds the bot in its recv, sending nothing
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second:
            second.settimeout(0.1)
            second.connect(str(bot.path))  # queued in the backlog
            second.sendall(payload())
            with pytest.raises(socket.timeout):
                second.recv(10)
            idle.close()
            second.settimeout(2)
            assert read_until_close(second) == OK


def test_bot_restart_makes_a_new_socket_and_keeps_what_it_received(bot: FakeBot) -> None:
    talk(bot.path, payload())
    before = bot.path.stat()
    bot.restart()
    after = bot.path.stat()
    # A file system may hand the freed inode number straight back: compare the ctime too.
    assert (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns)
    assert talk(bot.path, payload()) == OK
    assert len(bot.received) == 2


def test_bot_unlinks_what_is_at_its_path_and_removes_its_socket_on_stop(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    path.write_text("left behind")
    fake = FakeBot(path).start()
    assert path.is_socket()
    fake.stop()
    assert not path.exists()


def test_bot_records_accepted_payloads_as_json_lines(short_dir: Path) -> None:
    record = short_dir / "received.jsonl"
    with FakeBot(short_dir / "b.sock", record=record) as fake:
        talk(fake.path, payload())
        talk(fake.path, b"bad")
        lines = record.read_text().splitlines()
    assert [json.loads(line)["payload"] for line in lines] == [GOOD]
    assert read_record(record)[0].payload == GOOD


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("error", ERROR), ("silent", b""), ("close", b"")],
)
def test_bot_misbehaving_modes_reply_as_named(short_dir: Path, mode: str, expected: bytes) -> None:
    with FakeBot(short_dir / "m.sock", mode) as fake:
        assert talk(fake.path, payload()) == expected
        assert fake.received == []


def test_bot_garbage_mode_replies_random_bytes(short_dir: Path) -> None:
    with FakeBot(short_dir / "g.sock", "garbage") as fake:
        reply = talk(fake.path, payload())
    assert len(reply) == 16
    assert reply not in (OK, ERROR)


def test_bot_slow_mode_replies_ok_after_the_delay(short_dir: Path) -> None:
    with FakeBot(short_dir / "s.sock", "slow", delay=0.15) as fake:
        started = time.monotonic()
        assert talk(fake.path, payload()) == OK
        assert time.monotonic() - started >= 0.15


@pytest.mark.parametrize("mode", ["never_read", "never_reply"])
def test_bot_that_never_answers_still_stops_at_once(short_dir: Path, mode: str) -> None:
    fake = FakeBot(short_dir / "n.sock", mode).start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(0.1)
        client.connect(str(fake.path))
        client.sendall(payload())
        with pytest.raises(socket.timeout):
            client.recv(10)
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 1
    expected = None if mode == "never_read" else payload()
    assert fake.connections[0].data == expected


def test_bot_wait_for_gives_up_after_the_timeout(bot: FakeBot) -> None:
    assert bot.wait_for(1, timeout=0.05) is False


def test_bot_cli_announces_records_and_cleans_up_on_sigterm(short_dir: Path) -> None:
    path, record = short_dir / "cli.sock", short_dir / "cli.jsonl"
    cmd = [sys.executable, "-m", "tests.fakes.bot", "--socket", str(path), "--record", str(record)]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"listening on {path}\n"
        assert talk(path, payload()) == OK
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3) == 0
    assert not path.exists()
    assert [r.payload for r in read_record(record)] == [GOOD]


# -- talking to the fake endpoint -----------------------------------------------------------

FORM = "application/x-www-form-urlencoded"


@dataclass
class Response:
    status: int
    headers: Dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def basic(key: str = APP_KEY, secret: str = APP_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()


def post(
    fake: FakeSchwab,
    form: Optional[Dict[str, str]] = None,
    *,
    authorization: Optional[str] = None,
    content_type: str = FORM,
    timeout: float = 3.0,
    context: Optional[ssl.SSLContext] = None,
) -> Response:
    """One token request; redirects are not followed, so they can be seen."""
    if form is None:
        form = {"grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN}
    headers = {"Content-Type": content_type, "Authorization": authorization or basic()}
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", fake.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=timeout)
    try:
        conn.request("POST", TOKEN_PATH, body=urlencode(form), headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def test_endpoint_issues_fake_tokens_like_schwab(schwab: FakeSchwab) -> None:
    resp = post(schwab)
    assert resp.status == 200
    body = resp.json()
    assert set(body) == {
        "access_token",
        "refresh_token",
        "id_token",
        "expires_in",
        "token_type",
        "scope",
    }
    assert (body["expires_in"], body["token_type"], body["scope"]) == (1800, "Bearer", "api")
    assert body["access_token"].startswith("FAKE-AT-")
    assert body["refresh_token"] == REFRESH_TOKEN  # no rotation by default
    assert post(schwab).json()["access_token"] != body["access_token"]
    assert schwab.latest is not None
    assert schwab.latest.access_token in schwab.secret_values()


@pytest.mark.parametrize(
    "authorization",
    [basic(secret="wrong"), basic(key="wrong"), "Bearer x", "Basic !!!"],
)
def test_endpoint_rejects_bad_client_credentials(schwab: FakeSchwab, authorization: str) -> None:
    resp = post(schwab, authorization=authorization)
    assert (resp.status, resp.json()["error"]) == (401, "invalid_client")
    assert schwab.requests[0].client_ok is False


def test_endpoint_requires_a_form_body(schwab: FakeSchwab) -> None:
    resp = post(schwab, content_type="application/json")
    assert (resp.status, resp.json()["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "refresh_token", "refresh_token": "FAKE-RT-unknown"}, "invalid_grant"),
        ({"grant_type": "refresh_token"}, "invalid_grant"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({}, "unsupported_grant_type"),
    ],
)
def test_endpoint_rejects_bad_grants(schwab: FakeSchwab, form: Dict[str, str], error: str) -> None:
    resp = post(schwab, form)
    assert (resp.status, resp.json()["error"]) == (400, error)
    assert schwab.issued == []


@pytest.mark.parametrize(
    ("rejection", "status", "error"),
    [
        ("invalid_grant", 400, "invalid_grant"),
        ("unsupported_token_type", 400, "unsupported_token_type"),
        ("invalid_client", 401, "invalid_client"),
    ],
)
def test_endpoint_rejects_a_revoked_refresh_token_the_configured_way(
    rejection: str, status: int, error: str
) -> None:
    with FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, rejection=rejection) as fake:
        fake.revoke_refresh_tokens()  # a login elsewhere
        resp = post(fake)
    assert (resp.status, resp.json()["error"]) == (status, error)
    assert REFRESH_TOKEN not in resp.body.decode()


def test_endpoint_rejects_a_refresh_token_past_its_lifetime() -> None:
    with FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, refresh_token_lifetime=0) as fake:
        resp = post(fake)
    assert resp.status == 401
    assert resp.json() == {"error": "invalid_client", "error_description": "refresh token invalid"}


def test_endpoint_rotation_kills_the_old_refresh_token(schwab: FakeSchwab) -> None:
    schwab.rotate = True
    new = post(schwab).json()["refresh_token"]
    assert new != REFRESH_TOKEN
    assert schwab.valid_refresh_tokens == {new}
    assert post(schwab).status == 400
    assert post(schwab, {"grant_type": "refresh_token", "refresh_token": new}).status == 200


def test_endpoint_can_omit_the_refresh_token(schwab: FakeSchwab) -> None:
    schwab.rotate = True
    schwab.script("success_without_refresh_token")
    body = post(schwab).json()
    assert "refresh_token" not in body
    assert schwab.valid_refresh_tokens == {REFRESH_TOKEN}


def test_endpoint_lifetime_sets_expires_in(schwab: FakeSchwab) -> None:
    schwab.lifetime = 5
    assert post(schwab).json()["expires_in"] == 5


def code_form(code: str, redirect_uri: str = "https://127.0.0.1:8182") -> Dict[str, str]:
    return {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}


def test_endpoint_exchanges_a_code_once_and_the_login_replaces_refresh_tokens(
    schwab: FakeSchwab,
) -> None:
    code = schwab.issue_code("https://127.0.0.1:8182")
    assert code.endswith("@")
    body = post(schwab, code_form(code)).json()
    assert schwab.valid_refresh_tokens == {body["refresh_token"]}
    again = post(schwab, code_form(code))
    assert (again.status, again.json()["error"]) == (400, "invalid_grant")
    assert post(schwab).status == 400  # the old refresh token died with the new login


@pytest.mark.parametrize("case", ["wrong-redirect", "expired", "unknown", "bad-auth"])
def test_endpoint_rejects_bad_code_exchanges(schwab: FakeSchwab, case: str) -> None:
    code = schwab.issue_code("https://127.0.0.1:8182", lifetime=0 if case == "expired" else 30)
    form = code_form(code)
    if case == "wrong-redirect":
        form["redirect_uri"] = "https://127.0.0.1:9999"
    if case == "unknown":
        form["code"] = "FAKE-CODE-unknown@"
    resp = post(schwab, form, authorization=basic(secret="x") if case == "bad-auth" else None)
    assert resp.status == (401 if case == "bad-auth" else 400)
    assert schwab.valid_refresh_tokens == {REFRESH_TOKEN}


Check = Callable[[Response], bool]


def json_error(expected: str) -> Check:
    return lambda r: (
        r.headers["Content-Type"] == "application/json" and (r.json()["error"] == expected)
    )


def not_json(r: Response) -> bool:
    try:
        json.loads(r.body)
    except ValueError:
        return True
    return False


CANNED: List[Tuple[str, Dict[str, Any], int, Check]] = [
    ("invalid_grant", {}, 400, json_error("invalid_grant")),
    (
        "unsupported_token_type",
        {},
        400,
        lambda r: "refresh_token_authentication_error" in r.json()["error_description"],
    ),
    ("invalid_client", {}, 401, json_error("invalid_client")),
    ("invalid_client", {"status": 400}, 400, json_error("invalid_client")),
    ("html_403", {}, 403, lambda r: b"Access Denied" in r.body and not_json(r)),
    ("rate_limited", {"retry_after": 7}, 429, lambda r: r.headers["Retry-After"] == "7"),
    ("server_error", {}, 500, json_error("server_error")),
    ("server_error", {"status": 502}, 502, not_json),
    ("server_error", {"status": 503}, 503, not_json),
    ("malformed_json", {}, 200, not_json),
    ("json_array", {}, 200, lambda r: isinstance(r.json(), list)),
    ("empty_body", {}, 200, lambda r: r.body == b""),
    ("missing_access_token", {}, 200, lambda r: "access_token" not in r.json()),
    ("expires_in_string", {}, 200, lambda r: isinstance(r.json()["expires_in"], str)),
    ("access_token_number", {}, 200, lambda r: isinstance(r.json()["access_token"], int)),
    (
        "redirect",
        {},
        302,
        lambda r: r.headers["Location"].endswith(REDIRECT_TARGET_PATH),
    ),
    ("oversized", {"size": 1000}, 200, lambda r: len(r.body) == 1000),
    ("delay", {"seconds": 0.01}, 200, lambda r: "access_token" in r.json()),
    ("slow_drip", {"seconds": 0.0002}, 200, lambda r: "access_token" in r.json()),
]


@pytest.mark.parametrize(
    ("mode", "params", "status", "check"),
    CANNED,
    ids=[f"{m}-{p.get('status', '')}" if p.get("status") else m for m, p, _, _ in CANNED],
)
def test_endpoint_mode_answers_as_named(
    schwab: FakeSchwab, mode: str, params: Dict[str, Any], status: int, check: Check
) -> None:
    schwab.script(mode, **params)
    resp = post(schwab)
    assert resp.status == status
    assert check(resp)
    assert schwab.requests[-1].mode == mode
    assert post(schwab).status == 200  # one-shot: back to the default


def test_endpoint_default_mode_applies_after_the_script(schwab: FakeSchwab) -> None:
    schwab.set_default("server_error", status=503)
    schwab.script("success", times=2)
    assert [post(schwab).status for _ in range(3)] == [200, 200, 503]


def test_endpoint_rejects_unknown_modes(schwab: FakeSchwab) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        schwab.script("sucess")


def test_endpoint_reset_closes_mid_response(schwab: FakeSchwab) -> None:
    schwab.script("reset")
    with pytest.raises((ConnectionError, http.client.IncompleteRead)):
        post(schwab)


def test_endpoint_delay_answers_late(schwab: FakeSchwab) -> None:
    schwab.script("delay", seconds=0.15)
    started = time.monotonic()
    assert post(schwab).status == 200
    assert time.monotonic() - started >= 0.15


def test_endpoint_logs_fingerprints_not_tokens(schwab: FakeSchwab) -> None:
    post(schwab)
    assert schwab.wait_for_requests(1, timeout=0.1)
    record = schwab.requests[0]
    assert record.token_fingerprint == fingerprint(REFRESH_TOKEN)
    assert REFRESH_TOKEN not in repr(record)
    assert (record.grant_type, record.status, record.client_ok) == ("refresh_token", 200, True)


def raw_request(fake: FakeSchwab) -> socket.socket:
    """A token request on a bare socket, so the test controls the reading."""
    body = urlencode({"grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN})
    head = (
        f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\n"
        f"Content-Type: {FORM}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    client = socket.create_connection(("127.0.0.1", fake.port), timeout=2)
    client.sendall((head + body).encode())
    return client


def assert_stops_quickly(fake: FakeSchwab) -> None:
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("mode", "params"),
    [("hang", {}), ("slow_drip", {"seconds": 1.0}), ("oversized", {}), ("delay", {"seconds": 60})],
)
def test_endpoint_stops_at_once_with_stuck_clients(
    schwab: FakeSchwab, mode: str, params: Dict[str, Any]
) -> None:
    schwab.script(mode, **params)
    client = raw_request(schwab)
    assert schwab.wait_for_requests(1, timeout=1)
    time.sleep(0.05)  # let oversized fill the socket buffers: its writer is now blocked
    assert_stops_quickly(schwab)
    client.close()


def test_endpoint_hang_never_answers(schwab: FakeSchwab) -> None:
    schwab.script("hang")
    with pytest.raises(socket.timeout):
        post(schwab, timeout=0.1)


def test_endpoint_slow_drip_sends_one_byte_per_interval(schwab: FakeSchwab) -> None:
    schwab.script("slow_drip", seconds=0.05)
    with raw_request(schwab) as client:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(1)
        time.sleep(0.175)
        client.setblocking(False)
        dripped = client.recv(4096)
    assert b"Content-Length" in head
    assert 1 <= len(dripped) < 20  # a trickle, not the ~200-byte body


def test_endpoint_oversized_streams_without_end(schwab: FakeSchwab) -> None:
    schwab.script("oversized")
    with raw_request(schwab) as client:
        total = 0
        while total < 20_000_000:
            total += len(client.recv(1 << 20))
    assert schwab.requests[0].status == 200


@pytest.fixture
def tls(tls_schwab: TlsEndpoint) -> Tuple[FakeSchwab, ssl.SSLContext]:
    context = ssl.create_default_context(cafile=str(tls_schwab.ca_file))
    return tls_schwab.fake, context


def test_endpoint_serves_tls_with_a_test_ca(tls: Tuple[FakeSchwab, ssl.SSLContext]) -> None:
    fake, context = tls
    assert fake.url.startswith("https://127.0.0.1:")
    assert post(fake, context=context).status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        other_ca = trustme.CA().cert_pem.bytes().decode()
        post(fake, context=ssl.create_default_context(cadata=other_ca))


def test_endpoint_tls_hang_still_stops_at_once(tls: Tuple[FakeSchwab, ssl.SSLContext]) -> None:
    fake, _ = tls
    idle = socket.create_connection(("127.0.0.1", fake.port))  # never starts the handshake
    time.sleep(0.05)
    assert_stops_quickly(fake)
    idle.close()


@pytest.fixture
def cli_endpoint() -> Iterator[Tuple[subprocess.Popen[str], str]]:
    cmd = [
        sys.executable, "-m", "tests.fakes.schwab", "--port", "0",
        "--app-key", APP_KEY, "--app-secret", APP_SECRET, "--refresh-token", REFRESH_TOKEN,
        "--lifetime", "60", "--rotate",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        try:
            yield proc, first
        finally:
            if proc.poll() is None:
                proc.kill()


def test_endpoint_cli_announces_its_url_and_stops_on_sigterm(
    cli_endpoint: Tuple[subprocess.Popen[str], str],
) -> None:
    proc, first = cli_endpoint
    assert first.startswith("listening on http://127.0.0.1:")
    assert first.endswith(f"{TOKEN_PATH}\n")
    port = int(first.rsplit(":", 1)[1].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    form = urlencode({"grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN})
    conn.request("POST", TOKEN_PATH, form, {"Content-Type": FORM, "Authorization": basic()})
    body = json.loads(conn.getresponse().read())
    conn.close()
    assert body["expires_in"] == 60
    assert body["refresh_token"] != REFRESH_TOKEN
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=3) == 0


# -- the shared fixtures --------------------------------------------------------------------


def test_bundle_holds_private_schwab_py_files(bundle: Bundle) -> None:
    for secret_file in (bundle.app_config, bundle.token_file):
        assert secret_file.stat().st_mode & 0o777 == 0o600
    data = bundle.read_tokens()
    assert data["token"]["refresh_token"] == REFRESH_TOKEN
    assert isinstance(data["token"]["expires_at"], int)
    assert {"id_token", "x_unknown_token_field"} <= set(data["token"])
    assert data["creation_timestamp"] < time.time() - 3600  # logged in a day ago
    assert bundle.logs.is_dir()


def test_secret_registry_finds_whole_and_truncated_secrets(tmp_path: Path) -> None:
    registry = SecretRegistry(secrets={REFRESH_TOKEN})
    log = tmp_path / "x.log"
    log.write_text(f"refreshed with ...{REFRESH_TOKEN.rsplit('-', 1)[1]}\n")
    registry.add_path(log, tmp_path / "never-written.log")
    registry.add_text("clean stderr", "token 1a2b3c4d refreshed")
    assert registry.findings() == [f"{log}: {REFRESH_TOKEN.rsplit('-', 1)[1]}"]


def test_secret_registry_fixture_is_the_shared_one(secret_registry: SecretRegistry) -> None:
    assert secret_registry is tests.conftest._REGISTRY
    assert APP_SECRET in secret_registry.secrets


STUB_SENDER = """
import signal, sys, time
args = sys.argv[1:]
with open(args[args.index("--log-file") + 1], "a") as log:
    log.write("[2026-01-01 00:00:00] INFO: stub started\\n")
if "--once" in args:
    print(" ".join(args))
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(30)
"""


def test_sender_helpers_pass_every_path_and_watch_the_log(
    sender: Sender, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stub = tmp_path / "stub_sender.py"
    stub.write_text(STUB_SENDER)
    monkeypatch.setattr(tests.conftest, "SENDER", stub)
    result = sender.run("--once", "--socket", "/tmp/override.sock")
    assert result.returncode == 3
    args = result.stdout.split()
    assert args[args.index("--token-url") + 1] == sender.token_url
    assert args[-2:] == ["--socket", "/tmp/override.sock"]  # later options win in argparse
    daemon = sender.start()
    assert "stub started" in daemon.wait_for_log("stub started", after=1)
    assert daemon.stop() == 0
    with pytest.raises(AssertionError, match="no log line matching"):
        daemon.wait_for_log("never logged", timeout=0.05)
