"""The sender script imported as a module, for in-process tests that drive its clock.

The script is one file under scripts/, not a package; this loads it once under its own name.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

SENDER_PATH = Path(__file__).resolve().parent.parent / "scripts" / "token_refresh_sender.py"


def load() -> ModuleType:
    name = "token_refresh_sender"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SENDER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


tsr = load()


class OffsetClock(tsr.Clock):  # type: ignore[misc,name-defined]
    """The (frozen) clock, with a wall clock that can jump on its own: monotonic does not."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset
