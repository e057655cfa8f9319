"""Ansible connection plugin: run tasks inside a booted systemd container through nsenter.

Test code only. The inventory's ``ansible_host`` is the pid (on this machine) of the
container's PID 1; every command runs as ``nsenter --target PID --all`` with a clean
environment, so the container sees what an ssh login would give it and nothing of the
controller's environment (proxy or pip settings, virtualenv paths).
"""

from __future__ import annotations

import shlex
import subprocess
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection.local import Connection as LocalConnection

DOCUMENTATION = """
    name: nsenter
    short_description: run tasks inside a local container via nsenter (test code)
    description:
        - Runs every command as C(nsenter --target PID --all) where PID is the container's PID 1
          given as C(ansible_host); copies files by piping them through C(cat) inside it.
    author: token_refresh_sender tests
    extends_documentation_fragment:
        - connection_pipelining
    options:
        become_success_timeout:
            type: int
            default: 10
            description: Seconds to wait for become to succeed.
            vars:
                - name: ansible_local_become_success_timeout
        become_strip_preamble:
            type: bool
            default: true
            description: Strip internal become output preceding command execution.
            vars:
                - name: ansible_local_become_strip_preamble
"""

CONTAINER_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
    "USER=root",
    "LOGNAME=root",
)


class Connection(LocalConnection):
    """Local connection whose commands and file copies happen inside the container."""

    transport = "nsenter"
    has_pipelining = True

    def _pid(self) -> str:
        pid = str(self._play_context.remote_addr or "")
        if not pid.isdigit():
            raise AnsibleConnectionFailure(f"nsenter: ansible_host must be a pid, not {pid!r}")
        return pid

    def _prefix(self) -> list[str]:
        return ["nsenter", "--target", self._pid(), "--all", "--", "/usr/bin/env", "-i",
                *CONTAINER_ENV]

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        wrapped = shlex.join([*self._prefix(), "/bin/sh", "-c", cmd])
        return super().exec_command(wrapped, in_data=in_data, sudoable=sudoable)

    def _run(self, args: list[str], stdin: t.IO[bytes] | None, stdout: t.IO[bytes] | int) -> None:
        proc = subprocess.run(
            [*self._prefix(), *args], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode != 0:
            raise AnsibleError(f"nsenter {args!r} failed: {proc.stderr.decode(errors='replace')}")

    def put_file(self, in_path: str, out_path: str) -> None:
        self._connect()
        with open(in_path, "rb") as source:  # noqa: PTH123
            self._run(["/bin/sh", "-c", 'cat > "$1"', "sh", out_path], source, subprocess.PIPE)

    def fetch_file(self, in_path: str, out_path: str) -> None:
        self._connect()
        with open(out_path, "wb") as target:  # noqa: PTH123
            self._run(["/bin/cat", "--", in_path], None, target)
