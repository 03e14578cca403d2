"""An honest link model for the expert all-to-all benchmarks (SPEC §5; DeepSeek-V3 report §3.2.1).

Every rank has one serial IB link and one serial NVLink link. A link carries one transfer at a time,
first in first out; a transfer of ``n`` messages (one per peer of the collective on that link, empty ones
included) and ``b`` bytes holds it for ``n · latency + b / bandwidth``. The two links of a rank run
concurrently. Nothing is free: N chunks issued together take N latencies plus the same bytes, one after
the other on the link, so chunking pays only when it lets another link work meanwhile (the IB hop's
chunk c+1 while NVLink forwards chunk c).

Constants: IB 50 and NVLink 160 in units of ``unit`` bytes/s (H800: 50 GB/s and 160 GB/s; the benchmarks
scale to MB/s so that loopback gloo is much faster than the model); latency = the time of 4 KB on IB.

``LinkModel.send`` books one collective on a rank's links and returns when it is done on each;
``predict_route`` runs the same rules for a whole cluster without processes (the traffic model's time).
"""
from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import torch

IB_BW, NVLINK_BW = 50.0, 160.0
LINKS = ("inter", "intra")           # inter = IB, intra = NVLink


class LinkModel:
    """One rank's two serial links. ``unit``: bytes/s per bandwidth unit (1e9: GB/s)."""

    def __init__(self, ib: float = IB_BW, nvlink: float = NVLINK_BW, unit: float = 1e6,
                 latency: Optional[float] = None):
        self.bandwidth = {"inter": ib * unit, "intra": nvlink * unit}
        self.latency = 4096 / self.bandwidth["inter"] if latency is None else latency
        self.free_at = {lk: 0.0 for lk in LINKS}
        self._lock = threading.Lock()

    def send(self, bytes_per_link: dict, messages: Optional[dict] = None,
             now: Optional[float] = None) -> dict[str, tuple[float, float]]:
        """Books a transfer issued at ``now`` (default: time.perf_counter()): per link with messages,
        (start, done). ``messages``: per link, default 1 where bytes are given."""
        messages = messages if messages is not None else {lk: 1 for lk in bytes_per_link}
        now = time.perf_counter() if now is None else now
        out = {}
        with self._lock:
            for lk in LINKS:
                n, b = messages.get(lk, 0), bytes_per_link.get(lk, 0)
                if n == 0 and b == 0:
                    continue
                start = max(now, self.free_at[lk])
                self.free_at[lk] = start + n * self.latency + b / self.bandwidth[lk]
                out[lk] = (start, self.free_at[lk])
        return out

    def reserve(self, bytes_per_link: dict, messages: Optional[dict] = None,
                now: Optional[float] = None) -> tuple[float, float]:
        """(first start, last done) over the links, as ``parallel.trace.SerialLink.reserve``."""
        now = time.perf_counter() if now is None else now
        booked = self.send(bytes_per_link, messages, now)
        if not booked:
            return now, now
        return min(s for s, _ in booked.values()), max(d for _, d in booked.values())


# ------------------------------------------------------------------------- whole-cluster schedule
def _hop(models, B: torch.Tensor, link_of, issue: list[float]) -> list[float]:
    """One collective: rank s issues at issue[s] its row of B (bytes s → d; a peer is in the group where
    link_of(s, d) is not None). Returns each rank's arrival: the latest done of its senders' links."""
    n = B.shape[0]
    done = []
    for s in range(n):
        by, msg = {}, {}
        for d in range(n):
            lk = link_of(s, d)
            if lk in LINKS:
                by[lk] = by.get(lk, 0) + int(B[s, d])
                msg[lk] = msg.get(lk, 0) + 1
        done.append(models[s].send(by, msg, issue[s]))
    arrival = []
    for d in range(n):
        peers = [done[s][link_of(s, d)][1] for s in range(n) if link_of(s, d) in LINKS]
        arrival.append(max(peers + [issue[d]]))
    return arrival


def predict_route(hops: Sequence[torch.Tensor], links: Sequence, chunks: int, make_model,
                  reverse_hops: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Modelled time of a dispatch followed by its combine, no compute between, on fresh links.
    hops: per hop an (ep, ep) matrix of bytes src → dst; links: per hop ``link_of(src, dst)`` → 'inter',
    'intra', 'self' or None (not in the group). A hop after the first forwards chunk c as soon as chunk c
    has arrived (each chunk 1/chunks of every hop's bytes); the combine walks back the same way (bytes
    ``reverse_hops``, default the same matrices, transposed). Returns the last rank's finish time."""
    n = hops[0].shape[0]
    models = [make_model() for _ in range(n)]
    rev = [(B if reverse_hops is None else reverse_hops[i]).t() for i, B in enumerate(hops)]
    split = lambda B, c: B * (c + 1) // chunks - B * c // chunks  # noqa: E731

    def route(mats, lks, start: list[float]) -> list[float]:
        ready = [list(start) for _ in range(chunks)]          # per chunk: when the chunk may leave each rank
        for h, (B, lk) in enumerate(zip(mats, lks)):
            issued = list(start)
            for c in range(chunks):
                issue = [max(ready[c][r], issued[r]) for r in range(n)]   # FIFO: in chunk order
                ready[c] = _hop(models, split(B, c), lk, issue)
                issued = issue
        return [max(ready[c][r] for c in range(chunks)) for r in range(n)]

    back_links = [lambda s, d, f=f: f(d, s) for f in links]
    done = route(list(hops), list(links), [0.0] * n)
    done = route(rev[::-1], back_links[::-1], done)
    return max(done)
