"""--login: the weekly authorization-code login, end to end against the fake endpoint."""

from __future__ import annotations

import subprocess
import time
import urllib.parse
from typing import Optional

import pytest

from tests.conftest import CALLBACK_URL, Bundle, Sender, sender_env
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab


def redirect_for(code: str, extra: str = "&session=fake-session-id") -> str:
    # Schwab percent-encodes the code, whose last character is '@'.
    return f"{CALLBACK_URL}/?code={urllib.parse.quote(code, safe='')}{extra}"


def run_login(sender: Sender, redirect: Optional[str] = None, stdin: Optional[str] = None,
              *extra: str) -> subprocess.CompletedProcess[str]:
    """Run --login; the printed authorization URL carries the app key, so it is not scanned."""
    args = ["--login", *extra] + (["--redirect-url", redirect] if redirect is not None else [])
    result = subprocess.run(sender.argv(*args), input=stdin or "", capture_output=True,
                            text=True, timeout=60, check=False, env=sender_env(),
                            cwd=sender.workdir)
    scanned = "\n".join(line for line in result.stderr.splitlines()
                        if "/authorize?" not in line)
    sender.registry.add_text("login stderr", scanned)
    sender.registry.add_text("login stdout", result.stdout)
    return result


def test_login_with_redirect_url_writes_a_new_token_file_and_delivers_it(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    old = bundle.read_tokens()
    code = schwab.issue_code(CALLBACK_URL)
    started = int(time.time())
    result = run_login(sender, redirect_for(code))
    assert result.returncode == 0, result.stderr
    assert "/v1/oauth/authorize?client_id=" in result.stderr
    after = bundle.read_tokens()
    issued = schwab.latest
    assert issued is not None and issued.grant_type == "authorization_code"
    assert after["token"]["refresh_token"] == issued.refresh_token
    assert after["token"]["access_token"] == issued.access_token
    assert started <= after["creation_timestamp"] <= int(time.time())
    assert after["creation_timestamp"] != old["creation_timestamp"]
    assert after["x_unknown_top_level"] == "kept"
    assert [r.payload["access_token"] for r in bot.received] == [issued.access_token]
    assert code not in result.stderr + result.stdout
    assert code not in bundle.log_file.read_text()
    assert bundle.token_file.stat().st_mode & 0o077 == 0


def test_login_reads_the_url_from_standard_input(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    code = schwab.issue_code(CALLBACK_URL)
    result = run_login(sender, stdin=redirect_for(code) + "\n")
    assert result.returncode == 0, result.stderr
    issued = schwab.latest
    assert issued is not None and bundle.read_tokens()["token"]["access_token"] == (
        issued.access_token)


def test_creation_timestamp_set_by_the_login_is_kept_by_later_refreshes(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    assert run_login(sender, redirect_for(schwab.issue_code(CALLBACK_URL))).returncode == 0
    login_time = bundle.read_tokens()["creation_timestamp"]
    for _ in range(2):
        result = sender.run("--once", "--force")
        assert result.returncode == 0, result.stderr
    after = bundle.read_tokens()
    assert after["creation_timestamp"] == login_time
    issued = schwab.latest
    assert issued is not None and issued.grant_type == "refresh_token"
    assert after["token"]["access_token"] == issued.access_token


def test_a_running_daemon_picks_up_the_new_login_and_resumes(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=400, age=8 * 86400)
    schwab.revoke_refresh_tokens()
    daemon = sender.start()
    daemon.wait_for_log("a new login is needed")
    mark = daemon.mark()
    result = run_login(sender, redirect_for(schwab.issue_code(CALLBACK_URL)))
    assert result.returncode == 0, result.stderr
    line = daemon.wait_for_log("new login detected", after=mark)
    assert "refresh token valid until" in line
    issued = schwab.latest
    assert issued is not None
    assert bot.wait_for(2)
    assert daemon.stop() == 0
    assert bot.received[-1].payload["refresh_token"] == issued.refresh_token


def test_login_creates_a_missing_token_file_private_to_its_owner(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    bundle.token_file.unlink()
    result = run_login(sender, redirect_for(schwab.issue_code(CALLBACK_URL)))
    assert result.returncode == 0, result.stderr
    st = bundle.token_file.stat()
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == bundle.configs.stat().st_uid
    assert set(bundle.read_tokens()) == {"creation_timestamp", "token"}


def test_every_message_about_a_dead_refresh_token_names_the_login_command_with_its_paths(
    sender: Sender, bundle: Bundle
) -> None:
    bundle.write_tokens(age=7 * 86400 - 3600)
    result = sender.run("--check")
    assert "run_token_sender.sh --login" in result.stdout
    assert f"--token-file {bundle.token_file}" in result.stdout
    assert f"--app-config {bundle.app_config}" in result.stdout


BAD_REDIRECTS = {
    "wrong host": "https://evil.example:8182/?code=FAKE-CODE%40",
    "wrong port": "https://127.0.0.1:9999/?code=FAKE-CODE%40",
    "wrong scheme": "http://127.0.0.1:8182/?code=FAKE-CODE%40",
    "wrong path": "https://127.0.0.1:8182/elsewhere?code=FAKE-CODE%40",
    "missing code": "https://127.0.0.1:8182/?session=abc",
    "empty code": "https://127.0.0.1:8182/?code=&session=abc",
    "wrong state": "https://127.0.0.1:8182/?code=FAKE-CODE%40&state=not-ours",
    "error redirect": "https://127.0.0.1:8182/?error=access_denied&error_description=denied",
    "garbage": "hello there",
    "empty": "",
    "bad port": "https://127.0.0.1:99999/?code=x",
}
EXPECTED = {
    "wrong host": "does not go to this app's callback_url",
    "wrong port": "does not go to this app's callback_url",
    "wrong scheme": "does not go to this app's callback_url",
    "wrong path": "does not go to this app's callback_url",
    "missing code": "has no code parameter",
    "empty code": "has no code parameter",
    "wrong state": "state does not match",
    "error redirect": "error=access_denied",
    "garbage": "is not a URL",
    "empty": "is not a URL",
    "bad port": "valid port",
}


@pytest.mark.parametrize("case", sorted(BAD_REDIRECTS))
def test_a_bad_pasted_url_is_one_clear_line_and_changes_nothing(
    case: str, sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    before = bundle.token_bytes()
    result = run_login(sender, BAD_REDIRECTS[case])
    assert result.returncode == 65, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and EXPECTED[case] in errors[0]
    assert "Traceback" not in result.stderr
    assert bundle.token_bytes() == before
    assert schwab.requests == [] and bot.received == []


@pytest.mark.parametrize("case", ["reused code", "expired code", "redirect mismatch",
                                  "server error"])
def test_endpoint_errors_during_the_exchange_exit_77_or_75_and_write_nothing(
    case: str, sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    if case == "reused code":
        code = schwab.issue_code(CALLBACK_URL)
        assert run_login(sender, redirect_for(code)).returncode == 0
    elif case == "expired code":
        code = schwab.issue_code(CALLBACK_URL, lifetime=0)
    elif case == "redirect mismatch":
        code = schwab.issue_code("https://127.0.0.1:9999")
    else:
        code = schwab.issue_code(CALLBACK_URL)
        schwab.set_default("server_error")
    before = bundle.token_bytes()
    delivered = len(bot.received)
    result = run_login(sender, redirect_for(code))
    expected = 75 if case == "server error" else 77
    assert result.returncode == expected, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert ("rejected the login" in errors[0]) == (expected == 77)
    assert bundle.token_bytes() == before
    assert len(bot.received) == delivered
