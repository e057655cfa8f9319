"""Fixtures of the real-systemd role tests (marker ``systemd``).

    rootfs        the cached Debian root file system (built by build_rootfs.sh on first use)
    fake_schwab   the fake token endpoint on the host's 127.0.0.1, reachable from the containers
                  (they share the host's network)
    role_vars     the variables every deploy gets: the fake endpoint, uv's system certificates,
                  and a copy of scripts/ taken at the start of the session (so that a second
                  deploy compares against the same sender even while scripts/ is being edited)
    timings       records wall times to .cache/systemd-logs/timings.json

Needs root, systemd-nspawn and debootstrap (tests/systemd/setup_host.sh installs them);
without them every test here is skipped with the reason.

When these tests are selected, the root file system build (about 1.5 minutes when it is not
cached yet) starts in the background as soon as collection ends, and these tests are moved to
the end of the run: the rest of the suite runs meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest

from tests.fakes.schwab import FakeSchwab
from tests.systemd.container import HERE
from tests.systemd.trading_host import APP_KEY, APP_SECRET, REFRESH_TOKEN, REPO

CACHE = REPO / ".cache"
LOGS = CACHE / "systemd-logs"


def _missing_requirements() -> str:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} missing: run tests/systemd/setup_host.sh"
    if not Path("/sys/fs/cgroup/systemd").is_dir() and not Path("/sys/fs/cgroup/unified").is_dir():
        return "no cgroup hierarchy to start containers from"
    return ""


_build: Optional[subprocess.Popen[str]] = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _build
    reason = _missing_requirements()
    mine, others = [], []
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.systemd)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
            mine.append(item)
        else:
            others.append(item)
    items[:] = others + mine
    if mine and not reason and _build is None:
        LOGS.mkdir(parents=True, exist_ok=True)
        _build = subprocess.Popen(
            [str(HERE / "build_rootfs.sh"), str(CACHE / "systemd-rootfs")],
            stdout=subprocess.PIPE, stderr=(LOGS / "build_rootfs.log").open("w"), text=True,
        )


class Timings:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: Dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        self.data[name] = round(seconds, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


@pytest.fixture(scope="session")
def timings() -> Timings:
    return Timings(LOGS / "timings.json")


@pytest.fixture(scope="session")
def rootfs(timings: Timings) -> Path:
    """The root file system, waiting for the background build started at collection."""
    assert _build is not None
    start = time.monotonic()
    out, _ = _build.communicate(timeout=600)
    timings.record("rootfs: waited for the build", time.monotonic() - start)
    if _build.returncode != 0:
        log = (LOGS / "build_rootfs.log").read_text(errors="replace")
        pytest.fail(f"building the root file system failed:\n{log[-3000:]}")
    return Path(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fake_schwab() -> Iterator[FakeSchwab]:
    with FakeSchwab(APP_KEY, APP_SECRET, [REFRESH_TOKEN]) as fake:
        yield fake


@pytest.fixture(scope="session")
def role_vars(fake_schwab: FakeSchwab, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    scripts = tmp_path_factory.mktemp("scripts")
    for name in ("token_refresh_sender.py", "token_refresh_sender.py.lock", "run_token_sender.sh"):
        shutil.copy2(REPO / "scripts" / name, scripts / name)
    return {
        "token_refresh_sender_source_dir": str(scripts),
        "token_refresh_sender_token_url": fake_schwab.url,
        # This machine reaches PyPI through a TLS-intercepting proxy.
        "token_refresh_sender_uv_system_certs": True,
    }
