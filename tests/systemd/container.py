"""Boot a real systemd as PID 1 of a throw-away container and drive it from the host.

How and why (every step is explained in shared/notes/systemd-container.md):

- the root file system is built once by ``build_rootfs.sh`` and booted with
  ``--volatile=overlay``: it stays read-only, each container starts from a clean host and
  every change is thrown away at halt;
- ``systemd-nspawn`` runs in its own mount namespace with a tmpfs on ``/run`` and from a
  dedicated cgroup folder (one per container, removed after halt), so nothing is left on
  the host;
- the container shares the host's network (the fake Schwab endpoint on the host's
  127.0.0.1 and PyPI through this machine's proxy are reachable) and sees the host's CA
  folder read-only;
- commands run with ``nsenter --target PID1 --all`` and a clean environment.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence, Union

HERE = Path(__file__).resolve().parent
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


def build_rootfs(cache_dir: Path) -> Path:
    """Build (or reuse) the cached root file system and return its path."""
    proc = subprocess.run(
        [str(HERE / "build_rootfs.sh"), str(cache_dir)],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    return Path(proc.stdout.strip().splitlines()[-1])


class ContainerError(RuntimeError):
    """The container did not boot, or a command inside it failed."""


class Container:
    """One booted systemd container. Use as a context manager: halts and cleans up on exit."""

    def __init__(self, rootfs: Path, name: str, log_dir: Path,
                 binds: Sequence[str] = (), persist: Optional[Path] = None) -> None:
        """persist: keep the container's changes in this folder (an overlay on the root file
        system) instead of throwing them away at halt, so that halt + boot is a reboot."""
        self.persist = persist
        self.rootfs = rootfs
        self.binds = list(binds)
        self.name = name
        self.log_dir = log_dir
        self.pid1 = 0
        self._nspawn: Optional[subprocess.Popen[bytes]] = None
        self._cgroups = [root / f"trs-test-{name}" for root in CGROUP_ROOTS if root.is_dir()]

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt()

    def _enter_cgroups(self) -> None:
        """Runs in the child before exec: move it into this container's cgroup folders."""
        for cgroup in self._cgroups:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def boot(self, timeout: float = 30.0) -> None:
        for cgroup in self._cgroups:
            cgroup.mkdir(exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        console = (self.log_dir / "console.log").open("wb")
        mounts = "mount -t tmpfs tmpfs /run"
        if self.persist is None:
            root = ["--volatile=overlay", f"--directory={self.rootfs}"]
        else:
            upper, work, merged = (self.persist / d for d in ("upper", "work", "merged"))
            for folder in (upper, work, merged):
                folder.mkdir(parents=True, exist_ok=True)
            # Mounted in the private mount namespace below: gone with it, kept on disk.
            mounts += (f" && mount -t overlay overlay -o lowerdir={self.rootfs},"
                       f"upperdir={upper},workdir={work} {merged}")
            root = [f"--directory={merged}"]
        nspawn = [
            "systemd-nspawn", "--boot", "--register=no", "--keep-unit", *root,
            f"--machine={self.name}", "--bind-ro=/etc/ssl/certs", "--console=pipe", "--quiet",
            *(f"--bind={bind}" for bind in self.binds),
        ]
        self._nspawn = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
             mounts + ' && exec "$@"', "sh", *nspawn],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            preexec_fn=self._enter_cgroups,
            start_new_session=True,
        )
        console.close()
        deadline = time.monotonic() + timeout
        while not self.pid1:
            self._check_alive()
            self.pid1 = self._find_pid1()
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name}: no systemd PID 1 after {timeout}s")
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            self._check_alive()
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name}: system state {state!r} after {timeout}s")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            log = (self.log_dir / "console.log").read_text(errors="replace")[-3000:]
            raise ContainerError(f"{self.name}: systemd-nspawn exited: {log}")

    def _find_pid1(self) -> int:
        assert self._nspawn is not None
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return 0
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return 0

    def halt(self, timeout: float = 20.0) -> None:
        if self._nspawn is not None and self._nspawn.poll() is None:
            self._nspawn.send_signal(signal.SIGTERM)
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._nspawn.pid, signal.SIGKILL)
                self._nspawn.wait(5)
        self._nspawn = None
        self.pid1 = 0
        for cgroup in self._cgroups:
            _rmdir_tree(cgroup)

    # -- driving it --------------------------------------------------------------------------

    def nsenter(self) -> list[str]:
        return ["nsenter", "--target", str(self.pid1), "--all", "--",
                "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}", "HOME=/root", "LANG=C.UTF-8"]

    def run(
        self, args: Sequence[str], *, check: bool = True,
        input: Union[str, bytes, None] = None, timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        data = input.decode() if isinstance(input, bytes) else input
        proc = subprocess.run(
            [*self.nsenter(), *args], input=data, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise ContainerError(
                f"{self.name}: {shlex.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sh(self, script: str, *, check: bool = True) -> str:
        return self.run(["/bin/sh", "-ec", script], check=check).stdout

    def write(self, path: str, content: Union[str, bytes], mode: str = "0644",
              owner: str = "root:root") -> None:
        data = content.encode() if isinstance(content, str) else content
        quoted = shlex.quote(path)
        proc = subprocess.run(
            [*self.nsenter(), "/bin/sh", "-ec",
             f"mkdir -p \"$(dirname {quoted})\"; cat > {quoted}; "
             f"chmod {mode} {quoted}; chown {owner} {quoted}"],
            input=data, capture_output=True, check=False,
        )
        if proc.returncode != 0:
            raise ContainerError(f"{self.name}: writing {path}: {proc.stderr.decode()}")

    def read(self, path: str) -> str:
        return self.run(["cat", "--", path]).stdout

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def timestamp(self, unit: str, prop: str) -> float:
        """A unit's timestamp property as unix time (0 when unset)."""
        out = self.run(["systemctl", "show", unit, "--timestamp=unix", f"--property={prop}",
                        "--value"]).stdout.strip()
        return float(out.lstrip("@") or 0)

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.run(["journalctl", "-u", unit, "--no-pager", "-n", str(lines), "-o", "cat"],
                        check=False).stdout


def _rmdir_tree(path: Path) -> None:
    """Remove a cgroup folder and its sub-folders, depth first (cgroupfs wants rmdir only)."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            _rmdir_tree(child)
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
