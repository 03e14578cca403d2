"""ZeRO-1 (Rajbhandari et al. 2020, stage 1; report §3.2 "ZeRO-1 data parallelism"): each rank keeps the
FP32 master weights and AdamW moments of 1/W of every parameter of its shard group — dense parameters
over the data-parallel group "dp", routed experts over the expert-data-parallel group "edp".

    zero = Zero1(named_params, groups, train_cfg, ready_after=counts, copies=copies)
    ... backward passes (each parameter's post-accumulate-grad hook may launch its bucket) ...
    norm = zero.step(lr, grad_divisor)     # reduce-scatter the rest, clip, AdamW on the shards, all-gather

Sharding is per parameter: parameter p is flattened, padded to W·c and rank i of its group owns
elements [i·c, (i+1)·c). A bucket's reduce-scatter input is laid out rank-major (chunk i of every
parameter of the bucket, then chunk i+1 ...), so one collective hands every rank exactly its chunks,
and a parameter's shard is the same slice on every rank holding a copy of it (DualPipe's mirrored
stages, the tied embedding of 1F1B) — those copies' shards are summed over the copy group. Buckets are
launched asynchronously, strictly in bucket order (so every rank issues the same collective sequence),
as soon as every parameter of the bucket has received its last gradient of the step: the hook counts
gradient accumulations against ``ready_after[name]`` (None: only at ``step``).
The update is ``dsv3.training.optim.AdamW`` itself, run on the shards: the same elementwise math as one process.

``train.weights_dtype="bf16"`` (report §3.3 mixed precision; Megatron's main_grad): the master shards are
taken from the FP32 values, then the parameters become BF16 and each gets an FP32 ``main_grad`` buffer;
the hook adds every BF16 ``.grad`` into it (the micro-batch sum in FP32) and frees ``.grad``. The FP32
main grads are reduce-scattered and the all-gather sends the master rounded to BF16 (half the bytes,
the same values as rounding after the gather). A deferred weight gradient (W) is added straight into
``main_grad`` by ``parallel.weight_grad`` (one left in ``.grad`` is added in when its bucket launches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config import TrainConfig
from dsv3.training import optim
from dsv3.training.optim import AdamW


@dataclass
class ParamShard:
    """One parameter's ZeRO-1 shard on this rank (``Zero1.entries[name]``; sharded checkpoints read them)."""
    name: str
    param: nn.Parameter
    world: int
    index: int                     # this rank's position in the shard group
    chunk: int                     # elements per rank (padded)
    master: nn.Parameter           # this rank's FP32 shard (the optimizer's parameter)
    ready_after: Optional[int]
    copies: tuple                  # (process group or None, number of holders)
    fired: int = 0


@dataclass
class _Bucket:
    group: object
    world: int
    entries: list
    work: object = None
    out: Optional[torch.Tensor] = None
    inputs: list = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(e.ready_after is not None and e.fired >= e.ready_after for e in self.entries)


def _chunk_of(flat: torch.Tensor, i: int, c: int) -> torch.Tensor:
    piece = flat[i * c:(i + 1) * c]
    return piece if piece.numel() == c else torch.cat([piece, piece.new_zeros(c - piece.numel())])


class Zero1:
    def __init__(self, named_params: dict[str, nn.Parameter], groups: dict[str, tuple[object, int, int]],
                 cfg: TrainConfig, *, expert_names: set[str], ready_after: dict[str, Optional[int]],
                 copies: dict[str, tuple], bucket_numel: int = 1 << 20):
        """groups: "dense"/"expert" → (process group, its size, this rank's index); copies: name →
        (group of the ranks holding a copy, their count), (None, 1) when this rank's copy is the only one."""
        self.entries: dict[str, ParamShard] = {}
        self.main_grads = cfg.weights_dtype == "bf16"
        self.buckets: list[_Bucket] = []
        for kind in ("dense", "expert"):
            pg, world, index = groups[kind]
            names = [n for n in named_params if (n in expert_names) == (kind == "expert")]
            bucket: list[ParamShard] = []
            for n in reversed(names):  # roughly the order in which backward produces gradients
                p = named_params[n]
                c = math.ceil(p.numel() / world)
                with torch.no_grad():
                    shard = _chunk_of(p.detach().reshape(-1), index, c).to(torch.promote_types(p.dtype, torch.float32))
                e = ParamShard(n, p, world, index, c, nn.Parameter(shard.clone()), ready_after.get(n), copies[n])
                if self.main_grads:
                    p.data = p.data.to(torch.bfloat16)
                    p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                self.entries[n] = e
                bucket.append(e)
                if sum(x.chunk for x in bucket) * world >= bucket_numel:
                    self.buckets.append(_Bucket(pg, world, bucket))
                    bucket = []
            if bucket:
                self.buckets.append(_Bucket(pg, world, bucket))
        self._bucket_of = {id(e): b for b in self.buckets for e in b.entries}
        self._next = 0      # the next bucket to launch: launches go strictly in order
        decay = [e.master for e in self.entries.values() if e.param.ndim >= 2]
        no_decay = [e.master for e in self.entries.values() if e.param.ndim < 2]
        self.optimizer = AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                               lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               moment_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32)
        self.max_norm = cfg.grad_clip
        self.launched_in_backward = 0   # buckets whose reduce-scatter started from a hook (overlap)
        self.stepped = True             # the last step() updated the weights (the divergence guard may veto)
        for e in self.entries.values():
            e.param.register_post_accumulate_grad_hook(lambda p, e=e: self._on_grad(e))

    # --------------------------------------------------------------------------- reduce-scatter
    def _on_grad(self, e: ParamShard) -> None:
        if self.main_grads:
            e.param.main_grad.add_(e.param.grad)   # FP32 += BF16: the only rounding is the FP32 sum's
            e.param.grad = None
        e.fired += 1
        if self._bucket_of[id(e)].ready:
            while self._next < len(self.buckets) and self.buckets[self._next].ready:
                self._launch(self.buckets[self._next])
                self.launched_in_backward += 1

    def _launch(self, b: _Bucket) -> None:
        flats = [self._grad(e).reshape(-1) for e in b.entries]
        b.inputs = [torch.cat([_chunk_of(f, i, e.chunk) for f, e in zip(flats, b.entries)]) for i in range(b.world)]
        b.out = torch.empty_like(b.inputs[0])
        if b.world == 1:
            b.out.copy_(b.inputs[0])
        else:
            b.work = dist.reduce_scatter(b.out, b.inputs, group=b.group, async_op=True)
        self._next += 1

    def _grad(self, e: ParamShard) -> torch.Tensor:
        if not self.main_grads:
            return e.param.grad if e.param.grad is not None else torch.zeros_like(e.param)
        if e.param.grad is not None:   # a deferred weight gradient (W) assigned without the hook
            e.param.main_grad.add_(e.param.grad)
            e.param.grad = None
        return e.param.main_grad

    def _clear(self) -> None:
        for e in self.entries.values():
            e.param.grad, e.master.grad, e.fired = None, None, 0
            if self.main_grads:
                e.param.main_grad.zero_()
        self._next = 0

    # ------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, lr: float, grad_divisor: float, may_step=None) -> float:
        """Finishes the reduce-scatters, sums mirrored copies, divides by ``grad_divisor`` (the global
        number of micro-batches), clips to the global norm, runs AdamW on the shards and all-gathers the
        parameters. Returns the norm before clipping. ``may_step(norm)`` (default: the norm is finite)
        can veto the update — the divergence guard; then the gradients are dropped and ``stepped`` is False."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            off = 0
            for e in b.entries:
                e.master.grad = b.out[off:off + e.chunk].to(e.master.dtype).div_(grad_divisor)
                off += e.chunk
            b.work, b.inputs, b.out = None, [], None
        self._sum_copies()
        sq = torch.zeros((), dtype=torch.float64, device=next(iter(self.entries.values())).master.device)
        for e in self.entries.values():
            sq += e.master.grad.double().square().sum() / e.copies[1]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        norm = float(sq.sqrt())
        self.stepped = (may_step or math.isfinite)(norm)
        if not self.stepped:
            self._clear()
            return norm
        coef = optim.clip_coefficient(norm, self.max_norm)
        if coef != 1.0:
            for e in self.entries.values():
                e.master.grad.mul_(coef)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.all_gather_params()
        self._clear()
        return norm

    def _sum_copies(self) -> None:
        by_group: dict = {}
        for n in sorted(self.entries):
            e = self.entries[n]
            if e.copies[0] is not None:
                by_group.setdefault(id(e.copies[0]), (e.copies[0], []))[1].append(e)
        for _, (pg, es) in sorted(by_group.items(), key=lambda kv: kv[1][1][0].name):
            flat = torch.cat([e.master.grad for e in es])
            dist.all_reduce(flat, group=pg)
            for e, piece in zip(es, flat.split([e.chunk for e in es])):
                e.master.grad.copy_(piece)

    def all_gather_params(self) -> None:
        """Every rank's parameters from the masters' shards (after a step, or after masters were loaded)."""
        pending = []
        for b in self.buckets:
            mine = torch.cat([e.master.detach() for e in b.entries])
            if self.main_grads:
                mine = mine.to(torch.bfloat16)   # round to nearest once; the gather moves half the bytes
            parts = [torch.empty_like(mine) for _ in range(b.world)]
            work = dist.all_gather(parts, mine, group=b.group, async_op=True) if b.world > 1 else None
            if work is None:
                parts[0].copy_(mine)
            pending.append((b, parts, work))
        for b, parts, work in pending:
            if work is not None:
                work.wait()
            split = [p.split([e.chunk for e in b.entries]) for p in parts]
            for j, e in enumerate(b.entries):
                full = torch.cat([split[i][j] for i in range(b.world)])[:e.param.numel()]
                e.param.data.copy_(full.view_as(e.param))

    # ---------------------------------------------------------------------------- state
    def shard_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name: this rank's master shard and moments (for sharded checkpoints)."""
        out = {}
        for n, e in self.entries.items():
            st = self.optimizer.state.get(e.master, {})
            out[n] = dict(master=e.master.detach(), **{k: v for k, v in st.items() if k != "step"})
            if "step" in st:
                out[n]["step"] = st["step"]
        return out
