"""The pipeline executor with overlapped F&B chunks (report §3.2.1; SPEC §4 "An overlapped chunk ...").

    pipe = OverlapPipeline(model, block_stages(model, 2), "dualpipe", num_chunks=C, act_shape=..., act_dtype=...,
                           tracer=Tracer(rank))
    losses = pipe.step(microbatches)

Every stage runs as the parts of ``parallel.overlap`` (``stage_pieces``): DualPipe's and DualPipeV's FB
ops interleave the forward and backward chunks. 1F1B's steady state can be paired F(i+w)&B(i)
(``pair_steady``; see ``pair_1f1b`` for why that lengthens plain 1F1B's step). ``overlap=False`` runs the same parts F then B: the
non-overlapped execution, bitwise equal. ``BlockStage`` cuts a dsv3 ``Transformer`` into stages of
Blocks (embedding on the first, norm + head + cross-entropy on the last).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.overlap import Piece, drain, pair_1f1b, run_now, run_pair, stage_backward, stage_forward, stage_pieces
from parallel.pipeline import Pipeline
from parallel.schedules import Op
from parallel.trace import OP, P2P, Tracer


@contextlib.contextmanager
def member_only_groups_ctx():
    """``Pipeline`` makes its copy groups with ``dist.new_group``, which every rank of the world must
    enter in the same order; with several pipelines side by side (one per expert rank, PP × EP) each
    builds different groups, so let only the members of each group take part."""
    orig = dist.new_group

    def new_group(ranks=None, **kw):
        kw.setdefault("use_local_synchronization", True)
        return orig(ranks, **kw)
    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = orig


class _TracedRecv:
    def __init__(self, work, tr: Tracer, name: str, mb: int):
        self.work, self.tr, self.name, self.mb = work, tr, name, mb

    def wait(self, *args):
        with self.tr.context("", self.mb), self.tr.span(self.name, P2P):
            return self.work.wait(*args)


class OverlapPipeline(Pipeline):
    """``Pipeline`` whose stages run as parts: FB ops interleave their forward and backward chunks
    (``overlap=True``) or run them F then B (``overlap=False``); B, Bi and W run the same parts unpaired
    (Bi queues every part's weight grad for its W). Stage modules may define ``overlap_pieces()``;
    others run whole. ``pair_steady``: 1F1B's steady state as FB ops. ``tracer`` records every part,
    all-to-all (through ``LinkDispatcher``) and blocking receive. ``member_only_groups``: PP × EP meshes."""

    def __init__(self, model, stages, kind, num_chunks, *, overlap: bool = True, tracer: Optional[Tracer] = None,
                 pair_steady: bool = False, member_only_groups: bool = False, **kw):
        with member_only_groups_ctx() if member_only_groups else contextlib.nullcontext():
            super().__init__(model, stages, kind, num_chunks, **kw)
        self.overlap = overlap
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)
        if kind == "1f1b" and pair_steady:
            self.ops = pair_1f1b(self.ops)
        self._pieces = {id(m): stage_pieces(m) for m in self.stage_module.values()}
        self._records: dict[int, tuple] = {}   # id(stage output) -> (output, parts record)
        self._fb: Optional[Op] = None

    def _chunk_forward(self, module: nn.Module, x: Optional[torch.Tensor], mb: int):
        return stage_forward(self._pieces[id(module)], x, self.mbs[mb], self.tracer)

    def _keep(self, y: torch.Tensor, record: list) -> torch.Tensor:
        self._records[id(y)] = (y, record)
        return y

    def _forward(self, f: Op) -> None:
        x = self._input(f)
        with self.tracer.context("F", f.mb):
            y, record = drain(self._chunk_forward(self._module(f.stage), x, f.mb))
        self._after_forward(f, x, self._keep(y, record))

    def _backward(self, b: Op) -> None:
        _, y, g = self._take_backward(b)
        _, record = self._records.pop(id(y))
        tr = self.tracer
        if b.kind == "B":
            with tr.context("B", b.mb):
                dx = drain(stage_backward(record, g, tr, run_now(tr)))
        else:
            queued: list = []
            with tr.context("B", b.mb):
                dx = drain(stage_backward(record, g, tr, lambda name, w: queued.append((name, w))))

            def weight(mb: int = b.mb) -> None:
                with tr.context("W", mb):
                    for name, w in queued:
                        with tr.span(name):
                            w()
            self.wqueue.append((b.stage, b.mb, weight))
        self._after_backward(b, dx)

    def _run(self, op: Op) -> None:
        with self.tracer.context("", op.mb if op.kind != "FB" else op.f.mb), self.tracer.span(repr(op), OP):
            super()._run(op)

    def _forward_backward(self, op: Op) -> None:
        self._fb = op
        super()._forward_backward(op)

    def overlapped_forward_backward(self, f_module, f_input, f_mb, b_module, b_output, b_grad):
        f, b = self._fb.f, self._fb.b
        _, record = self._records.pop(id(b_output))
        tr = self.tracer
        (y, f_record), dx = run_pair(self._chunk_forward(f_module, f_input, f.mb),
                                     stage_backward(record, b_grad, tr, run_now(tr)), tr, f.mb, b.mb, self.overlap)
        x_b = record[0][1]["x"]
        if x_b is not None and dx is not None:  # Pipeline reads the input's .grad, as after autograd.backward
            x_b.grad = dx if x_b.grad is None else x_b.grad + dx
        return self._keep(y, f_record)

    def _irecv(self, m):
        work, buf = super()._irecv(m)
        return _TracedRecv(work, self.tracer, f"recv {m.what}", m.mb), buf


# ---------------------------------------------------------------------------- dsv3 stages
class BlockStage(nn.Module):
    """Layers [lo, hi) of a dsv3 ``Transformer``; the first stage embeds ``mb["tokens"]``, the last
    returns the next-token cross-entropy on ``mb["targets"]`` (no MTP). Submodules are the model's own,
    so ``Pipeline`` names every parameter."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.embed = model.embed if first else None
        self.norm, self.head = (model.norm, model.head) if last else (None, None)
        self.cos, self.sin = model.rope_cos, model.rope_sin  # plain attributes: not parameters of the stage

    def _rope(self, T: int):
        return self.cos[:T], self.sin[:T]

    def _embed(self, x, mb: dict) -> torch.Tensor:
        return self.embed(mb["tokens"])

    def _loss(self, h: torch.Tensor, mb: dict) -> torch.Tensor:
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), mb["targets"].reshape(-1))

    def overlap_pieces(self) -> list[Piece]:
        pieces = [Piece("embed", self._embed, list(self.embed.parameters()))] if self.embed is not None else []
        for layer in self.layers:
            pieces.append(Piece(f"layer{layer.layer_id}", lambda x, mb, layer=layer: layer(x, *self._rope(x.shape[1])),
                                [p for p in layer.parameters() if p.requires_grad], layer, self._rope))
        if self.head is not None:
            pieces.append(Piece("head", self._loss, list(self.norm.parameters()) + list(self.head.parameters())))
        return pieces

    def forward(self, x: Optional[torch.Tensor], mb: dict) -> torch.Tensor:
        for p in self.overlap_pieces():
            x = p.fn(x, mb)
        return x


def block_stages(model: nn.Module, num_stages: int) -> list[BlockStage]:
    """The model's layers split as evenly as possible, earlier stages taking the remainder."""
    n = len(model.layers)
    if num_stages > n:
        raise ValueError(f"{num_stages} stages need at least as many layers, the model has {n}")
    b = [sum(n // num_stages + (i < n % num_stages) for i in range(s)) for s in range(num_stages + 1)]
    return [BlockStage(model, b[s], b[s + 1], s == 0, s == num_stages - 1) for s in range(num_stages)]
