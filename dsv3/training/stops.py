"""Graceful stops: SIGTERM (a Slurm preemption, torchrun's shutdown), SIGINT (Ctrl-C) and
``train.time_limit_s``.

The first signal only sets a flag: the current step finishes, a checkpoint is written and the run
exits 143 (SIGTERM) or 130 (SIGINT) with one line. A second signal stops at once (``Interrupted``,
same exit code, no checkpoint; the previous one is intact). In a multi-rank run the request is
all-reduced (MAX) every step, so every rank stops after the same step whether one rank or all got
the signal — as Megatron's exit-signal handler does.

Request codes, so that MAX picks the strongest: 0 go on, 1 time limit (exit 0), 2 SIGINT, 15 SIGTERM.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

TIME_LIMIT = 1
NAMES = {TIME_LIMIT: "train.time_limit_s", int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}


class Interrupted(Exception):
    """A second signal, or a signal before the training loop started: stop now."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {NAMES.get(signum, signum)}; nothing was saved after the last checkpoint")
        self.exit_code = 128 + signum


def exit_code(request: int) -> int:
    return 0 if request == TIME_LIMIT else 128 + request


class StopRequests:
    """Installed for the training loop (``with StopRequests(...) as stops``); restores the old handlers."""

    def __init__(self, time_limit_s: float = 0.0, start: Optional[float] = None):
        self.request = 0
        self.deadline = (start or time.monotonic()) + time_limit_s if time_limit_s > 0 else None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.request:
            raise Interrupted(signum)
        self.request = signum

    def __enter__(self) -> "StopRequests":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self, group_device: Optional[torch.device] = None, step_time_s: float = 0.0) -> int:
        """This step's stop request, the same on every rank. The time limit counts one more step's time
        so that the checkpoint is written before the limit, not after it."""
        req = self.request
        if req == 0 and self.deadline is not None and time.monotonic() + step_time_s >= self.deadline:
            req = TIME_LIMIT
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([req], dtype=torch.int64, device=group_device or torch.device("cpu"))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            req = int(t.item())
        return req


def raise_on_signal():
    """Before the loop (data preparation, model build, resume): a signal stops at once, one line.
    Returns the previous handlers for ``restore``."""
    def handler(signum, frame):
        raise Interrupted(signum)
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def restore(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)
