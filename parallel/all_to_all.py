"""Expert-parallel dispatch and combine on torch.distributed (SPEC §5), behind one interface:

    d = dispatcher.dispatch(x, topk_idx, topk_weight)   # asynchronous: returns a handle
    recv = d.wait()                                      # Dispatched: rows for this rank's experts
    y_rows = dispatcher.run_experts(recv, experts)       # gate-weighted, one row per received row
    y = dispatcher.combine(y_rows, recv).wait()          # (N, dim) back at the source

``flat``: one all_to_all_single over the EP group, one copy per (token, destination rank).
``two_hop``: hop 1 over ``ep_inter`` (one copy per destination node, to the rank with the same local
index there), hop 2 over ``ep_intra`` (the relay forwards to the ranks owning the experts). Combine
walks back: each rank sums its experts' outputs per received row, the relay sums its node's rows,
then one row per node crosses the network; sums run in the activation dtype (BF16 in training).

Every hop sends one byte buffer per row: the activation (or, with FP8 dispatch, its E4M3 bytes and
the per-1×128 power-of-2 scales: gloo has no float8, so everything travels as uint8), the gate weights
(fp32, k) and the physical expert slots (int32, k; −1 = served by another destination). Gradients
travel the reverse path: dispatch's backward is a combine of (dx, dw), combine's backward a dispatch
of dy. Autograd sees each direction as one node whose forward is the communication already done.

``TrafficCounters`` adds up the bytes passed to each collective per link (self / intra / inter node),
from the split sizes actually used, and the token copies that crossed nodes.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from dsv3.faults import PeerError, fault_point, first_line
from parallel.placement import Placement
from parallel.routing_plan import HopPlan, Topology, plan_experts, plan_hop, ExpertPlan

FP8_BLOCK = 128


# ------------------------------------------------------------------------------------------ FP8
def quant_pow2(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) → (x_fp8 (N, D) float8_e4m3fn, scale (N, ceil(D/block)) fp32), power-of-2 scales."""
    from triton_kernels.quant_ref import act_quant_ref  # torch only; no triton import
    return act_quant_ref(x, block, pow2_scale=True)


def dequant(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int = FP8_BLOCK) -> torch.Tensor:
    from triton_kernels.quant_ref import act_dequant_ref
    return act_dequant_ref(x_fp8, scale, block, dtype)


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


# ----------------------------------------------------------------------------------- byte rows
def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise concatenation of (S, ...) tensors of any dtype as raw bytes: (S, B) uint8."""
    S = parts[0].shape[0]
    return torch.cat([_dense(p).view(torch.uint8).reshape(S, _row_bytes(p)) for p in parts], dim=1)


def _dense(p: torch.Tensor) -> torch.Tensor:
    """Row-major storage (an empty or expanded grad may report contiguous with stride 0)."""
    p = p.contiguous()
    if p.dim() and p.stride(-1) != 1:
        p = torch.empty(p.shape, dtype=p.dtype).copy_(p)
    return p


def _row_bytes(p: torch.Tensor) -> int:
    n = p.element_size()
    for s in p.shape[1:]:
        n *= s
    return n


def _unpack(buf: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    out, col = [], 0
    for dtype, tail in specs:
        n = torch.empty((), dtype=dtype).element_size()
        for s in tail:
            n *= s
        out.append(buf[:, col:col + n].contiguous().view(dtype).reshape(buf.shape[0], *tail))
        col += n
    return out


def _peer_error(group, e: BaseException) -> PeerError:
    if isinstance(e, PeerError):
        return e
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - only for the message
        ranks = "?"
    return PeerError(f"expert all-to-all over ranks {ranks} failed: {first_line(e)}")


@dataclass
class Hop:
    """One collective of a route: its group, the link kind to each peer, and this rank's plan."""
    group: object
    links: list[str]                 # per group rank: self / intra / inter
    plan: Optional[HopPlan] = None
    n_in: int = 0                    # rows of the table the hop sends from
    send_counts: list[int] = field(default_factory=list)
    recv_counts: list[int] = field(default_factory=list)


class _Pending:
    """An in-flight all_to_all_single; ``wait`` also sleeps out the simulated link time."""

    def __init__(self, work, out, t_done: float, group=None):
        self.work, self.out, self.t_done, self.group = work, out, t_done, group

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            try:
                self.work.wait()
            except RuntimeError as e:
                raise _peer_error(self.group, e) from e
        delay = self.t_done - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self.out


class EPDispatcher:
    """Callable as ``MoE.dispatcher``. ``kind``: flat | two_hop. ``fp8``: dispatch E4M3 + pow2 scales.
    ``sim_bandwidth``: {'intra': B/s, 'inter': B/s} makes every send also take bytes/bandwidth
    (benchmarks: loopback has no IB/NVLink asymmetry)."""

    def __init__(self, mesh, placement: Placement, kind: str = "two_hop", fp8: bool = False,
                 traffic: Optional[TrafficCounters] = None, sim_bandwidth: Optional[dict] = None):
        if kind not in ("flat", "two_hop"):
            raise ValueError(f"parallel.dispatcher must be flat or two_hop, got {kind!r}")
        lay = mesh.layout
        if placement.ep != lay.ep:
            raise ValueError(f"placement is for ep={placement.ep} but the mesh has ep={lay.ep}")
        self.mesh, self.placement, self.fp8 = mesh, placement, fp8
        self.kind = "flat" if lay.ep_nodes == 1 else kind  # inside one node both are the same
        self.topo = Topology(lay.ep_nodes, lay.ep_local, placement.slots_per_rank)
        self.traffic = traffic if traffic is not None else TrafficCounters()
        self.sim_bandwidth = sim_bandwidth
        me = lay.ep_rank
        node = lambda r: r // lay.ep_local  # noqa: E731
        link = lambda p: "self" if p == me else ("intra" if node(p) == node(me) else "inter")  # noqa: E731
        if self.kind == "flat":
            self._hop_specs = [(mesh.group("ep"), [link(p) for p in range(lay.ep)], self.topo.rank_of)]
        else:
            L = lay.ep_local
            inter_peers = [n * L + lay.ep_local_rank for n in range(lay.ep_nodes)]
            intra_peers = [lay.ep_node * L + l for l in range(L)]
            self._hop_specs = [(mesh.group("ep_inter"), [link(p) for p in inter_peers], self.topo.node_of),
                               (mesh.group("ep_intra"), [link(p) for p in intra_peers], self.topo.local_of)]

    # ------------------------------------------------------------------------------ transport
    def _send(self, hop: Hop, buf: torch.Tensor, send_counts: list[int], recv_counts: list[int],
              direction: str, async_op: bool) -> _Pending:
        row_bytes = buf.shape[1]
        secs = defaultdict(float)
        for peer, c in enumerate(send_counts):
            lk = hop.links[peer]
            self.traffic.add(direction, lk, c * row_bytes, c)
            if self.sim_bandwidth and lk != "self":
                secs[lk] += c * row_bytes / self.sim_bandwidth[lk]
        t_done = time.perf_counter() + max(secs.values(), default=0.0)
        out = buf.new_empty(sum(recv_counts), row_bytes)
        try:
            work = dist.all_to_all_single(out, buf, recv_counts, send_counts, group=hop.group, async_op=async_op)
        except RuntimeError as e:
            raise _peer_error(hop.group, e) from e
        return _Pending(work if async_op else None, out, t_done, hop.group)

    def _exchange_counts(self, hop: Hop, send_counts: torch.Tensor) -> list[int]:
        recv = torch.empty_like(send_counts)
        try:
            dist.all_to_all_single(recv, send_counts, group=hop.group)
        except RuntimeError as e:
            raise _peer_error(hop.group, e) from e
        return recv.tolist()

    def _reverse_hop(self, hop: Hop, parts: list[torch.Tensor], direction: str, async_op: bool):
        """Receiver side rows → back to the sender; returns a closure finishing the index_add."""
        specs = [(p.dtype, tuple(p.shape[1:])) for p in parts]
        pend = self._send(hop, _pack(parts), hop.recv_counts, hop.send_counts, direction, async_op)

        def finish() -> list[torch.Tensor]:
            back = _unpack(pend.wait(), specs)
            rows = hop.plan.send_rows
            return [torch.zeros((hop.n_in,) + b.shape[1:], dtype=b.dtype, device=b.device).index_add_(0, rows, b)
                    for b in back]
        return finish

    def _forward_hop(self, hop: Hop, parts: list[torch.Tensor], direction: str) -> list[torch.Tensor]:
        rows = hop.plan.send_rows
        specs = [(p.dtype, tuple(p.shape[1:])) for p in parts]
        buf = _pack([p[rows] for p in parts])
        return _unpack(self._send(hop, buf, hop.send_counts, hop.recv_counts, direction, False).wait(), specs)

    def reverse(self, hops: list[Hop], parts: list[torch.Tensor], direction: str) -> list[torch.Tensor]:
        for hop in reversed(hops):
            parts = self._reverse_hop(hop, parts, direction, False)()
        return parts

    def forward_rows(self, hops: list[Hop], parts: list[torch.Tensor], direction: str) -> list[torch.Tensor]:
        for hop in hops:
            parts = self._forward_hop(hop, parts, direction)
        return parts

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
        h = DispatchHandle(self, x, topk_weight, N)
        h._start_hop(0, payload, topk_weight.detach().to(torch.promote_types(topk_weight.dtype, torch.float32)), phys)
        return h

    def run_experts(self, recv: "Dispatched", experts) -> torch.Tensor:
        """Grouped GEMM over the received rows, gate-weighted and summed per row: (R, dim)."""
        ep: ExpertPlan = recv.expert_plan
        R, dim = recv.x.shape
        if ep.rows.numel() == 0:  # nothing for this rank (torch._grouped_mm's backward rejects M = 0)
            return recv.x.new_zeros(R, dim) + 0 * recv.x.sum() + 0 * recv.weight.sum()
        y = experts(recv.x[ep.rows], ep.tokens_per_expert)
        y = y * recv.weight[ep.rows, ep.choices].unsqueeze(1).to(y.dtype)
        return torch.zeros(R, dim, dtype=y.dtype, device=y.device).index_add(0, ep.rows, y)

    def combine(self, y_rows: torch.Tensor, recv: "Dispatched") -> "CombineHandle":
        return CombineHandle(self, recv.hops, y_rows)

    def __call__(self, x, topk_idx, topk_weight, experts) -> torch.Tensor:
        recv = self.dispatch(x, topk_idx, topk_weight).wait()
        return self.combine(self.run_experts(recv, experts), recv).wait()


@dataclass
class Dispatched:
    """What arrived at this rank. x: (R, dim) in the activation dtype (dequantised under FP8; the exact
    E4M3 bytes and pow2 scales are kept in x_fp8 / x_scale for an FP8 grouped GEMM, which requantises
    x losslessly); weight (R, k) fp32, 0 where the choice is not this rank's; local_slot (R, k)."""
    x: torch.Tensor
    weight: torch.Tensor
    local_slot: torch.Tensor
    expert_plan: ExpertPlan
    hops: list
    x_fp8: Optional[torch.Tensor] = None
    x_scale: Optional[torch.Tensor] = None

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self.expert_plan.tokens_per_expert


class DispatchHandle:
    def __init__(self, disp: EPDispatcher, x: torch.Tensor, w: torch.Tensor, N: int):
        self.disp, self.x, self.w, self.N = disp, x, w, N
        self.hops: list[Hop] = []
        self._pending = None

    def _start_hop(self, i: int, payload: list[torch.Tensor], w: torch.Tensor, phys: torch.Tensor) -> None:
        d = self.disp
        group, links, dest_of = d._hop_specs[i]
        plan = plan_hop(dest_of(phys.long()), len(links))
        hop = Hop(group, links, plan, n_in=phys.shape[0])
        hop.send_counts = plan.send_counts.tolist()
        hop.recv_counts = d._exchange_counts(hop, plan.send_counts)
        rows, mask = plan.send_rows, plan.choice_mask
        parts = [p[rows] for p in payload]
        parts += [torch.where(mask, w[rows], 0.0), torch.where(mask, phys[rows], -1)]
        self._specs = [(p.dtype, tuple(p.shape[1:])) for p in parts]
        self.hops.append(hop)
        self._pending = d._send(hop, _pack(parts), hop.send_counts, hop.recv_counts, "dispatch", True)
        fault_point("a2a")   # DSV3_FAULT=a2a:step:rank dies with this dispatch in flight

    def wait(self) -> Dispatched:
        d = self.disp
        while True:
            parts = _unpack(self._pending.wait(), self._specs)
            *payload, w, phys = parts
            if len(self.hops) == len(d._hop_specs):
                break
            self._start_hop(len(self.hops), payload, w, phys)  # the relay forwards inside its node
        local = d.topo.slot_of(phys.long())
        plan = plan_experts(local, d.placement.slots_per_rank)
        x_fp8 = x_scale = None
        if d.fp8:
            x_fp8, x_scale = payload
        x_recv, w_recv = _DispatchAttach.apply(self.x, self.w, d, self.hops, payload, w)
        return Dispatched(x_recv, w_recv, local, plan, self.hops, x_fp8, x_scale)


class _DispatchAttach(torch.autograd.Function):
    """Forward: the already received rows (dequantised if FP8). Backward: (dx, dw) go back along the
    route, summed at every relay and at the source (dispatch's backward is a combine)."""

    @staticmethod
    def forward(ctx, x, w, disp, hops, payload, w_recv):
        ctx.disp, ctx.hops, ctx.x_dtype, ctx.w_dtype = disp, hops, x.dtype, w.dtype
        x_recv = dequant(payload[0], payload[1], x.dtype) if disp.fp8 else payload[0]
        ctx.shapes, ctx.device = (x_recv.shape, w_recv.shape), x.device
        return x_recv, w_recv.to(w.dtype)

    @staticmethod
    def backward(ctx, gx, gw):
        gx = torch.zeros(ctx.shapes[0], dtype=ctx.x_dtype, device=ctx.device) if gx is None else gx
        gw = torch.zeros(ctx.shapes[1], dtype=ctx.w_dtype, device=ctx.device) if gw is None else gw
        parts = ctx.disp.reverse(ctx.hops, [gx.to(ctx.x_dtype).contiguous(), gw.to(torch.promote_types(ctx.w_dtype, torch.float32)).contiguous()], "dispatch_bwd")
        return parts[0], parts[1].to(ctx.w_dtype), None, None, None, None


class CombineHandle:
    def __init__(self, disp: EPDispatcher, hops: list[Hop], y_rows: torch.Tensor):
        self.disp, self.hops, self.y_rows = disp, hops, y_rows
        # the last hop's return starts now; earlier hops (two_hop's IB hop) run in wait()
        self._finish = disp._reverse_hop(hops[-1], [y_rows.detach()], "combine", True)

    def wait(self) -> torch.Tensor:
        parts = self._finish()
        for hop in reversed(self.hops[:-1]):
            parts = self.disp._reverse_hop(hop, parts, "combine", False)()
        return _CombineAttach.apply(self.y_rows, self.disp, self.hops, parts[0])


class _CombineAttach(torch.autograd.Function):
    """Forward: the combined (N, dim). Backward: dy goes out along the dispatch route to every row."""

    @staticmethod
    def forward(ctx, y_rows, disp, hops, y):
        ctx.disp, ctx.hops = disp, hops
        return y

    @staticmethod
    def backward(ctx, gy):
        g = ctx.disp.forward_rows(ctx.hops, [gy.contiguous()], "combine_bwd")[0]
        return g, None, None, None
