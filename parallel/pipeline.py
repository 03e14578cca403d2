"""One executor for every pipeline schedule (report §3.2.1).

    stages = dsv3_stages(model, layout("dualpipe", N).num_model_stages)   # parallel/dsv3_stages.py
    pipe = Pipeline(model, stages, "dualpipe", num_chunks=C, act_shape=(B, T, D), act_dtype=torch.float32)
    losses = pipe.step(microbatches)      # runs this rank's ops; grads accumulate in pipe.params
    pipe.sync_grads()                     # sums the copies of every parameter (DualPipe mirrors, tied embedding)

A stage is any ``nn.Module`` called as ``stage(x, mb)``: the first stage of a chain gets ``x=None`` and
reads its input from the micro-batch dict, the last returns a scalar loss. Each rank deep-copies the
model stages its schedule places there (both together, so weights shared between them, such as an
embedding used again by MTP, stay one tensor). A parameter held by several ranks — DualPipe's two
copies of a stage, 1F1B's tied embedding beside MTP — has its gradient summed over those ranks, so
every copy takes the same optimizer step and stays bitwise equal.

P2P: every send is an ``isend`` nobody waits on until the step ends; a rank blocks only on the receive
its next op needs. Sends and receives between a pair go out in one order both ranks derive from the
schedule (``parallel.p2p_model``), the order NCCL — which ignores tags — needs to match them. So the executor stalls exactly when ``parallel.simulate`` reports a deadlock, and
gloo cannot hang on send ordering. A dead peer surfaces as an error from gloo's receive timeout.
"""
from __future__ import annotations

import copy
from collections import deque
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dsv3.training.faults import PeerError, fault_point, first_line as _first_line
from parallel.mesh import group_of_ranks
from parallel.p2p_model import ChannelCursor, pair_orders
from parallel.schedules import Msg, Op, layout, schedule
from parallel.weight_grad import backward_input


# One tag for every pipeline message: NCCL ignores P2P tags, so messages must match by their order between
# a pair of ranks; gloo with a single tag matches the same way, so the CPU tests see what NCCL would.
P2P_TAG = 0


class Pipeline:
    def __init__(self, model: nn.Module, stages: Sequence[nn.Module], kind: str, num_chunks: int, *,
                 act_shape: Sequence[int], act_dtype: torch.dtype, group: Optional[dist.ProcessGroup] = None,
                 recv_timeout: float = 60.0):
        """``model`` names the parameters (its ``named_parameters``/``named_buffers``); ``stages`` are
        modules built from its submodules; a receive waiting longer than ``recv_timeout`` s raises."""
        self.group = group or dist.group.WORLD
        self.rank, self.num_ranks = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.kind, self.num_chunks = kind, num_chunks
        self.layout = layout(kind, self.num_ranks)
        if len(stages) != self.layout.num_model_stages:
            raise ValueError(f"{kind} on {self.num_ranks} ranks needs {self.layout.num_model_stages} stages, got {len(stages)}")
        self.set_num_chunks(num_chunks)
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.recv_timeout = recv_timeout
        held = self.layout.model_stages_of(self.rank)
        copies = copy.deepcopy(nn.ModuleList([stages[s] for s in held]))
        self.device = next(copies.parameters()).device   # the model's other stages may be on the meta device
        self.stage_module = dict(zip(held, copies))
        names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
        self.params: dict[str, nn.Parameter] = {}    # model-level name -> this rank's copy
        self.buffers: dict[str, torch.Tensor] = {}
        stage_names: list[set[str]] = []
        for s, orig in enumerate(stages):
            here = set()
            for (_, t), (_, mine) in zip(_tensors(orig), _tensors(copies[held.index(s)]) if s in held else _tensors(orig)):
                if id(t) not in names:
                    raise ValueError(f"stage {s} holds a tensor that is not in the model's named_parameters/buffers")
                here.add(names[id(t)])
                if s in held:
                    (self.params if isinstance(mine, nn.Parameter) else self.buffers)[names[id(t)]] = mine
            stage_names.append(here)
        # ranks holding each name; every rank creates the same groups in the same order (new_group is collective)
        holders: dict[str, tuple[int, ...]] = {}
        for r in range(self.num_ranks):
            for s in self.layout.model_stages_of(r):
                for n in stage_names[s]:
                    holders[n] = tuple(sorted(set(holders.get(n, ())) | {r}))
        self._holders = holders
        global_ranks = dist.get_process_group_ranks(self.group)
        self._copy_groups: dict[tuple[int, ...], Optional[dist.ProcessGroup]] = {}
        for hs in sorted({h for h in holders.values() if len(h) > 1}):
            pg = group_of_ranks(tuple(global_ranks[r] for r in hs), self.recv_timeout)
            self._copy_groups[hs] = pg if self.rank in hs else None

    def set_num_chunks(self, num_chunks: int) -> None:
        """This rank's ops for ``num_chunks`` micro-batches per step, and per peer the one order of calls
        (sends and receives) on the channel to it that NCCL can match: NCCL ignores tags and runs a pair's
        calls in both directions as one FIFO, so both ranks issue them in the same order
        (``parallel.p2p_model.pair_orders``, proved deadlock-free there)."""
        self.num_chunks = num_chunks
        self.ops = schedule(self.kind, self.rank, self.num_ranks, num_chunks)
        self.channel_orders = pair_orders(self.kind, self.num_ranks, num_chunks)[self.rank]

    # ------------------------------------------------------------------------------ a step
    def step(self, microbatches: Sequence[dict]) -> list[Optional[torch.Tensor]]:
        """Runs this rank's schedule once. Returns each micro-batch's loss where its last stage ran
        here (None elsewhere). Parameter gradients accumulate into ``.grad``."""
        if len(microbatches) != self.num_chunks:
            raise ValueError(f"expected {self.num_chunks} micro-batches, got {len(microbatches)}")
        self.mbs = microbatches
        self.losses: list[Optional[torch.Tensor]] = [None] * self.num_chunks
        self.inbox: dict[tuple, torch.Tensor] = {}       # received or locally handed-over tensors
        self.saved: dict[tuple[int, int], tuple] = {}    # (pipe stage, mb) -> (input, output)
        self.wqueue: deque = deque()                     # (pipe stage, mb, weight-grad closure), FIFO
        self.pending_sends: list = []
        self.posted: dict[tuple, tuple] = {}             # receives posted ahead, in the channel order
        self.cursor = ChannelCursor(self.channel_orders)
        for peer in self.channel_orders:
            self._post_receives(peer)
        for op in self.ops:
            self._run(op)
        for work, _ in self.pending_sends:
            try:
                work.wait()
            except RuntimeError as e:
                raise PeerError(f"pipeline send on rank {dist.get_rank()} failed: {_first_line(e)}") from e
        assert not self.saved and not self.wqueue and not self.inbox and not self.posted, "schedule left state behind"
        assert self.cursor.finished(), "a channel's calls were not all issued"
        self.pending_sends = []
        return self.losses

    def _run(self, op: Op) -> None:
        recvs = [(m, self._irecv(m)) for m in op.recvs]
        for m, (work, buf) in recvs:
            peer = dist.get_global_rank(self.group, m.peer)
            try:
                done = work.wait(timedelta(seconds=self.recv_timeout))
            except RuntimeError as e:  # gloo: the peer's connection closed (it died) or its own timeout
                raise PeerError(f"pipeline receive of {m.what} {m.src}->{m.dst} mb {m.mb} from rank {peer} "
                                f"failed (recv timeout {self.recv_timeout:g}s): {_first_line(e)}") from e
            if not done:
                raise PeerError(f"pipeline receive of {m.what} {m.src}->{m.dst} mb {m.mb} from rank {peer} "
                                f"timed out after {self.recv_timeout:g}s")
            self.inbox[m.key] = buf
        if op.kind == "F":
            self._forward(op)
        elif op.kind in ("B", "Bi"):
            self._backward(op)
        elif op.kind == "W":
            stage, mb, weight = self.wqueue.popleft()
            assert (stage, mb) == (op.stage, op.mb), f"W queue holds {stage}.{mb}, schedule says {op}"
            weight()
        else:
            self._forward_backward(op)
        for m in op.sends:
            self._isend(m)
        self.pending_sends = [(w, t) for w, t in self.pending_sends if not w.is_completed()]

    # ----------------------------------------------------------------------------- compute
    def _module(self, ps: int) -> nn.Module:
        return self.stage_module[self.layout.model_stage[ps]]

    def _input(self, f: Op) -> Optional[torch.Tensor]:
        prv = self.layout.prev(f.stage)
        if prv is None:
            return None
        x = self.inbox.pop(("act", prv, f.stage, f.mb))
        return x.requires_grad_(torch.is_grad_enabled())

    def _after_forward(self, f: Op, x: Optional[torch.Tensor], y: torch.Tensor) -> None:
        self.saved[(f.stage, f.mb)] = (x, y)
        nxt = self.layout.next(f.stage)
        if nxt is None:
            self.losses[f.mb] = y.detach()
        else:  # a local hand-over (DualPipeV's turn) is a detached leaf, exactly like a received one
            self.inbox[("act", f.stage, nxt, f.mb)] = y.detach()

    def _forward(self, f: Op) -> None:
        x = self._input(f)
        self._after_forward(f, x, self._module(f.stage)(x, self.mbs[f.mb]))

    def _take_backward(self, b: Op) -> tuple:
        x, y = self.saved.pop((b.stage, b.mb))
        nxt = self.layout.next(b.stage)
        g = None if nxt is None else self.inbox.pop(("grad", nxt, b.stage, b.mb))
        return x, y, g

    def _after_backward(self, b: Op, dx: Optional[torch.Tensor]) -> None:
        prv = self.layout.prev(b.stage)
        if prv is not None:
            self.inbox[("grad", b.stage, prv, b.mb)] = dx

    def _backward(self, b: Op) -> None:
        x, y, g = self._take_backward(b)
        if b.kind == "B":
            torch.autograd.backward(y, g)
            dx = None if x is None else x.grad
        else:
            params = [p for p in self._module(b.stage).parameters() if p.requires_grad]
            grads, weight = backward_input([y], [g], [] if x is None else [x], params)
            dx = grads[0] if grads else None
            self.wqueue.append((b.stage, b.mb, weight))
        self._after_backward(b, dx)

    def _forward_backward(self, op: Op) -> None:
        """A paired F&B (DualPipe's steady state, report §3.2.1), here its F then its B; ``OverlapPipeline``
        (parallel/overlap_pipeline.py) interleaves the two chunks instead."""
        self._forward(op.f)
        self._backward(op.b)

    # --------------------------------------------------------------------------------- P2P
    def _post_receives(self, peer: int) -> None:
        """Posts the receives from ``peer`` that come before this rank's next send to it on the channel."""
        src = dist.get_global_rank(self.group, peer)
        for key in self.cursor.receives_due(peer):
            buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
            self.posted[key] = (dist.irecv(buf, src, group=self.group, tag=P2P_TAG), buf)

    def _irecv(self, m: Msg):
        """The receive of ``m``, posted earlier in the channel order (every message ahead of it on the
        channel came from an op that ran before this one, so it is always posted by now)."""
        if m.key not in self.posted:
            raise RuntimeError(f"rank {self.rank} needs {m} before its receive was posted: channel order broken")
        return self.posted.pop(m.key)

    def _isend(self, m: Msg) -> None:
        t = self.inbox.pop(m.key).contiguous()
        if t.shape != self.act_shape or t.dtype != self.act_dtype:
            raise ValueError(f"stage {m.src} sends {tuple(t.shape)} {t.dtype}; the pipeline was built for "
                             f"act_shape={self.act_shape}, act_dtype={self.act_dtype}")
        peer = dist.get_global_rank(self.group, m.peer)
        try:
            work = dist.isend(t, peer, group=self.group, tag=P2P_TAG)
        except RuntimeError as e:   # the peer's connection is already closed: name the rank, not an address
            raise PeerError(f"pipeline send of {m.what} {m.src}->{m.dst} mb {m.mb} to rank {m.peer} failed: "
                            f"{_first_line(e)}") from e
        self.pending_sends.append((work, t))
        self.cursor.sent(m.peer, m.key)
        self._post_receives(m.peer)
        fault_point("p2p")   # DSV3_FAULT=p2p:step:rank dies with this send in flight

    # ------------------------------------------------------------------------ copies
    def sync_grads(self) -> None:
        """Sums each parameter's gradient over the ranks holding a copy (DualPipe's mirrored stages'
        grads summed, report §3.2.1; the tied embedding's all-reduced). Missing grads count as zero."""
        self._sum_over_copies({n: p.grad if p.grad is not None else torch.zeros_like(p)
                               for n, p in self.params.items()}, assign_grad=True)

    def sum_buffers(self, names: Sequence[str]) -> None:
        """Sums named buffers (e.g. MoE ``tokens_per_expert``) over their copies, before a bias update."""
        self._sum_over_copies({n: self.buffers[n] for n in names if n in self.buffers})

    def _sum_over_copies(self, tensors: dict[str, torch.Tensor], assign_grad: bool = False) -> None:
        for hs, pg in self._copy_groups.items():
            if pg is None:
                continue
            names = sorted(n for n in tensors if self._holders[n] == hs)
            if not names:
                continue
            flat = torch.cat([tensors[n].reshape(-1) for n in names])
            dist.all_reduce(flat, group=pg)
            for n, piece in zip(names, flat.split([tensors[n].numel() for n in names])):
                tensors[n].copy_(piece.view_as(tensors[n]))
        if assign_grad:
            for n, p in self.params.items():
                p.grad = tensors[n]

    def holders_of(self, name: str) -> tuple[int, ...]:
        """The pipeline ranks (ascending) holding a copy of ``name``, a model-level parameter or buffer name."""
        return self._holders[name]

    def copies_of(self, name: str) -> tuple[Optional[dist.ProcessGroup], int]:
        """``name``'s copies: (the group that sums them, None where there is one copy or this rank holds
        none; how many ranks hold one)."""
        hs = self._holders[name]
        return (self._copy_groups[hs], len(hs)) if len(hs) > 1 else (None, 1)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (for the optimizer)."""
        return list(self.params.values())


def _tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False))
