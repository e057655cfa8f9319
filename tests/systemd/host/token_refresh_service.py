#!/usr/bin/env python3
"""Stand-in for the legacy scripts/token_refresh_service.py on a trading host before migration.

Like the original, it runs from the bundle root with relative paths, pushes the token file's
access token to the bot's socket at start-up and then on a fixed interval, and appends to
logs/token_refresh.log. Unlike the original it never calls Schwab and never rewrites the token
file: the tests only need something that is running, delivering, and has to be retired.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

SOCKET = "/tmp/bigbrother_token.sock"
INTERVAL = 60.0


def log(message: str) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] INFO: {message}"
    print(line, flush=True)
    with Path("logs/token_refresh.log").open("a") as f:
        f.write(line + "\n")


def send() -> None:
    token = json.loads(Path("configs/schwab_tokens.json").read_text())["token"]
    message = json.dumps({k: token[k] for k in ("access_token", "refresh_token", "expires_at")})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(SOCKET)
            sock.sendall(message.encode())
            log(f"sent token to bot: {sock.recv(16)!r}")
    except OSError as exc:
        log(f"could not send token to bot: {exc}")


def main() -> int:
    log("legacy token refresh service starting")
    while True:
        send()
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main())
