"""A trading host as it is before migration, in a systemd container, and Ansible runs against it.

``prepare_trading_host`` gives a booted container:

- the bot's user ``bigbrother`` and a stand-in for the bot (tests/fakes/bot.py copied in) as the
  systemd service ``bigbrother-bot.service``, listening on /tmp/bigbrother_token.sock and
  recording every token it accepts, with the time, to ``BOT_RECORD``;
- the bundle at /opt/bigbrother owned by the bot's user, with the token file and app config
  as the legacy scripts leave them (mode 0644: the role has to tighten them);
- the legacy sender (tests/systemd/host/token_refresh_service.py) either as the unit
  ``token-refresh-service.service`` with a drop-in, or started by hand outside systemd, or absent.

``run_playbook`` runs ``ansible-playbook`` from the repository root (its ansible.cfg) through
the nsenter connection plugin and returns the recap.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from tests.systemd.container import Container

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUNDLE = "/opt/bigbrother"
TOKEN_FILE = f"{BUNDLE}/configs/schwab_tokens.json"
APP_CONFIG = f"{BUNDLE}/configs/schwab_app_config.yaml"
SETTINGS_FILE = f"{BUNDLE}/configs/token_refresh_sender.yaml"
STATE_FILE = f"{BUNDLE}/logs/token_refresh_sender.state.json"
SOCKET = "/tmp/bigbrother_token.sock"
BOT_USER = "bigbrother"
BOT_UNIT = "bigbrother-bot.service"
BOT_RECORD = "/var/lib/fakebot/received.jsonl"
LEGACY_UNIT = "token-refresh-service.service"
LEGACY_UNIT_PATH = f"/etc/systemd/system/{LEGACY_UNIT}"
LEGACY_DROPIN_PATH = f"/etc/systemd/system/{LEGACY_UNIT}.d/override.conf"
NEW_UNIT = "token-refresh-sender.service"
BACKUP_DIR = f"/var/backups/token-refresh-sender/{LEGACY_UNIT}"

APP_KEY = "FAKE-ROLE-APP-KEY-7hQ2mZ9w"
APP_SECRET = "FAKE-ROLE-APP-SECRET-Xk4p8R1v"
REFRESH_TOKEN = "FAKE-ROLE-RT-5c1e9a7f3b2d8e64"
ACCESS_TOKEN = "FAKE-ROLE-AT-legacy-3a7f1c9e5b"
CREATION_TIMESTAMP = int(time.time()) - 2 * 86400

BOT_UNIT_TEXT = f"""[Unit]
Description=Stand-in for the trading bot's token receiver

[Service]
User={BOT_USER}
WorkingDirectory=/opt/fakebot
StateDirectory=fakebot
ExecStart=/usr/bin/python3 -m tests.fakes.bot --socket {SOCKET} --record {BOT_RECORD}

[Install]
WantedBy=multi-user.target
"""

LEGACY_UNIT_TEXT = f"""[Unit]
Description=Schwab token refresh service (legacy)
After=network.target

[Service]
User={BOT_USER}
WorkingDirectory={BUNDLE}
ExecStart=/usr/bin/python3 {BUNDLE}/scripts/token_refresh_service.py
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
"""

LEGACY_DROPIN_TEXT = """[Service]
Environment=LEGACY_DROPIN=1
"""


def token_document(expires_in: int, access_token: str = ACCESS_TOKEN) -> Dict[str, Any]:
    now = int(time.time())
    return {
        "creation_timestamp": CREATION_TIMESTAMP,
        "token": {
            "access_token": access_token, "refresh_token": REFRESH_TOKEN,
            "id_token": "FAKE-ROLE-ID-TOKEN", "token_type": "Bearer", "scope": "api",
            "expires_in": 1800, "expires_at": now + expires_in,
        },
    }


@dataclass
class TradingHost:
    container: Container
    legacy: Optional[str]
    token_at_start: Dict[str, Any]
    manual_pid: Optional[int] = None

    def bot_records(self) -> List[Dict[str, Any]]:
        text = self.container.run(["cat", BOT_RECORD], check=False).stdout
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_bot_records(self, count: int, timeout: float = 20.0) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.bot_records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.2)

    def token_file(self) -> Dict[str, Any]:
        data: Dict[str, Any] = json.loads(self.container.read(TOKEN_FILE))
        return data

    def unit(self, unit: str = NEW_UNIT) -> Dict[str, str]:
        return self.container.show(unit)

    def wait_unit(self, state: str, unit: str = NEW_UNIT, timeout: float = 30.0) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            props = self.unit(unit)
            if props.get("ActiveState") == state or time.monotonic() > deadline:
                return props
            time.sleep(0.2)


def prepare_trading_host(container: Container, legacy: Optional[str],
                         token_expires_in: int = 1500, app_config: bool = True) -> TradingHost:
    """Make the container look like a trading host before migration. legacy: unit|manual|None."""
    c = container
    c.sh(f"useradd --create-home --shell /bin/bash {BOT_USER}")
    for name in ("__init__.py", "fakes/__init__.py", "fakes/bot.py"):
        c.write(f"/opt/fakebot/tests/{name}", (REPO / "tests" / name).read_bytes())
    c.write(f"/etc/systemd/system/{BOT_UNIT}", BOT_UNIT_TEXT)

    c.sh(f"install -d -o {BOT_USER} -g {BOT_USER} -m 0755 {BUNDLE} {BUNDLE}/scripts "
         f"{BUNDLE}/configs {BUNDLE}/logs")
    owner = f"{BOT_USER}:{BOT_USER}"
    c.write(f"{BUNDLE}/scripts/token_refresh_service.py",
            (HERE / "host" / "token_refresh_service.py").read_bytes(), "0755", owner)
    document = token_document(token_expires_in)
    c.write(TOKEN_FILE, json.dumps(document, indent=4), "0644", owner)
    if app_config:
        app = {"app_key": APP_KEY, "app_secret": APP_SECRET, "app_name": "legacy-app",
               "callback_url": "https://127.0.0.1:8182"}
        c.write(APP_CONFIG, yaml.safe_dump(app), "0644", owner)

    c.run(["systemctl", "daemon-reload"])
    c.run(["systemctl", "enable", "--now", BOT_UNIT])
    host = TradingHost(c, legacy, document)
    deadline = time.monotonic() + 15
    while not c.exists(SOCKET):
        assert time.monotonic() < deadline, c.journal(BOT_UNIT)
        time.sleep(0.1)

    if legacy == "unit":
        c.write(LEGACY_UNIT_PATH, LEGACY_UNIT_TEXT)
        c.write(LEGACY_DROPIN_PATH, LEGACY_DROPIN_TEXT)
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "enable", "--now", LEGACY_UNIT])
    elif legacy == "manual":
        # Started by hand from a login shell, outside systemd, as the legacy README said.
        c.run(["runuser", "-u", BOT_USER, "--", "/bin/sh", "-c",
               f"cd {BUNDLE} && setsid nohup python3 scripts/token_refresh_service.py "
               ">/dev/null 2>&1 </dev/null &"])
        pid = c.sh("sleep 0.3; pgrep -f '[t]oken_refresh_service[.]py'").split()
        host.manual_pid = int(pid[0])
    if legacy:
        records = host.wait_bot_records(1)
        assert records, "the legacy stand-in delivered nothing to the bot"
    return host


@dataclass
class PlaybookRun:
    args: List[str]
    returncode: int
    output: str
    seconds: float
    recap: Dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return self.recap.get("changed", -1)

    @property
    def failed(self) -> int:
        return self.recap.get("failed", -1) + self.recap.get("unreachable", 0)

    def changed_tasks(self) -> List[str]:
        """Names of the tasks that reported a change (for assertion messages)."""
        names: List[str] = []
        task = ""
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:"):
                names.append(task)
        return names


def run_playbook(container: Container, log_dir: Path, name: str, *args: str,
                 extra_vars: Optional[Dict[str, Any]] = None,
                 playbook: str = "playbooks/deploy.yml") -> PlaybookRun:
    log_dir.mkdir(parents=True, exist_ok=True)
    inventory = log_dir / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"trading_hosts": {"hosts": {
        container.name: {
            "ansible_connection": "nsenter",
            "ansible_host": str(container.pid1),
            "ansible_python_interpreter": "/usr/bin/python3",
        }}}}}}))
    vars_file = log_dir / "vars.yml"
    vars_file.write_text(yaml.safe_dump(extra_vars or {}))
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONNECTION_PLUGINS": str(HERE / "connection_plugins"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(log_dir / "ansible-local"),
        "ANSIBLE_HOME": str(log_dir / "ansible-home"),
        "PATH": f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}",
        # Per-task wall times, to see where a run spends its time.
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.junit",
        "JUNIT_OUTPUT_DIR": str(log_dir / f"junit-{name}"),
    })
    cmd = [str(REPO / ".venv" / "bin" / "ansible-playbook"), playbook,
           "-i", str(inventory), "-e", f"@{vars_file}", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280, check=False)
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    (log_dir / f"{name}.log").write_text(output)
    run = PlaybookRun(cmd, proc.returncode, output, seconds)
    match = re.search(r"^\S+\s*:\s*(ok=.*)$", proc.stdout, re.MULTILINE)
    if match:
        run.recap = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}
    return run
