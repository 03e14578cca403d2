"""Modelled links for the expert all-to-all benchmarks and the overlap test (DeepSeek-V3 report §3.2.1),
installed around the dispatcher's transport: loopback gloo on one box has no IB / NVLink asymmetry of its
own, so ``ModelledTransport`` (``EPDispatcher.transport``) makes every all-to-all also hold this rank's
modelled link and its receiver wait, sleeping, until the modelled arrival.

``LinkModel``: every rank has one serial IB link and one serial NVLink link. A link carries one transfer at
a time, first in first out; a transfer of ``n`` messages (one per peer of the collective on that link,
empty ones included) and ``b`` bytes holds it for ``n · latency + b / bandwidth``. The two links of a rank
run concurrently. Nothing is free: N chunks issued together take N latencies plus the same bytes, one after
the other on the link, so chunking pays only when it lets another link work meanwhile (the IB hop's
chunk c+1 while NVLink forwards chunk c).

Constants: IB 50 and NVLink 160 in units of ``unit`` bytes/s (H800: 50 GB/s and 160 GB/s; the benchmarks
scale to MB/s so that loopback gloo is much faster than the model); latency = the time of 4 KB on IB.

``LinkModel.send`` books one collective on a rank's links and returns when it is done on each;
``predict_route`` runs the same rules for a whole cluster without processes (the traffic model's time).
``SerialLink`` is the coarser model of benchmarks/bench_overlap.py's default: one stream per rank.
"""
from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from parallel.all_to_all import Transfer, Transport

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
        """(first start, last done) over the links, as ``SerialLink.reserve``."""
        now = time.perf_counter() if now is None else now
        booked = self.send(bytes_per_link, messages, now)
        if not booked:
            return now, now
        return min(s for s, _ in booked.values()), max(d for _, d in booked.values())


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


# ------------------------------------------------------------------------- the dispatcher's transport
class ModelledTransport(Transport):
    """``EPDispatcher.transport`` that also takes the modelled link time: each all-to-all goes through
    ``inner`` (default: the production ``Transport``) and books ``link``; its ``wait`` returns no earlier
    than the modelled arrival, sleeping out the rest.

    ``link``: a ``LinkModel`` (serial IB and NVLink links; the receiver waits for the latest of its senders'
    links, each sender's done time for each peer travelling in one more all-to-all on the same group right
    after the data) or a ``SerialLink`` (one stream per rank; the receiver waits for its own booking).
    ``model_done``: the latest modelled arrival waited on so far. Shared by every dispatcher it is installed
    in (one rank's links)."""

    def __init__(self, link, inner: Optional[Transport] = None):
        self.link, self.inner, self.model_done = link, inner if inner is not None else Transport(), 0.0

    def start(self, hop, out, buf, send_counts, recv_counts, bytes_per_link, messages) -> "ModelledTransfer":
        issued = done = time.perf_counter()
        booked = None
        if isinstance(self.link, LinkModel):
            booked = self.link.send(bytes_per_link, messages)
            issued = min((s for s, _ in booked.values()), default=issued)
            done = max((d for _, d in booked.values()), default=done)
        else:
            issued, done = self.link.reserve(bytes_per_link)
        transfer = self.inner.start(hop, out, buf, send_counts, recv_counts, bytes_per_link, messages)
        arrivals = None
        if booked is not None:   # this sender's done time on the link to each peer
            mine = torch.tensor([booked[lk][1] if lk in booked else 0.0 for lk in hop.links],
                                dtype=torch.float64, device=buf.device)
            got = torch.empty_like(mine)
            arrivals = (dist.all_to_all_single(got, mine, group=hop.group, async_op=True), got)
        return ModelledTransfer(self, transfer, issued, done, arrivals)


class ModelledTransfer(Transfer):
    """A ``Transfer`` whose ``wait`` also sleeps until its modelled arrival: the latest of the senders'
    done times (``arrivals``: the exchange in flight and its buffer) or, without them, this rank's ``done``."""

    def __init__(self, owner: ModelledTransport, inner: Transfer, issued: float, done: float, arrivals=None):
        super().__init__(inner, issued, done)
        self.owner, self.arrivals = owner, arrivals

    def wait(self) -> None:
        self.work.wait()
        arrival = self.done
        if self.arrivals is not None:
            self.arrivals[0].wait()
            arrival = float(self.arrivals[1].max())
        self.owner.model_done = max(self.owner.model_done, arrival)
        delay = arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


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
