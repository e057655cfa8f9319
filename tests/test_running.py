"""The three ways to run the sender: the uv wrapper, `uv run`, plain python3 (3.9 and up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SENDER, Bundle, Sender, sender_env
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab

WRAPPER = REPO / "scripts" / "run_token_sender.sh"
UV = Path(sys.executable).parent / "uv"
PYTHON39 = Path("/root/.pyenv/versions/3.9.18/bin/python3.9")


def uv_env() -> dict:
    return sender_env({"UV": str(UV), "UV_PYTHON_DOWNLOADS": "never"})


def test_wrapper_runs_the_sender_from_any_directory_and_through_a_symlink(
    tmp_path: Path,
) -> None:
    link = tmp_path / "bin" / "token-sender"
    link.parent.mkdir()
    link.symlink_to(WRAPPER)
    result = subprocess.run([str(link), "--version"], cwd="/", env=uv_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "token_refresh_sender 1.0.0"


def test_wrapper_passes_every_argument_through_and_the_main_job_works(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    argv = sender.argv("--once")
    assert argv[1] == str(SENDER)
    result = subprocess.run([str(WRAPPER), *argv[2:]], cwd=sender.workdir, env=uv_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    sender.registry.add_text("wrapper stderr", result.stderr)
    assert result.returncode == 0, result.stderr
    issued = schwab.latest
    assert issued is not None
    assert [r.payload["access_token"] for r in bot.received] == [issued.access_token]


def test_wrapper_without_uv_fails_with_one_line_saying_how_to_install_it(
    tmp_path: Path,
) -> None:
    env = sender_env({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "UV": None})
    if shutil.which("uv", path=env["PATH"]) or any(
        Path(p).exists() for p in ("/usr/local/bin/uv", "/opt/uv/bin/uv")
    ):
        pytest.skip("uv is installed system-wide on this machine")
    result = subprocess.run([str(WRAPPER), "--version"], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 69
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "uv not found" in lines[0] and "pip install uv" in lines[0]


def test_uv_run_reads_the_inline_metadata(tmp_path: Path) -> None:
    result = subprocess.run([str(UV), "run", "--script", str(SENDER), "--version"],
                            cwd=tmp_path, env=uv_env(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "token_refresh_sender 1.0.0" in result.stdout


def test_the_committed_lock_matches_the_inline_metadata() -> None:
    result = subprocess.run([str(UV), "lock", "--script", str(SENDER), "--check"],
                            env=uv_env(), capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not PYTHON39.exists(), reason="no Python 3.9 on this machine")
def test_the_sender_runs_its_main_job_on_python_3_9(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot
) -> None:
    # uv provides PyYAML for the oldest Python the header allows.
    argv = sender.argv("--once")[2:]
    result = subprocess.run(
        [str(UV), "run", "--python", str(PYTHON39), "--script", str(SENDER), *argv],
        cwd=sender.workdir, env=uv_env(), capture_output=True, text=True, timeout=180,
        check=False)
    sender.registry.add_text("py39 stderr", result.stderr)
    assert result.returncode == 0, result.stderr
    assert len(bot.received) == 1


def test_default_paths_are_relative_to_the_bundle_not_the_working_directory(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, tmp_path: Path
) -> None:
    script = bundle.install_sender()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "configs").mkdir()  # a decoy: must not be read
    result = subprocess.run(
        [sys.executable, str(script), "--once", "--socket", str(bot.path),
         "--token-url", schwab.url],
        cwd=elsewhere, env=sender_env(), capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stderr
    assert bundle.log_file.exists() and bundle.state_file.exists()
    assert len(bot.received) == 1
    assert bundle.read_tokens()["token"]["access_token"] == bot.received[0].payload[
        "access_token"]
    assert list(elsewhere.iterdir()) == [elsewhere / "configs"]


def test_missing_pyyaml_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    if not PYTHON39.exists():
        pytest.skip("needs a Python without PyYAML")
    probe = subprocess.run([str(PYTHON39), "-c", "import yaml"], capture_output=True,
                           check=False)
    if probe.returncode == 0:
        pytest.skip("that Python has PyYAML")
    result = subprocess.run([str(PYTHON39), str(SENDER), "--version"], capture_output=True,
                            text=True, timeout=30, check=False, env=sender_env())
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert "PyYAML is not installed" in result.stderr


def test_help_lists_every_documented_option() -> None:
    result = subprocess.run([sys.executable, str(SENDER), "--help"], capture_output=True,
                            text=True, check=True)
    for option in ("--app-config", "--token-file", "--config", "--socket", "--token-url",
                   "--log-file", "--log-level", "--once", "--force", "--check", "--status",
                   "--version", "--state-file", "--check-config"):
        assert option in result.stdout


def test_usage_errors_exit_64(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SENDER), "--force"], capture_output=True,
                            text=True, check=False, env=sender_env())
    assert result.returncode == 64
    assert "--force only makes sense with --once" in result.stderr


# -- TLS ----------------------------------------------------------------------------------


def test_refresh_over_real_tls_with_a_ca_given_in_ca_file(
    sender: Sender, bundle: Bundle, tls_schwab: object, bot: FakeBot
) -> None:
    from tests.conftest import TlsEndpoint

    assert isinstance(tls_schwab, TlsEndpoint)
    bundle.write_settings(ca_file=str(tls_schwab.ca_file))
    result = sender.run("--once", "--token-url", tls_schwab.url.replace("http://", "https://"))
    assert result.returncode == 0, result.stderr
    issued = tls_schwab.fake.latest
    assert issued is not None
    assert bot.received[0].payload["access_token"] == issued.access_token


def test_an_unverifiable_certificate_is_refused_and_says_why(
    sender: Sender, bundle: Bundle, tls_schwab: object, bot: FakeBot
) -> None:
    from tests.conftest import TlsEndpoint

    assert isinstance(tls_schwab, TlsEndpoint)
    before = bundle.token_bytes()
    env = {"SSL_CERT_FILE": None, "SSL_CERT_DIR": None}
    result = sender.run("--once", "--token-url", tls_schwab.url, env=env)
    assert result.returncode == 75
    assert "could not be verified" in result.stderr and "ca_file" in result.stderr
    assert tls_schwab.fake.token_requests == []
    assert bundle.token_bytes() == before
    assert bot.received == []


def test_plain_http_to_a_remote_host_is_refused_as_a_setting_error(sender: Sender) -> None:
    result = sender.run("--once", "--token-url", "http://api.schwabapi.com/v1/oauth/token")
    assert result.returncode == 78
    assert "only https:// is allowed" in result.stderr


def test_environment_does_not_expose_the_app_secret_on_the_command_line(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    from tests.conftest import APP_SECRET

    bundle.write_tokens(valid_for=1800)
    daemon = sender.start()
    assert bot.wait_for(1)
    cmdline = Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes()
    assert APP_SECRET.encode() not in cmdline
    assert APP_SECRET.encode() not in environ
    assert daemon.stop() == 0


def test_the_sender_file_is_executable_and_has_the_pep723_header() -> None:
    text = SENDER.read_text()
    assert os.access(SENDER, os.X_OK) and os.access(WRAPPER, os.X_OK)
    assert text.startswith("#!/usr/bin/env python3\n# /// script\n")
    assert 'requires-python = ">=3.9"' in text and 'dependencies = ["pyyaml>=6"]' in text


def test_relative_paths_on_the_command_line_are_relative_to_the_working_directory(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.write_tokens(valid_for=1800)
    argv = sender.argv("--once", "--log-file", "here.log", "--state-file", "here.json")
    result = subprocess.run(argv, cwd=sender.workdir, env=sender_env(), capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert (sender.workdir / "here.log").is_file()
    assert (sender.workdir / "here.json").is_file()
    sender.registry.add_path(sender.workdir / "here.log", sender.workdir / "here.json")


@pytest.mark.parametrize(
    ("environ", "proxy"),
    [
        ({}, None),
        ({"https_proxy": "http://proxy.example:3128"}, "proxy.example:3128"),
        ({"HTTPS_PROXY": "proxy.example:8080"}, "proxy.example:8080"),
        ({"https_proxy": "http://p:1", "no_proxy": "localhost,.schwabapi.com"}, None),
        ({"https_proxy": "http://p:1", "NO_PROXY": "*"}, None),
        ({"https_proxy": "http://p:1", "no_proxy": "example.com"}, "p:1"),
    ],
)
def test_https_proxy_and_no_proxy_choose_the_tunnel(
    environ: dict, proxy: str | None
) -> None:
    from urllib.parse import urlsplit

    from tests.sender_module import tsr

    url = urlsplit("https://api.schwabapi.com/v1/oauth/token")
    found = tsr._proxy_for(url, environ)
    assert (found.netloc if found is not None else None) == proxy
