"""A fake trading bot: a Unix-socket receiver that behaves byte for byte like the C++ one.

    python3 -m tests.fakes.bot --socket /tmp/bigbrother_token.sock [--record FILE] [--mode ok]

Like the bot's token_manager.cpp receiver (shared/notes/facts.md section 4): unlink the path,
bind, listen; serve one client at a time; a single recv of at most 4095 bytes with no timeout;
parse it as JSON (trailing whitespace tolerated, anything else after the object not);
access_token and refresh_token must be strings and expires_at an integer; reply b"OK" or
b"ERROR", nothing when nothing was read; close. The path is unlinked again on a clean stop.

Other modes misbehave on purpose, for the sender's tests (see MODES). Every connection is kept
in .connections; payloads answered OK are kept in .received and, with --record, appended to a
JSON-lines file ({"t": time, "payload": {...}} per line, flushed at once).

Stdlib only, Python 3.9+: it is copied into a Debian container and run by systemd there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Dict, List, Optional, TextIO, Tuple, Union

RECV_SIZE = 4095  # the C++ receiver's buffer is 4096 bytes with room for a NUL
OK = b"OK"
ERROR = b"ERROR"

MODES = {
    "ok": "behave like the real bot",
    "error": "read the message, always reply ERROR",
    "silent": "read the message, close without a reply",
    "close": "accept and close at once, without reading or replying",
    "never_read": "accept and never recv; the connection stays open until stop",
    "never_reply": "read the message and never answer; the connection stays open until stop",
    "garbage": "read the message, reply 16 random bytes",
    "slow": "behave like the real bot, but reply only after --delay seconds",
}

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Connection:
    """One client connection as the bot saw it."""

    time: float
    data: Optional[bytes]  # what the single recv returned; None when the bot did not read
    reply: Optional[bytes]  # what the bot sent back; None when it sent nothing


@dataclass(frozen=True)
class Received:
    """A payload the bot accepted (answered OK)."""

    time: float
    payload: Dict[str, Any]


def parse_message(data: bytes) -> Optional[Dict[str, Any]]:
    """The payload if the C++ receiver would accept these bytes, else None (it replies ERROR)."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    access, refresh, expires = (obj.get(k) for k in ("access_token", "refresh_token", "expires_at"))
    if not isinstance(access, str) or not isinstance(refresh, str):
        return None
    # bool is an int subclass in Python; in JSON (and for the C++ parser) true is no integer.
    if not isinstance(expires, int) or isinstance(expires, bool):
        return None
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Python accepts them, C++ does not


class FakeBot:
    """The receiver, in a background thread. start() returns once it is listening."""

    def __init__(
        self,
        path: PathLike,
        mode: str = "ok",
        *,
        delay: float = 2.0,
        record: Optional[PathLike] = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        self.path = Path(path)
        self.mode = mode  # may be changed while running; read at each connection
        self.delay = delay  # for mode "slow"
        self._record_path = Path(record) if record is not None else None
        self._record_file: Optional[TextIO] = None
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._received: List[Received] = []
        self._connections: List[Connection] = []
        self._listener: Optional[socket.socket] = None
        self._wake: Optional[Tuple[socket.socket, socket.socket]] = None  # stop() -> loop
        self._client: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> FakeBot:
        if self._record_path is not None and self._record_file is None:
            self._record_file = self._record_path.open("a", encoding="utf-8")
        self._stopping.clear()
        # Like the C++ bot: whatever is at the path goes, then a new socket (a new inode).
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(5)
        self._listener = listener
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="fake-bot", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop like a clean shutdown of the bot: close everything and unlink the path."""
        self._stopping.set()
        if self._wake is not None:
            self._wake[1].send(b"x")
        with self._cond:
            client = self._client
        if client is not None:
            # Wakes a recv that would otherwise wait forever (the bot has no timeout).
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._wake is not None:
            for end in self._wake:
                end.close()
            self._wake = None
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None

    def restart(self) -> FakeBot:
        """Stop and start again: a new socket inode at the same path, like a restarted bot."""
        self.stop()
        return self.start()

    def __enter__(self) -> FakeBot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what happened ----------------------------------------------------------------------

    @property
    def received(self) -> List[Received]:
        with self._cond:
            return list(self._received)

    @property
    def payloads(self) -> List[Dict[str, Any]]:
        return [r.payload for r in self.received]

    @property
    def connections(self) -> List[Connection]:
        with self._cond:
            return list(self._connections)

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least `count` payloads were accepted in total."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._received) >= count, timeout)

    def wait_for_connections(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least `count` connections were served, whatever their outcome."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._connections) >= count, timeout)

    # -- the receiver loop ------------------------------------------------------------------

    def _serve(self) -> None:
        listener, wake = self._listener, self._wake
        assert listener is not None and wake is not None
        while not self._stopping.is_set():
            # Waiting in select rather than accept lets stop() wake the loop at once.
            readable, _, _ = select.select([listener, wake[0]], [], [])
            if wake[0] in readable:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._cond:
                self._client = client  # so stop() can wake a recv that would never return
                stopping = self._stopping.is_set()
            try:
                if not stopping:
                    self._serve_one(client)
            finally:
                with self._cond:
                    self._client = None
                client.close()

    def _serve_one(self, client: socket.socket) -> None:
        mode = self.mode
        if mode == "close":
            self._log(Connection(time.time(), None, None))
            return
        if mode == "never_read":
            self._log(Connection(time.time(), None, None))
            self._stopping.wait()
            return
        try:
            data = client.recv(RECV_SIZE)  # ONE recv: no framing, no loop
        except OSError:
            data = b""
        received_at = time.time()
        if not data:
            self._log(Connection(received_at, data, None))  # read nothing: reply nothing
            return
        payload = parse_message(data)
        reply = self._reply_for(mode, payload)
        if mode == "never_reply":
            self._log(Connection(received_at, data, None))
            self._stopping.wait()
            return
        if mode == "slow" and self._stopping.wait(self.delay):
            self._log(Connection(received_at, data, None))
            return
        if reply is not None:
            with contextlib.suppress(OSError):
                client.sendall(reply)
        if reply == OK and payload is not None:
            self._accept(Received(received_at, payload))
        self._log(Connection(received_at, data, reply))

    @staticmethod
    def _reply_for(mode: str, payload: Optional[Dict[str, Any]]) -> Optional[bytes]:
        if mode in ("ok", "slow"):
            return OK if payload is not None else ERROR
        if mode == "error":
            return ERROR
        if mode == "garbage":
            return os.urandom(16)
        return None  # silent, never_reply

    def _log(self, connection: Connection) -> None:
        with self._cond:
            self._connections.append(connection)
            self._cond.notify_all()

    def _accept(self, received: Received) -> None:
        with self._cond:
            self._received.append(received)
            if self._record_file is not None:
                line = {"t": received.time, "payload": received.payload}
                self._record_file.write(json.dumps(line) + "\n")
                self._record_file.flush()
            self._cond.notify_all()


def read_record(path: PathLike) -> List[Received]:
    """Read a --record file; a half-written last line (the bot is still running) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            out.append(Received(entry["t"], entry["payload"]))
    return out


# -- command line ---------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.fakes.bot", description=__doc__)
    parser.add_argument("--socket", required=True, help="path of the Unix socket to serve")
    parser.add_argument("--record", help="append accepted payloads to this JSON-lines file")
    parser.add_argument("--mode", default="ok", choices=list(MODES))
    parser.add_argument("--delay", type=float, default=2.0, help="reply delay for --mode slow")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bot = FakeBot(args.socket, args.mode, delay=args.delay, record=args.record).start()
    print(f"listening on {args.socket}", flush=True)
    while not stop.wait(1.0):
        pass
    bot.stop()
    print(f"stopped after {len(bot.received)} payload(s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
