"""MIGRATION.md as test input: its tagged shell blocks, the unit and logrotate rule they write.

Every fenced block in MIGRATION.md is preceded by one of these tags on the line before it:

    <!-- test: NAME -->        runs on the trading host: tests/systemd/test_migrate_by_hand.py
                               runs it as written (after the `variables` block) in a container
    <!-- controller -->        runs on the Ansible controller: tests/test_migration_doc.py checks
                               that its playbooks exist and parse
    <!-- not run: REASON -->   cannot run in a test (an interactive login with a browser)

HOST_BLOCKS names the tagged host blocks in the order the migration runs them;
tests/test_migration_doc.py checks that the document has exactly those.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "MIGRATION.md"

HOST_BLOCKS = (
    "variables",
    "before-you-start",
    "by-hand-install",
    "by-hand-switch",
    "verify",
    "by-hand-cleanup",
    "by-hand-rollback",
    "by-hand-rollback-manual",
)

TAG = re.compile(r"^<!-- (?:test: (?P<test>[a-z0-9-]+)|(?P<controller>controller)"
                 r"|not run: (?P<reason>[^>]+?)) -->$")
UNIT_PATH = "/etc/systemd/system/token-refresh-sender.service"
LOGROTATE_PATH = "/etc/logrotate.d/token-refresh-sender"


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    tag: str  # the tag line before the fence, "" when there is none
    body: str

    @property
    def test_name(self) -> str:
        match = TAG.match(self.tag)
        return (match.group("test") or "") if match else ""

    @property
    def controller(self) -> bool:
        match = TAG.match(self.tag)
        return bool(match and match.group("controller"))


def blocks(text: str) -> List[Block]:
    """Every fenced block with the tag line right before it."""
    found: List[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body: List[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        tag = lines[start - 1].strip() if start > 0 else ""
        found.append(Block(start + 1, fence.group(1), tag, "\n".join(body) + "\n"))
        i += 1
    return found


def host_blocks(text: str) -> Dict[str, str]:
    return {b.test_name: b.body for b in blocks(text) if b.test_name}


def doc_variables(text: str) -> Dict[str, str]:
    """NAME=value lines of the variables block (values without quotes, comments dropped)."""
    values: Dict[str, str] = {}
    for line in host_blocks(text)["variables"].splitlines():
        match = re.match(r"^([A-Z_]+)=(\S+)", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def heredoc(script: str, target: str) -> str:
    """The text of `cat > TARGET <<EOF ... EOF` in a block, as written (unexpanded)."""
    match = re.search(rf"^cat > {re.escape(target)} <<EOF\n(.*?)^EOF$", script, re.M | re.S)
    if not match:
        raise AssertionError(f"no heredoc writing {target}")
    return match.group(1)


def expand(text: str, variables: Dict[str, str]) -> str:
    """What bash makes of an unquoted heredoc here: ${NAME} substituted, \\$ a literal $."""
    for name, value in variables.items():
        text = text.replace("${" + name + "}", value)
    return text.replace("\\$", "$")


def directives(text: str) -> List[str]:
    """A unit file or logrotate rule without comments and blank lines, whitespace-normalized."""
    return [" ".join(line.split()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def render_role_template(out: Path, root: str, template: str) -> str:
    """A role template rendered with the role's defaults (tests/ansible/render_unit.yml)."""
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1")
    proc = subprocess.run(
        [str(venv_bin / "ansible-playbook"),
         str(REPO / "tests" / "ansible" / "render_unit.yml"), "-i", "localhost,",
         "-e", f"out={out}", "-e", f"token_refresh_sender_root={root}",
         "-e", f"role_template={template}", "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return out.read_text()
