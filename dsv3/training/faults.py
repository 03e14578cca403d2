"""Fault injection for the crash-and-resume tests: ``DSV3_FAULT=point:step`` makes the process
SIGKILL itself when it reaches that point of that step (a real, unclean kill, no handlers run).

Points: ``micro`` (after the first micro-batch's backward, mid gradient accumulation),
``ckpt`` (checkpoint files written, not yet renamed into place), ``ckpt_write`` (in the middle of a
checkpoint write: some files written, others not), ``step`` (after the optimizer step),
``p2p`` (a pipeline send just posted, the transfer in flight), ``a2a`` (an expert all-to-all dispatch
just started, in flight), ``hf_shard`` (``python -m dsv3.checkpoint.hf``: output shard K written; the "step" is K).
``DSV3_FAULT_SIGNAL=SIGTERM`` / ``SIGINT`` at ``step`` exercise the graceful stop (dsv3/training/stops.py).

Multi-rank runs: ``DSV3_FAULT=point:step:rank`` (or ``DSV3_FAULT_RANK=rank``) kills only that rank
(``RANK`` of the environment); without a rank every process reaching the point dies. Points deep in
the parallel code do not know the step: they pass none and match the step the training loop last
announced with ``set_step`` (the step being run, counted from 1). ``DSV3_FAULT_SIGNAL=SIGSTOP`` freezes
the process instead (a hung rank). ``DSV3_FAULT_ERRNO=ENOSPC`` (any ``errno`` name) makes the point
raise ``OSError`` with that errno instead of sending a signal: a disk that fills up mid-write
(``DSV3_FAULT=ckpt_write:2 DSV3_FAULT_ERRNO=ENOSPC``)."""
from __future__ import annotations

import errno
import os
import signal
from typing import Optional

_current_step = 0


class PeerError(RuntimeError):
    """A transfer with another rank failed or timed out: that rank most likely died or hangs."""


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def current_step() -> int:
    """The step the training loop last announced (for messages about where a run failed)."""
    return _current_step


def set_step(step: int) -> None:
    """The training loop announces the step it is running (1-based) for points that pass no step."""
    global _current_step
    _current_step = step


def fault_point(point: str, step: Optional[int] = None) -> None:
    spec = os.environ.get("DSV3_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != point:
        return
    if parts[1] != str(_current_step if step is None else step):
        return
    rank = parts[2] if len(parts) == 3 else (os.environ.get("DSV3_FAULT_RANK") or None)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    code = os.environ.get("DSV3_FAULT_ERRNO")
    if code:
        num = getattr(errno, code.upper(), None) if not code.isdigit() else int(code)
        if num is None:
            raise ValueError(f"DSV3_FAULT_ERRNO={code}: not an errno name (e.g. ENOSPC, EIO)")
        raise OSError(num, f"{os.strerror(num)} (injected by DSV3_FAULT={spec})")
    os.kill(os.getpid(), getattr(signal, os.environ.get("DSV3_FAULT_SIGNAL") or "SIGKILL"))
