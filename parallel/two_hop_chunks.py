"""Two-hop dispatch and combine with the hops pipelined in chunks (DeepSeek-V3 report §3.2.2:
"IB sending, IB-to-NVLink forwarding ... handled by dedicated warps"; DeepEP's normal kernels).

The IB hop (``ep_inter``) is cut into ``chunks`` all-to-alls, chunk c carrying the c-th of C near-equal
contiguous slices of every peer's rows; the relay forwards chunk c over ``ep_intra`` as soon as it
lands, while chunk c+1 is still on IB. Combine walks back the same way: the expert owners return
chunk c's rows over NVLink, the relay sums them and sends chunk c back over IB while NVLink returns
chunk c+1. Gradients take the same routes (combine's backward as dispatch, dispatch's as combine).

Results do not depend on the chunk count, bitwise:
- the final receiver puts the rows back in the unchunked order (relay, source, row) with ``perm``,
  built from the rows per (chunk, relay, source) that the sources announce up front (``dispatch_task``);
- every sum keeps the unchunked order: a relay row lies in exactly one chunk and sums its local ranks
  in rank order either way; the source collects every chunk into the unchunked layout before its one
  ``index_add_``.

Every data collective of these routes (on ``ep_inter`` and ``ep_intra``) runs on one communication
thread per process (``comm_thread``), in the order the main thread asked for them, which is the same on
every rank of the EP group (the rule every collective already follows). So the second hop progresses
while the main thread computes — between the overlap's yield points, not only inside ``wait()`` — and
no two ranks can disagree on the order of collectives on a group (NCCL and gloo match collectives by
order). The dispatch's one count exchange (on the EP group, used by no other thread) runs on the
calling thread before the data moves, as flat's does and as DeepEP's notify_dispatch.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Optional

import torch

from parallel.a2a_rows import Hop, pack_rows, unpack_rows
from parallel.routing_plan import plan_hop


# ------------------------------------------------------------------------------ comm thread
class _CommThread:
    """Runs submitted closures one at a time, in submission order. After one fails, every later one
    fails with the same error (the collectives after it would no longer match across ranks)."""

    def __init__(self):
        self.q: SimpleQueue = SimpleQueue()
        self.error: Optional[BaseException] = None
        threading.Thread(target=self._run, name="ep-comm", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self.q.put((fn, args, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, args, fut = self.q.get()
            if self.error is not None:
                fut.set_exception(self.error)
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self.error = e
                fut.set_exception(e)


_COMM: dict[int, _CommThread] = {}
_COMM_LOCK = threading.Lock()


def comm_thread() -> _CommThread:
    """This process's communication thread (one per process: the EP groups are shared by all layers)."""
    with _COMM_LOCK:
        pid = os.getpid()
        if pid not in _COMM:
            _COMM[pid] = _CommThread()
        return _COMM[pid]


# ------------------------------------------------------------------------------ chunk layout
def slices(counts: list[int], chunks: int) -> list[list[int]]:
    """Per chunk, rows per peer: the c-th of ``chunks`` near-equal contiguous slices of each segment."""
    return [[n * (c + 1) // chunks - n * c // chunks for n in counts] for c in range(chunks)]


def chunk_rows(counts: list[int], chunks: int, device) -> list[torch.Tensor]:
    """Rows of a buffer laid out peer by peer (``counts``) that each chunk sends, peer by peer."""
    out, off = [], 0
    bounds = []
    for n in counts:
        bounds.append([off + n * c // chunks for c in range(chunks + 1)])
        off += n
    for c in range(chunks):
        parts = [torch.arange(b[c], b[c + 1], device=device) for b in bounds]
        out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device))
    return out


def arrival_perm(pairs: torch.Tensor) -> Optional[torch.Tensor]:
    """pairs (C, L, P): rows this rank got in chunk c from relay l that came from source p; they arrive
    in (c, l, p) order. Returns perm with received[perm] in the unchunked (l, p, c) order (None: C = 1)."""
    C = pairs.shape[0]
    if C == 1:
        return None
    lens = pairs.reshape(-1)
    start = torch.cumsum(lens, 0) - lens                       # arrival offset of each (c, l, p) block
    starts = start.view(pairs.shape).permute(1, 2, 0).reshape(-1)
    lens_c = pairs.permute(1, 2, 0).reshape(-1)
    out_start = torch.cumsum(lens_c, 0) - lens_c
    total = int(lens.sum())
    return torch.repeat_interleave(starts - out_start, lens_c) + torch.arange(total, device=pairs.device)


@dataclass
class Route:
    """A two-hop route as planned by its dispatch: hop 1 (one plan, sent in chunks) and per chunk the
    relay's hop-2 plan over that chunk's rows; ``perm`` orders the final receiver's rows."""
    chunks: int
    hop1: object = None                         # parallel.all_to_all.Hop
    send_idx: list = field(default_factory=list)    # per chunk: rows of hop 1's send buffer
    s1: list = field(default_factory=list)          # per chunk: rows sent to each hop-1 peer
    r1: list = field(default_factory=list)          # per chunk: rows received from each hop-1 peer
    hop2: list = field(default_factory=list)        # per chunk: Hop over the chunk's relay rows
    pairs: Optional[torch.Tensor] = None            # (C, L, P) rows received, by chunk, relay and source
    perm: Optional[torch.Tensor] = None

    def set_hop1(self, hop1) -> None:
        self.hop1 = hop1
        self.s1, self.r1 = slices(hop1.send_counts, self.chunks), slices(hop1.recv_counts, self.chunks)
        self.send_idx = chunk_rows(hop1.send_counts, self.chunks, hop1.plan.send_rows.device)


def _specs(parts):
    return [(p.dtype, tuple(p.shape[1:])) for p in parts]


def _masked(parts, w, phys, plan):
    """The rows a hop sends: payload rows, and the gate weights / slots of the choices it serves."""
    rows, mask = plan.send_rows, plan.choice_mask
    return [p[rows] for p in parts] + [torch.where(mask, w[rows], 0.0), torch.where(mask, phys[rows], -1)]


# ------------------------------------------------------------------------------ tasks (comm thread)
def _device(t: torch.Tensor) -> None:
    """A new thread starts on CUDA device 0: run the task on its tensors' device."""
    if t.is_cuda:
        torch.cuda.set_device(t.device)


def plan_dispatch(disp, route: Route, phys: torch.Tensor) -> None:
    """On the calling thread, before any data moves (as DeepEP's notify_dispatch): plans hop 1 and runs
    the one count exchange of the dispatch, over the EP group. It gives every rank what it will receive
    on both hops, chunk by chunk: a source knows, for each row it sends, its chunk and the local ranks it
    reaches, so it tells each rank (n, l) how many rows of each chunk will reach it through relay
    (n, its own local index). Sets ``route.hop1`` (and its chunk layout) and ``route.pairs``."""
    group, links, dest_of = disp.hop_specs[0]
    _, links2, dest2 = disp.hop_specs[1]
    P, L, C, dev = len(links), len(links2), route.chunks, phys.device
    me = links2.index("self")                                     # this rank's local index
    plan = plan_hop(dest_of(phys.long()), P)
    hop1 = Hop(group, links, plan, n_in=phys.shape[0], send_counts=plan.send_counts.tolist())
    S = plan.send_rows.shape[0]
    chunk_of = torch.empty(S, dtype=torch.long, device=dev)
    for c, i in enumerate(chunk_rows(hop1.send_counts, C, dev)):
        chunk_of[i] = c
    local = torch.where(plan.choice_mask, dest2(phys.long())[plan.send_rows], L)
    hit = torch.zeros(S, L + 1, dtype=torch.long, device=dev).scatter_(1, local, 1)[:, :L]
    reach = torch.zeros(C * P, L, dtype=torch.long, device=dev).index_add_(0, chunk_of * P + plan.send_dest, hit)
    vec = torch.zeros(P, L, C + 1, dtype=torch.long, device=dev)  # to EP rank n·L + l: hop-1 rows, rows per chunk
    vec[:, :, 1:] = reach.view(C, P, L).permute(1, 2, 0)
    vec[:, me, 0] = plan.send_counts
    got = disp.exchange_counts(disp.count_hop, vec.reshape(-1))
    got = torch.tensor(got).view(P, L, C + 1)                      # from EP rank p·L + l
    hop1.recv_counts = got[:, me, 0].tolist()
    route.pairs = got[:, :, 1:].permute(2, 1, 0)                    # (C, L, P)
    route.set_hop1(hop1)


def dispatch_task(disp, route: Route, payload, w, phys):
    """Sends hop 1 (planned by ``plan_dispatch``) in chunks; forwards each chunk at its relay as it lands,
    planning its hop 2 there. Returns the hop-2 pendings and the row specs."""
    _device(phys)
    hop1, pairs, C = route.hop1, route.pairs, route.chunks
    group2, links2, dest2 = disp.hop_specs[1]
    L = len(links2)
    parts = _masked(payload, w, phys, hop1.plan)
    specs = _specs(parts)
    buf = pack_rows(parts)
    pend = [disp.send(hop1, buf[i], s, r, "dispatch") for i, s, r in zip(route.send_idx, route.s1, route.r1)]
    out = []
    for c in range(C):
        *pl, wc, ph = unpack_rows(pend[c].wait(), specs)
        plan2 = plan_hop(dest2(ph.long()), L)
        hop2 = Hop(group2, links2, plan2, n_in=ph.shape[0], send_counts=plan2.send_counts.tolist(),
                   recv_counts=pairs[c].sum(1).tolist())
        route.hop2.append(hop2)
        out.append(disp.send(hop2, pack_rows(_masked(pl, wc, ph, plan2)), hop2.send_counts, hop2.recv_counts,
                             "dispatch"))
    route.perm = arrival_perm(pairs).to(phys.device) if C > 1 else None
    return out, specs


def forward_task(disp, route: Route, parts: list[torch.Tensor], direction: str):
    """Rows at the source out along a planned route (combine's backward: dy, or its E4M3 bytes and scales),
    chunk by chunk; the relay forwards the packed rows as they came."""
    _device(parts[0])
    specs = _specs(parts)
    buf = pack_rows([p[route.hop1.plan.send_rows] for p in parts])
    pend = [disp.send(route.hop1, buf[i], s, r, direction)
            for i, s, r in zip(route.send_idx, route.s1, route.r1)]
    out = []
    for c, h in enumerate(route.hop2):
        out.append(disp.send(h, pend[c].wait()[h.plan.send_rows], h.send_counts, h.recv_counts, direction))
    return out, specs


def reverse_task(disp, route: Route, parts: list[torch.Tensor], direction: str):
    """Rows at the final receivers back to the source (combine, dispatch's backward): hop 2 back in
    chunks, each summed at its relay and sent back over IB as soon as it lands."""
    _device(parts[0])
    specs = _specs(parts)
    if route.perm is not None:     # back to arrival order: arrival[perm] = rows
        parts = [torch.empty_like(p).index_copy_(0, route.perm, p) for p in parts]
    sizes = [sum(h.recv_counts) for h in route.hop2]
    bufs = pack_rows(parts).split(sizes)
    pend = [disp.send(h, b, h.recv_counts, h.send_counts, direction) for h, b in zip(route.hop2, bufs)]
    out = []
    for c, h in enumerate(route.hop2):
        back = unpack_rows(pend[c].wait(), specs)
        table = [torch.zeros((h.n_in,) + b.shape[1:], dtype=b.dtype, device=b.device).index_add_(
            0, h.plan.send_rows, b) for b in back]
        out.append(disp.send(route.hop1, pack_rows(table), route.r1[c], route.s1[c], direction))
    return out, specs


# ------------------------------------------------------------------------------ handles (main thread)
class ForwardWait:
    """The final receivers' rows, in the unchunked order: ``wait() -> list of parts``."""

    def __init__(self, disp, route: Route, fut: Future):
        self.disp, self.route, self.fut = disp, route, fut

    def wait(self) -> list[torch.Tensor]:
        with self.disp.wait_span():
            pend, specs = self.fut.result()
            buf = torch.cat([p.wait() for p in pend])
        if self.route.perm is not None:
            buf = buf[self.route.perm]
        return unpack_rows(buf, specs)


class ReverseWait:
    """Rows back at the source, summed per source row: ``wait() -> list of (n_in, ...) parts``."""

    def __init__(self, disp, route: Route, fut: Future):
        self.disp, self.route, self.fut = disp, route, fut

    def wait(self) -> list[torch.Tensor]:
        hop1 = self.route.hop1
        with self.disp.wait_span():
            pend, specs = self.fut.result()
            got = [p.wait() for p in pend]
        row_bytes = got[0].shape[1]
        full = got[0].new_empty(sum(hop1.send_counts), row_bytes)
        for idx, g in zip(self.route.send_idx, got):
            full[idx] = g
        rows = hop1.plan.send_rows
        return [torch.zeros((hop1.n_in,) + b.shape[1:], dtype=b.dtype, device=b.device).index_add_(0, rows, b)
                for b in unpack_rows(full, specs)]
