"""Expert-parallel dispatch and combine on torch.distributed (report §3.2.2), behind one interface:

    d = dispatcher.dispatch(x, topk_idx, topk_weight)   # asynchronous: returns a handle
    recv = d.wait()                                      # Dispatched: rows for this rank's experts
    y_rows = dispatcher.run_experts(recv, experts)       # gate-weighted, one row per received row
    y = dispatcher.combine(y_rows, recv).wait()          # (N, dim) back at the source

``flat``: one all_to_all_single over the EP group, one copy per (token, destination rank).
``two_hop``: hop 1 over ``ep_inter`` (one copy per destination node, to the rank with the same local
index there), hop 2 over ``ep_intra`` (the relay forwards to the ranks owning the experts). Combine
walks back: each rank sums its experts' outputs per received row, the relay sums its node's rows,
then one row per node crosses the network; sums run in the activation dtype (BF16 in training).
The two hops are pipelined in ``chunks`` on a communication thread (parallel/two_hop_chunks.py), so
the NVLink hop progresses while the caller computes; results are bitwise the same for any count.

Every hop sends one byte buffer per row: the activation (or, with FP8 dispatch, its E4M3 bytes and
the per-1×128 power-of-2 scales: gloo has no float8, so everything travels as uint8), the gate weights
(fp32, k) and the physical expert slots (int32, k; −1 = served by another destination). Gradients
travel the reverse path: dispatch's backward is a combine of (dx, dw), combine's backward a dispatch
of dy — with ``fp8_grad`` dy, the gradient of the experts' output that their down-projection's backward
takes, goes as E4M3 with 1×128 power-of-2 scales too (report §3.3.3; combine itself and dispatch's backward
stay in the activation dtype), quantised once at the source and dequantised by the experts' rank.
Autograd sees each direction as one node whose forward is the communication already done.

``TrafficCounters`` adds up the bytes passed to each collective per link (self / intra / inter node),
from the split sizes actually used, and the token copies that crossed nodes.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dsv3.config import ConfigError
from dsv3.model.experts import sum_rows
from dsv3.training.faults import PeerError, fault_point, first_line
from parallel.placement import Placement
from parallel.a2a_rows import Hop, pack_rows, unpack_rows, dequant, quant_pow2
from parallel.routing_plan import Topology, plan_experts, plan_hop, ExpertPlan
from parallel.two_hop_chunks import ForwardWait, ReverseWait, Route, comm_thread, dispatch_task, forward_task, \
    plan_dispatch, reverse_task

# ------------------------------------------------------------------------------------- traffic
class TrafficCounters:
    """Bytes and rows handed to the collectives by this rank, keyed (direction, link).
    direction: dispatch / combine / dispatch_bwd / combine_bwd; link: self / intra / inter."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.rows: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens = 0  # tokens dispatched from this rank

    def add(self, direction: str, link: str, nbytes: int, rows: int) -> None:
        self.bytes[(direction, link)] += nbytes
        self.rows[(direction, link)] += rows

    def total(self, link: str, direction: Optional[str] = None) -> int:
        return sum(v for (d, l), v in self.bytes.items() if l == link and (direction is None or d == direction))

    def per_token(self) -> dict[str, float]:
        """Loggable scalars: bytes per dispatched token on each link, and inter-node copies per token."""
        t = max(self.tokens, 1)
        out = {f"{d}_{l}_bytes_per_token": v / t for (d, l), v in sorted(self.bytes.items()) if l != "self"}
        out["inter_copies_per_token"] = self.rows[("dispatch", "inter")] / t
        return out


def _peer_error(group, e: BaseException) -> PeerError:
    if isinstance(e, PeerError):
        return e
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - only for the message
        ranks = "?"
    return PeerError(f"expert all-to-all over ranks {ranks} failed: {first_line(e)}")

# ------------------------------------------------------------------------------------- transport
class Transfer:
    """One issued all-to-all: ``wait()`` returns once its rows are in the output buffer. ``issued`` and
    ``done`` bound it in time for a tracer (a real collective: both its issue time, the transport cannot
    see it finish; a modelled link: its booking)."""

    def __init__(self, work, issued: float, done: float):
        self.work, self.issued, self.done = work, issued, done

    def wait(self) -> None:
        self.work.wait()


class Transport:
    """``EPDispatcher.transport``: the seam every all-to-all of a route goes through. ``start`` issues one
    ``all_to_all_single`` over ``hop.group`` (``send_counts[peer]`` rows of ``buf`` to each peer,
    ``recv_counts[peer]`` rows from each into ``out``) and returns its ``Transfer``. ``bytes_per_link`` and
    ``messages``: what this rank puts on each link kind (intra / inter node, the peers of the group on it),
    the input of a transport that models the links; this one, the production transport, only issues the
    collective. The benchmarks install a modelled link around it (``parallel.sim.links.ModelledTransport``)."""

    def start(self, hop: Hop, out: torch.Tensor, buf: torch.Tensor, send_counts: list[int],
              recv_counts: list[int], bytes_per_link: dict[str, int], messages: dict[str, int]) -> Transfer:
        work = dist.all_to_all_single(out, buf, recv_counts, send_counts, group=hop.group, async_op=True)
        now = time.perf_counter()
        return Transfer(work, now, now)


class Pending:
    """An in-flight all-to-all (a ``Transfer``) and its output buffer; ``wait`` returns the buffer."""

    def __init__(self, transfer: Transfer, out: torch.Tensor, group=None):
        self.transfer, self.out, self.group = transfer, out, group

    def wait(self) -> torch.Tensor:
        try:
            self.transfer.wait()
        except RuntimeError as e:
            raise _peer_error(self.group, e) from e
        return self.out


class EPDispatcher:
    """Callable as ``MoE.dispatcher``. ``kind``: flat | two_hop. ``fp8``: dispatch E4M3 + pow2 scales;
    ``fp8_grad``: combine's backward (dy to the experts) in E4M3 + pow2 scales (``fp8.grad_dispatch``).
    ``chunks``: two_hop's hops pipelined in this many chunks (``parallel.a2a_chunks``; results do not
    depend on it). ``transport``: what issues every all-to-all (default ``Transport()``: the collective as
    is; the benchmarks install a modelled link, ``parallel.sim.links.ModelledTransport``, since loopback
    has no IB/NVLink asymmetry); ``tracer``: records each all-to-all's interval (the transport's
    ``Transfer.issued`` / ``done``) and the main thread's blocking waits."""

    def __init__(self, mesh, placement: Placement, kind: str = "two_hop", fp8: bool = False,
                 traffic: Optional[TrafficCounters] = None, transport: Optional[Transport] = None,
                 chunks: int = 1, fp8_grad: bool = False):
        if kind not in ("flat", "two_hop"):
            raise ValueError(f"parallel.dispatcher must be flat or two_hop, got {kind!r}")
        if not isinstance(chunks, int) or chunks < 1:
            raise ConfigError(f"parallel.a2a_chunks must be an integer >= 1, got {chunks!r}")
        lay = mesh.layout
        if placement.ep != lay.ep:
            raise ValueError(f"placement is for ep={placement.ep} but the mesh has ep={lay.ep}")
        self.mesh, self.placement, self.fp8, self.fp8_grad, self.chunks = mesh, placement, fp8, fp8_grad, chunks
        self.kind = "flat" if lay.ep_nodes == 1 else kind  # inside one node both are the same
        self.topo = Topology(lay.ep_nodes, lay.ep_local, placement.slots_per_rank)
        self.traffic = traffic if traffic is not None else TrafficCounters()
        self.transport, self.tracer = transport if transport is not None else Transport(), None
        me = lay.ep_rank
        node = lambda r: r // lay.ep_local  # noqa: E731
        link_of = lambda p: "self" if p == me else ("intra" if node(p) == node(me) else "inter")  # noqa: E731
        # per hop of a route: (group, link kind to each of its ranks, physical slot -> that group's rank)
        if self.kind == "flat":
            self.hop_specs = [(mesh.group("ep"), [link_of(p) for p in range(lay.ep)], self.topo.rank_of)]
        else:
            L = lay.ep_local
            inter_peers = [n * L + lay.ep_local_rank for n in range(lay.ep_nodes)]
            intra_peers = [lay.ep_node * L + l for l in range(L)]
            self.hop_specs = [(mesh.group("ep_inter"), [link_of(p) for p in inter_peers], self.topo.node_of),
                               (mesh.group("ep_intra"), [link_of(p) for p in intra_peers], self.topo.local_of)]
            self.count_hop = Hop(mesh.group("ep"), [link_of(p) for p in range(lay.ep)])   # two_hop's count exchange

    # ------------------------------------------------------------------------------ transport
    def send(self, hop: Hop, buf: torch.Tensor, send_counts: list[int], recv_counts: list[int],
             direction: str) -> Pending:
        """Every data collective of a route goes through here: ``buf`` (rows, bytes) uint8, ``send_counts[peer]``
        rows to each peer of ``hop``, counted in ``traffic`` under ``direction``. Always asynchronous: wait
        on the result."""
        row_bytes = buf.shape[1]
        per_link: dict[str, int] = {}
        msgs: dict[str, int] = {}
        for peer, c in enumerate(send_counts):
            lk = hop.links[peer]
            self.traffic.add(direction, lk, c * row_bytes, c)
            if lk != "self":
                per_link[lk] = per_link.get(lk, 0) + c * row_bytes
                msgs[lk] = msgs.get(lk, 0) + 1
        out = buf.new_empty(sum(recv_counts), row_bytes)
        try:
            transfer = self.transport.start(hop, out, buf, send_counts, recv_counts, per_link, msgs)
        except RuntimeError as e:
            raise _peer_error(hop.group, e) from e
        if self.tracer is not None:
            self.tracer.add(direction, "a2a", transfer.issued, transfer.done)
        return Pending(transfer, out, hop.group)

    def wait_span(self):
        """Context of a main-thread wait on an all-to-all (traced as ``wait`` when a tracer is set)."""
        return self.tracer.span("wait", "wait") if self.tracer is not None else contextlib.nullcontext()

    def exchange_counts(self, hop: Hop, send_counts: torch.Tensor) -> list[int]:
        """Blocking: every peer of ``hop`` gets its entries of ``send_counts``; returns what each peer sent here."""
        recv = torch.empty_like(send_counts)
        try:
            dist.all_to_all_single(recv, send_counts, group=hop.group)
        except RuntimeError as e:
            raise _peer_error(hop.group, e) from e
        return recv.tolist()

    def _reverse_hop(self, hop: Hop, parts: list[torch.Tensor], direction: str):
        """Flat: receiver-side rows back to the sender; returns a closure finishing the index_add."""
        specs = [(p.dtype, tuple(p.shape[1:])) for p in parts]
        pend = self.send(hop, pack_rows(parts), hop.recv_counts, hop.send_counts, direction)

        def finish() -> list[torch.Tensor]:
            with self.wait_span():
                got = pend.wait()
            back = unpack_rows(got, specs)
            rows = hop.plan.send_rows
            return [torch.zeros((hop.n_in,) + b.shape[1:], dtype=b.dtype, device=b.device).index_add_(0, rows, b)
                    for b in back]
        return finish

    # ------------------------------------------------------------- routes, either direction
    def reverse_async(self, route, parts: list[torch.Tensor], direction: str):
        """Rows at the final receivers back along ``route`` to the source, summed per source row.
        Returns a handle: ``wait() -> list of parts``. Combine, and dispatch's backward."""
        if self.kind == "two_hop":
            return ReverseWait(self, route, comm_thread().submit(reverse_task, self, route, parts, direction))
        return _Finish(self._reverse_hop(route[0], parts, direction))

    def forward_async(self, route, parts: list[torch.Tensor], direction: str):
        """Rows at the source out along a planned ``route`` to every receiver. ``wait() -> parts``.
        Combine's backward."""
        if self.kind == "two_hop":
            return ForwardWait(self, route, comm_thread().submit(forward_task, self, route, parts, direction))
        hop = route[0]
        pend = self.send(hop, pack_rows([p[hop.plan.send_rows] for p in parts]), hop.send_counts, hop.recv_counts,
                         direction)
        return _FlatForward(self, pend, [(p.dtype, tuple(p.shape[1:])) for p in parts])

    def dispatch_backward(self, route, parts: list[torch.Tensor]):
        return self.reverse_async(route, parts, "dispatch_bwd")

    def combine_backward(self, route, gy: torch.Tensor):
        """gy (N, dim) out to every row; ``wait() -> [rows]`` in gy's dtype (FP8 on the wire with fp8_grad)."""
        if not self.fp8_grad:
            return self.forward_async(route, [gy.contiguous()], "combine_bwd")
        return _Dequantised(self.forward_async(route, list(quant_pow2(gy.detach())), "combine_bwd"), gy.dtype)

    # ------------------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> "DispatchHandle":
        """x (N, dim), topk_idx (N, k) logical experts, topk_weight (N, k). Starts the first hop."""
        N, k = topk_idx.shape
        self.traffic.tokens += N
        phys = self.placement.to_physical(topk_idx).to(torch.int32)
        if self.fp8:
            x_fp8, scale = quant_pow2(x.detach())
            payload = [x_fp8, scale]
        else:
            payload = [x.detach()]
        w = topk_weight.detach().to(torch.promote_types(topk_weight.dtype, torch.float32))
        h = DispatchHandle(self, x, topk_weight)
        if self.kind == "two_hop":
            route = Route(self.chunks)
            plan_dispatch(self, route, phys)    # the counts, synchronously (as flat's below)
            h.route, h.rows = route, ForwardWait(self, route, comm_thread().submit(dispatch_task, self, route,
                                                                                    payload, w, phys))
        else:
            group, links, dest_of = self.hop_specs[0]
            plan = plan_hop(dest_of(phys.long()), len(links))
            hop = Hop(group, links, plan, n_in=N, send_counts=plan.send_counts.tolist())
            hop.recv_counts = self.exchange_counts(hop, plan.send_counts)
            parts = [p[plan.send_rows] for p in payload]
            parts += [torch.where(plan.choice_mask, w[plan.send_rows], 0.0),
                      torch.where(plan.choice_mask, phys[plan.send_rows], -1)]
            pend = self.send(hop, pack_rows(parts), hop.send_counts, hop.recv_counts, "dispatch")
            h.route, h.rows = [hop], _FlatForward(self, pend, [(p.dtype, tuple(p.shape[1:])) for p in parts])
        fault_point("a2a")   # DSV3_FAULT=a2a:step:rank dies with this dispatch in flight
        return h

    def run_experts(self, recv: "Dispatched", experts) -> torch.Tensor:
        """Grouped GEMM over the received rows, gate-weighted and summed per row: (R, dim). The gate
        weight multiplies the SwiGLU output before the down-projection (as the one-process path does),
        so its gradient comes from the experts' backward and no expert output row is kept for it; the
        per-row sum keeps only the row index (``sum_rows``)."""
        ep: ExpertPlan = recv.expert_plan
        R, dim = recv.x.shape
        if ep.rows.numel() == 0:  # nothing for this rank (torch._grouped_mm's backward rejects M = 0)
            return recv.x.new_zeros(R, dim) + 0 * recv.x.sum() + 0 * recv.weight.sum()
        y = experts(recv.x.index_select(0, ep.rows), ep.tokens_per_expert, recv.weight[ep.rows, ep.choices])
        return sum_rows(y, ep.rows, R)

    def combine(self, y_rows: torch.Tensor, recv: "Dispatched") -> "CombineHandle":
        return CombineHandle(self, recv.hops, y_rows)

    def __call__(self, x, topk_idx, topk_weight, experts) -> torch.Tensor:
        recv = self.dispatch(x, topk_idx, topk_weight).wait()
        return self.combine(self.run_experts(recv, experts), recv).wait()


class _Finish:
    def __init__(self, fn):
        self.fn = fn

    def wait(self):
        return self.fn()


class _Dequantised:
    """An FP8 transfer's handle: ``wait() -> [rows dequantised to dtype]``."""

    def __init__(self, inner, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype

    def wait(self) -> list[torch.Tensor]:
        return [dequant(*self.inner.wait(), self.dtype)]


class _FlatForward:
    def __init__(self, disp: EPDispatcher, pend: Pending, specs):
        self.disp, self.pend, self.specs = disp, pend, specs

    def wait(self) -> list[torch.Tensor]:
        with self.disp.wait_span():
            got = self.pend.wait()
        return unpack_rows(got, self.specs)


@dataclass
class Dispatched:
    """What arrived at this rank. x: (R, dim) in the activation dtype (dequantised under FP8; the exact
    E4M3 bytes and pow2 scales are kept in x_fp8 / x_scale for an FP8 grouped GEMM, which requantises
    x losslessly); weight (R, k) fp32, 0 where the choice is not this rank's; local_slot (R, k).
    ``hops``: the route (flat: [Hop]; two_hop: a ``two_hop_chunks.Route``) that combine walks back."""
    x: torch.Tensor
    weight: torch.Tensor
    local_slot: torch.Tensor
    expert_plan: ExpertPlan
    hops: object
    x_fp8: Optional[torch.Tensor] = None
    x_scale: Optional[torch.Tensor] = None

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self.expert_plan.tokens_per_expert


class DispatchHandle:
    def __init__(self, disp: EPDispatcher, x: torch.Tensor, w: torch.Tensor):
        self.disp, self.x, self.w = disp, x, w
        self.route, self.rows = None, None

    def wait(self) -> Dispatched:
        d = self.disp
        *payload, w, phys = self.rows.wait()
        local = d.topo.slot_of(phys.long())
        plan = plan_experts(local, d.placement.slots_per_rank)
        x_fp8 = x_scale = None
        if d.fp8:
            x_fp8, x_scale = payload
        x_recv, w_recv = _DispatchAttach.apply(self.x, self.w, d, self.route, payload, w)
        return Dispatched(x_recv, w_recv, local, plan, self.route, x_fp8, x_scale)


class _DispatchAttach(torch.autograd.Function):
    """Forward: the already received rows (dequantised if FP8). Backward: (dx, dw) go back along the
    route, summed at every relay and at the source (dispatch's backward is a combine)."""

    @staticmethod
    def forward(ctx, x, w, disp, route, payload, w_recv):
        ctx.disp, ctx.route, ctx.x_dtype, ctx.w_dtype = disp, route, x.dtype, w.dtype
        x_recv = dequant(payload[0], payload[1], x.dtype) if disp.fp8 else payload[0]
        ctx.shapes, ctx.device = (x_recv.shape, w_recv.shape), x.device
        return x_recv, w_recv.to(w.dtype)

    @staticmethod
    def backward(ctx, gx, gw):
        gx = torch.zeros(ctx.shapes[0], dtype=ctx.x_dtype, device=ctx.device) if gx is None else gx
        gw = torch.zeros(ctx.shapes[1], dtype=ctx.w_dtype, device=ctx.device) if gw is None else gw
        parts = ctx.disp.dispatch_backward(ctx.route, [
            gx.to(ctx.x_dtype).contiguous(), gw.to(torch.promote_types(ctx.w_dtype, torch.float32)).contiguous()]).wait()
        return parts[0], parts[1].to(ctx.w_dtype), None, None, None, None


class CombineHandle:
    def __init__(self, disp: EPDispatcher, route, y_rows: torch.Tensor):
        self.disp, self.route, self.y_rows = disp, route, y_rows
        self._back = disp.reverse_async(route, [y_rows.detach()], "combine")

    def wait(self) -> torch.Tensor:
        parts = self._back.wait()
        return _CombineAttach.apply(self.y_rows, self.disp, self.route, parts[0])


class _CombineAttach(torch.autograd.Function):
    """Forward: the combined (N, dim). Backward: dy goes out along the dispatch route to every row."""

    @staticmethod
    def forward(ctx, y_rows, disp, route, y):
        ctx.disp, ctx.route = disp, route
        return y

    @staticmethod
    def backward(ctx, gy):
        return ctx.disp.combine_backward(ctx.route, gy).wait()[0], None, None, None
