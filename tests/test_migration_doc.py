"""MIGRATION.md cannot drift from the code: static checks (no root, no container).

- every fenced block is tagged (run on the host by tests/systemd/test_migrate_by_hand.py, run on
  the controller, or not run with a reason), and the host blocks are the ones that test runs;
- the unit and the logrotate rule that the by-hand migration writes are the role's templates
  rendered with the role's defaults; the uv it installs is the role's pinned version;
- the playbooks the controller blocks run exist and pass --syntax-check;
- the troubleshooting section names every error and warning the sender, its --check and its
  wrapper can print: a message added to the sender without a troubleshooting entry fails here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import yaml

from tests.systemd.migration_doc import (
    DOC,
    HOST_BLOCKS,
    LOGROTATE_PATH,
    REPO,
    TAG,
    UNIT_PATH,
    blocks,
    directives,
    doc_variables,
    expand,
    heredoc,
    host_blocks,
    render_role_template,
)

SENDER = REPO / "scripts" / "token_refresh_sender.py"
ROLE_DEFAULTS = REPO / "roles" / "token_refresh_sender" / "defaults" / "main.yml"

# Printed outside the sender's log calls and exceptions (the wrapper, the PyYAML import).
OTHER_MESSAGES = [
    "PyYAML is not installed",
    "run_token_sender.sh: error: uv not found",
    "is not an executable file",
]


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text()


def test_every_fenced_block_is_tagged(text: str) -> None:
    untagged = [b.line for b in blocks(text) if not TAG.match(b.tag)]
    assert not untagged, f"MIGRATION.md: fenced blocks without a tag at lines {untagged}"
    assert {b.lang for b in blocks(text)} == {"sh"}


def test_the_host_blocks_are_the_ones_the_systemd_test_runs(text: str) -> None:
    names = [b.test_name for b in blocks(text) if b.test_name]
    assert len(names) == len(set(names)), names
    assert sorted(names) == sorted(HOST_BLOCKS)
    assert names[0] == "variables"


def test_by_hand_unit_is_the_roles_unit_with_its_defaults(text: str, tmp_path: Path) -> None:
    variables = doc_variables(text)
    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text())
    assert variables["BUNDLE"] == defaults["token_refresh_sender_root"]
    assert variables["BOT_USER"] == defaults["token_refresh_sender_user"]
    written = expand(heredoc(host_blocks(text)["by-hand-install"], UNIT_PATH), variables)
    rendered = render_role_template(tmp_path / "unit", variables["BUNDLE"],
                                    "token-refresh-sender.service.j2")
    assert directives(written) == directives(rendered)


def test_by_hand_logrotate_rule_is_the_roles(text: str, tmp_path: Path) -> None:
    variables = doc_variables(text)
    written = expand(heredoc(host_blocks(text)["by-hand-install"], LOGROTATE_PATH), variables)
    rendered = render_role_template(tmp_path / "logrotate", variables["BUNDLE"], "logrotate.j2")
    assert directives(written) == directives(rendered)


def test_by_hand_uv_is_the_roles_pinned_version(text: str) -> None:
    version = yaml.safe_load(ROLE_DEFAULTS.read_text())["token_refresh_sender_uv_version"]
    install = host_blocks(text)["by-hand-install"]
    assert f"pip install --quiet uv=={version}" in install
    assert re.findall(r"uv==([0-9.]+)", text) == [version]
    assert f"({version})" in text  # the "What changes" table


def controller_commands(text: str) -> Iterator[List[str]]:
    for block in blocks(text):
        if block.controller:
            joined = block.body.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("ansible-playbook"):
                    yield shlex.split(line)


def test_controller_playbooks_exist_and_pass_syntax_check(text: str) -> None:
    playbooks = {words[1] for words in controller_commands(text)}
    assert playbooks == {"playbooks/deploy.yml", "playbooks/rollback.yml"}
    for words in controller_commands(text):
        assert "--limit" in words and "-i" in words
    checks = [words for words in controller_commands(text) if "--check" in words]
    assert {words[1] for words in checks} == playbooks  # a dry run first, for both
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1")
    for playbook in sorted(playbooks):
        proc = subprocess.run(
            [str(venv_bin / "ansible-playbook"), playbook, "--syntax-check", "-i", "localhost,"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


# -- troubleshooting covers every message ---------------------------------------------------

PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdgfo]")


def _constant_chunks(node: ast.expr) -> List[str]:
    """The constant parts of a message: an f-string's literal parts, a %-format's text."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return PLACEHOLDER.split(node.value)
    if isinstance(node, ast.JoinedStr):
        chunks = [""]
        for value in node.values:
            if isinstance(value, ast.Constant):
                chunks[-1] += str(value.value)
            else:
                chunks.append("")
        return chunks
    return []


def sender_messages() -> List[Tuple[int, str]]:
    """(line, key) of every error/warning text: log.error/warning, --check's FAIL/warn lines,
    the SenderError exceptions and the delivery outcomes' details. The key is the first six
    words of the message's longest constant part."""
    tree = ast.parse(SENDER.read_text())
    errors = {"SenderError"}
    grew = True
    while grew:
        grew = False
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name not in errors and any(
                    isinstance(base, ast.Name) and base.id in errors for base in node.bases):
                errors.add(node.name)
                grew = True
    found: List[Tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        message = None
        logged = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
            (func.value.id == "log" and func.attr in ("error", "warning"))
            or (func.value.id == "report" and func.attr in ("fail", "warn")))
        if logged or (isinstance(func, ast.Name) and func.id in errors):
            message = node.args[0]
        elif isinstance(func, ast.Name) and func.id == "DeliveryResult" and len(node.args) > 1:
            message = node.args[1]
        if message is None:
            continue
        chunks = [" ".join(c.strip(" :;,.()'").split()) for c in _constant_chunks(message)]
        chunks = [c for c in chunks if c]
        if chunks:
            found.append((node.lineno, " ".join(max(chunks, key=len).split()[:6])))
    return found


def test_sender_messages_are_found() -> None:
    keys = [key for _, key in sender_messages()]
    assert len(keys) > 80
    assert "Schwab rejected the refresh token: HTTP" in keys


def test_troubleshooting_names_every_message_the_sender_prints(text: str) -> None:
    section = text.split("## 8. Troubleshooting", 1)[1]
    normalized = " ".join(section.split())
    missing = [f"line {line}: {key}" for line, key in sender_messages() if key not in normalized]
    missing += [key for key in OTHER_MESSAGES if key not in normalized]
    assert not missing, "MIGRATION.md's troubleshooting does not name:\n" + "\n".join(missing)
