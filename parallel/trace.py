"""Per-rank timelines of compute parts and communications (report §3.2.1, Figure 4): a Chrome-trace
JSON (open in Perfetto or chrome://tracing) and the share of communication time hidden under compute.

Also the cost models the overlap test and benchmark run on a CPU box: ``SerialLink`` (one communication
stream per rank; every all-to-all holds it for a fixed latency plus bytes / bandwidth, IB and NVLink
concurrently) and ``add_compute_cost`` (a module's forward and backward also take a fixed time, spent
on the calling thread, so that 2 shared cores still show the schedule rather than CPU contention).

    tracer = Tracer(rank)
    with tracer.span("attn F", phase="F", mb=3): ...
    tracer.add("dispatch", "a2a", t0, t1, phase="F", mb=3)
    frac = overlapped_fraction(tracer.events)          # |comm ∩ compute| / |comm|
    write_chrome_trace("trace.json", [events_rank0, events_rank1, ...])
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

COMPUTE, A2A, P2P, OP = "compute", "a2a", "p2p", "op"   # op: a whole schedule op (F, B, W, FB)


@dataclass
class Event:
    name: str
    cat: str              # compute | a2a | p2p | op
    start: float          # seconds, time.perf_counter (CLOCK_MONOTONIC: one clock for all local processes)
    end: float
    phase: str = ""       # F | B | W: which half of a paired op it belongs to
    mb: int = -1


@dataclass
class Tracer:
    rank: int = 0
    events: list[Event] = field(default_factory=list)
    phase: str = ""       # set by the executor before it resumes one micro-batch's parts
    mb: int = -1
    enabled: bool = True

    def add(self, name: str, cat: str, start: float, end: float, phase: Optional[str] = None,
            mb: Optional[int] = None) -> None:
        if self.enabled:
            self.events.append(Event(name, cat, start, end, self.phase if phase is None else phase,
                                     self.mb if mb is None else mb))

    @contextmanager
    def span(self, name: str, cat: str = COMPUTE):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, cat, t0, time.perf_counter())

    @contextmanager
    def context(self, phase: str, mb: int):
        old = self.phase, self.mb
        self.phase, self.mb = phase, mb
        try:
            yield
        finally:
            self.phase, self.mb = old

    def clear(self) -> None:
        self.events = []


# ------------------------------------------------------------------------------ intervals
def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: Sequence[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersect(xs: Sequence[tuple[float, float]], ys: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two sorted disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlapped_fraction(events: Sequence[Event], comm_cats: Sequence[str] = (A2A,)) -> tuple[float, float]:
    """(fraction of the communication time that some compute part covers, communication seconds),
    both over the union of intervals on one rank."""
    comm = union((e.start, e.end) for e in events if e.cat in comm_cats)
    busy = union((e.start, e.end) for e in events if e.cat == COMPUTE)
    total = length(comm)
    return (length(intersect(comm, busy)) / total if total > 0 else 1.0), total


def overlap_with_other(event: Event, events: Sequence[Event]) -> float:
    """Seconds of ``event`` covered by compute parts of a different micro-batch or phase."""
    other = union((e.start, e.end) for e in events
                  if e.cat == COMPUTE and (e.mb, e.phase) != (event.mb, event.phase))
    return length(intersect([(event.start, event.end)], other))


# ------------------------------------------------------------------------------ chrome trace
def _lanes(events: Sequence[Event]) -> list[int]:
    """Chrome 'X' events on one thread must nest: put overlapping ones on separate lanes."""
    ends: list[float] = []
    lanes = []
    for e in events:
        lane = next((i for i, t in enumerate(ends) if t <= e.start), len(ends))
        if lane == len(ends):
            ends.append(e.end)
        else:
            ends[lane] = e.end
        lanes.append(lane)
    return lanes


def chrome_trace(ranks: Sequence[Sequence[Event]]) -> dict:
    t0 = min((e.start for evs in ranks for e in evs), default=0.0)
    out = []
    tids = {OP: 0, COMPUTE: 10, A2A: 20, P2P: 30}
    for rank, evs in enumerate(ranks):
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for cat, base in tids.items():
            mine = sorted((e for e in evs if e.cat == cat), key=lambda e: e.start)
            for e, lane in zip(mine, _lanes(mine)):
                label = f"{e.name} {e.phase}{e.mb}" if e.mb >= 0 and cat != OP else e.name
                out.append({"name": label, "cat": cat, "ph": "X", "pid": rank, "tid": base + lane,
                            "ts": (e.start - t0) * 1e6, "dur": max(e.end - e.start, 0.0) * 1e6,
                            "args": asdict(e)})
            for lane in range(len(set(_lanes(mine)))):
                out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": base + lane,
                            "args": {"name": f"{cat} {lane}"}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, ranks: Sequence[Sequence[Event]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(chrome_trace(ranks), f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ cost models
class SerialLink:
    """One rank's communication stream: an all-to-all starts when the previous one has finished and
    holds the stream for ``latency`` + max over link kinds of bytes / bandwidth (IB and NVLink in
    parallel, as on H800 where each GPU has both). ``bandwidth``: {'intra': B/s, 'inter': B/s}."""

    def __init__(self, latency: float = 0.0, bandwidth: Optional[dict] = None):
        self.latency, self.bandwidth = latency, bandwidth or {}
        self.free_at = 0.0

    def reserve(self, bytes_per_link: dict[str, int]) -> tuple[float, float]:
        """(start, done) of a transfer issued now."""
        secs = max((n / self.bandwidth[lk] for lk, n in bytes_per_link.items() if lk in self.bandwidth),
                   default=0.0)
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + self.latency + secs
        return start, self.free_at


class _Cost(torch.autograd.Function):
    """Identity that also spends ``fwd`` seconds in forward and ``bwd`` in backward."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        time.sleep(fwd)
        ctx.bwd = bwd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        return g, None, None


def add_compute_cost(module: nn.Module, fwd: float, bwd: float):
    """Every call of ``module`` also takes ``fwd`` s, and its backward ``bwd`` s (a forward hook; the
    values pass through unchanged, so results stay bitwise those of the bare module)."""
    def hook(_m, _inputs, out):
        return _Cost.apply(out, fwd, bwd) if torch.is_tensor(out) else out
    return module.register_forward_hook(hook)
