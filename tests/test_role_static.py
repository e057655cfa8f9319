"""Static checks of the Ansible role: lint, documented variables, and the rendered unit.

- ansible-lint --offline with the production profile (.ansible-lint) reports nothing;
- meta/argument_specs.yml, defaults/main.yml and the role's README.md name the same variables,
  with the same defaults;
- the rendered unit passes `systemd-analyze verify` with no output at all, and
  `systemd-analyze security --offline=true` scores its exposure at 2.0 or less.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ROLE = REPO / "roles" / "token_refresh_sender"
VENV_BIN = Path(sys.executable).parent
UNIT = "token-refresh-sender.service"


def _tool(name: str) -> str:
    found = VENV_BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


def _defaults() -> Dict[str, Any]:
    data: Dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    return data


def _specs() -> Dict[str, Any]:
    doc = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options: Dict[str, Any] = doc["argument_specs"]["main"]["options"]
    return options


def test_ansible_lint_production_profile_has_no_findings() -> None:
    proc = subprocess.run(
        [_tool("ansible-lint"), "--offline", "--nocolor"], cwd=REPO, env=_env(),
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_argument_specs_and_defaults_have_the_same_keys_and_defaults() -> None:
    defaults, specs = _defaults(), _specs()
    assert sorted(specs) == sorted(defaults)
    for name, spec in specs.items():
        assert spec.get("description"), f"{name} has no description"
        assert "type" in spec, f"{name} has no type"
        assert spec.get("default") == defaults[name], name


def test_every_public_variable_is_prefixed_and_in_the_readme() -> None:
    readme = (ROLE / "README.md").read_text()
    for name in _defaults():
        assert name.startswith("token_refresh_sender_"), name
        assert f"`{name}`" in readme, f"{name} is not documented in the role's README.md"


def test_private_vars_are_underscore_prefixed() -> None:
    private = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert all(name.startswith("_token_refresh_sender_") for name in private)


def test_templates_start_with_ansible_managed() -> None:
    for template in (ROLE / "templates").glob("*.j2"):
        first = template.read_text().splitlines()[0]
        assert first == "{{ ansible_managed | comment }}", template.name


def render_unit(tmp_path: Path, extra: List[str]) -> Path:
    root = tmp_path / "bundle"
    (root / "scripts").mkdir(parents=True)
    # systemd-analyze verify checks that ExecStart's program exists.
    shutil.copy(REPO / "scripts" / "run_token_sender.sh", root / "scripts")
    out = tmp_path / UNIT
    proc = subprocess.run(
        [_tool("ansible-playbook"), str(REPO / "tests" / "ansible" / "render_unit.yml"),
         "-i", "localhost,", "-e", f"out={out}", "-e", f"token_refresh_sender_root={root}",
         "-e", f"ansible_python_interpreter={sys.executable}", *extra],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


VARIANTS = {
    "defaults": [],
    "system certs": ["-e", "token_refresh_sender_uv_system_certs=true"],
    "other peer user": ["-e", '{"token_refresh_sender_allowed_peer_users": ["dashboard"]}'],
}


@pytest.mark.parametrize("extra", list(VARIANTS.values()), ids=list(VARIANTS))
def test_rendered_unit_verifies_silently_and_exposure_is_at_most_2(
    tmp_path: Path, extra: List[str]
) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = render_unit(tmp_path, extra)
    text = unit.read_text()
    assert text.startswith("#\n# Ansible managed")
    assert "PrivateTmp=no" in text and "NotifyAccess=all" in text

    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0
    assert verify.stdout + verify.stderr == "", verify.stdout + verify.stderr

    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    exposure = float(match.group(1))
    assert exposure <= 2.0, security.stdout
