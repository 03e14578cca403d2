"""Per-rank timelines of compute parts and communications (report §3.2.1, Figure 4): a Chrome-trace
JSON (open in Perfetto or chrome://tracing) and the share of communication time hidden under compute.
The cost models the overlap test and benchmark run on a CPU box live in parallel/sim/ (``links``, ``cost``).

    tracer = Tracer(rank)
    with tracer.context("F", 3), tracer.span("attn F"): ...   # micro-batch 3's forward
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
