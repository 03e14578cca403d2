"""Fault injection for the crash-and-resume tests: ``DSV3_FAULT=point:step`` makes the process
SIGKILL itself when it reaches that point of that step (a real, unclean kill, no handlers run).

Points: ``micro`` (after the first micro-batch's backward, mid gradient accumulation),
``ckpt`` (checkpoint files written, not yet renamed into place), ``step`` (after the optimizer step)."""
from __future__ import annotations

import os
import signal


def fault_point(point: str, step: int) -> None:
    spec = os.environ.get("DSV3_FAULT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
