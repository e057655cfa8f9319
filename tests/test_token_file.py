"""The token file: atomic rewrites, modes and owner, the lock, and storage that fails."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import APP_KEY, APP_SECRET, REFRESH_TOKEN, Bundle, Sender
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, chown, setuid)")


def temp_files(bundle: Bundle) -> list:
    return sorted(bundle.configs.glob(".schwab_tokens.json.*.tmp"))


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660])
def test_rewrite_keeps_the_mode_and_never_opens_it_to_others(
    mode: int, sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    bundle.token_file.chmod(mode)
    result = sender.run("--once")
    assert result.returncode == 0, result.stderr
    assert bundle.token_file.stat().st_mode & 0o777 == mode
    assert temp_files(bundle) == []


@needs_root
def test_rewrite_as_root_keeps_the_owner(sender: Sender, bundle: Bundle, bot: FakeBot) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chown(bundle.token_file, nobody.pw_uid, nobody.pw_gid)
    inode = bundle.token_file.stat().st_ino
    assert sender.run("--once").returncode == 0
    st = bundle.token_file.stat()
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert st.st_ino != inode, "replaced by rename, not rewritten in place"


def test_lock_file_sits_next_to_the_token_file(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    assert sender.run("--once").returncode == 0
    lock = bundle.configs / "schwab_tokens.json.lock"
    assert lock.exists() and lock.stat().st_mode & 0o077 == 0


def test_two_senders_never_refresh_the_same_rotating_token_twice(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    # Each refresh kills the refresh token it used: a second use would be rejected.
    with FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, rotate=True, lifetime=4) as rotating:
        sender.token_url = rotating.url
        daemon = sender.start()
        assert bot.wait_for(1, timeout=5)
        for _ in range(6):
            manual = sender.run("--once", "--force")
            assert manual.returncode == 0, manual.stderr
            time.sleep(0.3)
        assert daemon.stop() == 0
        sender.registry.add_secret(*rotating.secret_values())
        statuses = [r.status for r in rotating.token_requests]
        assert statuses and all(status == 200 for status in statuses), statuses
        final = bundle.read_tokens()["token"]["refresh_token"]
        assert final in rotating.valid_refresh_tokens
        latest = rotating.latest
        assert latest is not None and final == latest.refresh_token


# -- storage faults -----------------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def move_token_file(bundle: Bundle, folder: Path) -> Path:
    """Point the bundle's token file into `folder` (e.g. a tiny filesystem)."""
    target = folder / "schwab_tokens.json"
    target.write_bytes(bundle.token_bytes())
    target.chmod(0o600)
    return target


@needs_root
def test_full_disk_keeps_the_old_file_intact_and_still_delivers_the_new_token(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "tiny", "64k") as folder:
        token_file = move_token_file(bundle, folder)
        before = token_file.read_bytes()
        filler = folder / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        result = sender.run("--once", "--token-file", str(token_file))
        assert result.returncode == 73, result.stderr
        assert "No space left on device" in result.stderr
        assert "previous file is intact" in result.stderr
        assert token_file.read_bytes() == before
        assert list(folder.glob(".*.tmp")) == []
        issued = schwab.latest
        assert issued is not None
        assert [r.payload["access_token"] for r in bot.received] == [issued.access_token]


@needs_root
def test_read_only_filesystem_keeps_the_old_file_and_still_delivers(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "ro", "1m") as folder:
        token_file = move_token_file(bundle, folder)
        (folder / "schwab_tokens.json.lock").touch(mode=0o600)
        before = token_file.read_bytes()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=False)
        assert remount.returncode == 0
        result = sender.run("--once", "--token-file", str(token_file))
        assert result.returncode == 73, result.stderr
        assert "Read-only file system" in result.stderr
        assert token_file.read_bytes() == before
        assert len(bot.received) == 1


SYSTEM_PYTHON = Path("/usr/bin/python3")


@needs_root
def test_a_token_folder_the_service_user_cannot_write_is_reported_and_the_bot_served(
    bundle: Bundle, schwab: FakeSchwab, sender: Sender
) -> None:
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import yaml"], check=False)
    if probe.returncode != 0:
        pytest.skip("the system python3 has no PyYAML")
    nobody = pwd.getpwnam("nobody")
    ids = {"user": nobody.pw_uid, "group": nobody.pw_gid}
    # Everything the service user needs, outside root's private pytest folders.
    home = Path(f"/tmp/tb-nobody-{os.getpid()}")
    home.mkdir(mode=0o755)
    try:
        locked = home / "configs"
        locked.mkdir(mode=0o755)  # root-owned: the sender may not create files here
        token_file = move_token_file(bundle, locked)
        app_config = home / "app.yaml"
        app_config.write_bytes(bundle.app_config.read_bytes())
        settings = home / "settings.yaml"
        settings.write_bytes(bundle.settings.read_bytes())
        for path in (token_file, app_config):
            path.chmod(0o600)
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        before = token_file.read_bytes()
        sender_copy = home / "token_refresh_sender.py"
        sender_copy.write_bytes(Path(sender.argv()[1]).read_bytes())
        bot_dir = home / "bot"
        bot_dir.mkdir()
        os.chown(bot_dir, nobody.pw_uid, nobody.pw_gid)
        bot_proc = subprocess.Popen(
            [str(SYSTEM_PYTHON), "-m", "tests.fakes.bot", "--socket", str(bot_dir / "s"),
             "--record", str(bot_dir / "got.jsonl")],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
            **ids)
        try:
            assert bot_proc.stdout is not None and "listening" in bot_proc.stdout.readline()
            argv = [str(SYSTEM_PYTHON), str(sender_copy), "--app-config", str(app_config),
                    "--token-file", str(token_file), "--config", str(settings),
                    "--log-file", "-", "--state-file", str(bot_dir / "state.json"),
                    "--socket", str(bot_dir / "s"), "--token-url", schwab.url]
            result = subprocess.run([*argv, "--once"], capture_output=True, text=True,
                                    timeout=60, check=False, cwd="/", **ids)
            sender.registry.add_text("nobody stderr", result.stderr)
            assert result.returncode == 73, result.stderr
            assert "Permission denied" in result.stderr
            assert token_file.read_bytes() == before
            assert (bot_dir / "got.jsonl").read_text().count("\n") == 1
            check = subprocess.run([*argv, "--check"], capture_output=True, text=True,
                                   timeout=60, check=False, cwd="/", **ids)
            sender.registry.add_text("nobody --check", check.stdout + check.stderr)
            assert check.returncode == 73
            assert f"token folder {locked} is not writable by this user (nobody)" in (
                check.stdout)
        finally:
            bot_proc.terminate()
            bot_proc.wait(5)
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


@needs_root
def test_a_token_that_could_not_be_written_is_saved_once_the_disk_is_writable_again(
    sender: Sender, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "flaky", "1m") as folder:
        token_file = move_token_file(bundle, folder)
        (folder / "schwab_tokens.json.lock").touch(mode=0o600)
        before = token_file.read_bytes()
        assert subprocess.run(["mount", "-o", "remount,ro", str(folder)]).returncode == 0
        daemon = sender.start("--token-file", str(token_file))
        daemon.wait_for_log("could not write token file")
        assert bot.wait_for(1)
        assert token_file.read_bytes() == before
        assert subprocess.run(["mount", "-o", "remount,rw", str(folder)]).returncode == 0
        daemon.wait_for_log("written after the earlier failure", timeout=10)
        issued = schwab.latest
        assert issued is not None
        assert b'"' + issued.access_token.encode() + b'"' in token_file.read_bytes()
        assert daemon.stop() == 0


@needs_root
def test_a_run_as_root_leaves_the_lock_and_log_to_the_service_user(
    sender: Sender, bundle: Bundle, bot: FakeBot
) -> None:
    # configs/ and logs/ belong to the service user; root runs --once by hand.
    nobody = pwd.getpwnam("nobody")
    for folder in (bundle.configs, bundle.logs):
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    assert sender.run("--once").returncode == 0
    for path in (bundle.configs / "schwab_tokens.json.lock", bundle.log_file,
                 bundle.state_file):
        assert path.stat().st_uid == nobody.pw_uid, path
