"""One function applies the parallelism to a built model (report §3.2: PP16 × EP64 × ZeRO-1 DP, no TP):
pipeline parallelism (any schedule of parallel/schedules.py) × data parallelism, expert parallelism
carved out of the data-parallel ranks of each stage, ZeRO-1 over "dp" (dense) and "edp" (experts).
With ``train.weights_dtype=bf16`` the parameters are BF16 (ZeRO-1 keeps FP32 main grads and master,
parallel/zero.py) and the pipeline's P2P activations and their gradients travel in BF16, the autocast dtype.

    mesh = Mesh.from_config(cfg.parallel)
    parallel_model = parallelize(model, mesh, cfg)
    stats = parallel_model.train_step(rows, lr=lr, mtp_weight=λ, gamma=None)   # rows: this replica's (n, T+1) tokens

The gradient of a step is the mean over the global batch: every micro-batch's loss (lm + λ·mtp, with
the balance loss's gradient injected by each MoE layer) is back-propagated unscaled and the reduced sum
divided by the global number of micro-batches. Expert loads are summed over the DualPipe copies, then
over the data-parallel ranks of the stage (every rank that routed tokens), before ``update_bias``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3.data.batch import check_layout, resolved
from dsv3.config import Config, ConfigError
from dsv3.training.runtime import choose_dtype, with_weights_dtype
from dsv3.model.transformer import Transformer
from dsv3.model.param_init import materialize_, materialize_own_buffers_
from parallel.dsv3_stages import (dsv3_microbatches, dsv3_stages, set_aux_loss_scale, set_mtp_weight,
                                  take_loss_parts, update_bias_pipelined, moe_by_name)
from parallel.expert_parallel import apply_expert_parallel
from parallel.mesh import Mesh
from parallel.overlap_pipeline import OverlapPipeline
from parallel.pipeline import Pipeline
from parallel.schedules import get_schedule, layout
from parallel.zero import Zero1


class LossSums(NamedTuple):
    """A step's losses, each summed over the micro-batches (then over the replicas and divided by their
    count: the global means); ``weighted`` = lm + λ·mtp, what each micro-batch back-propagates beside
    the balance loss."""
    weighted: torch.Tensor
    lm: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor


_AT = LossSums(*range(4))   # each loss's position in the step's one fp64 device vector (one all-reduce)


def _ready_after(pipe: Pipeline) -> dict[str, Optional[int]]:
    """Per parameter: how many hook-visible gradient accumulations it receives in a step, when its
    last gradient comes from a full backward (B, or the B of an FB); None when a deferred weight grad
    (W, which assigns ``.grad`` without the hook) may come last — then its bucket waits for the step."""
    lay = pipe.layout
    names_of = {}
    by_id = {id(p): n for n, p in pipe.params.items()}
    for s, mod in pipe.stage_module.items():
        names_of[s] = [by_id[id(p)] for p in mod.parameters()]
    count: dict[str, int] = {}
    last_is_w: dict[str, bool] = {}
    for op in pipe.ops:
        for part in op.parts():
            if part.kind in ("B", "W"):
                for n in names_of[lay.model_stage[part.stage]]:
                    count[n] = count.get(n, 0) + (part.kind == "B")
                    last_is_w[n] = part.kind == "W"
    return {n: (None if last_is_w.get(n, True) else count[n]) for n in pipe.params}


class ParallelModel:
    def __init__(self, model: Transformer, mesh: Mesh, cfg: Config, device: Optional[torch.device] = None):
        """``model`` may be built on the meta device (``device`` then says where this rank's part goes):
        only what this rank holds — its pipeline stages, its experts — is materialised, with the values
        the whole model gets (``dsv3.model.param_init``)."""
        cfg = resolved(cfg, mesh.dp, cfg.parallel.pp, cfg.parallel.pp_schedule)   # train.micro_batch_size=auto
        device = torch.device(device) if device is not None else next(model.parameters()).device
        cfg = with_weights_dtype(cfg, device)   # train.weights_dtype=auto: BF16 on CUDA under BF16 autocast
        bf16_weights = cfg.train.weights_dtype == "bf16"
        if bf16_weights and choose_dtype(cfg.train.dtype, device)[0] != "bf16":
            raise ConfigError("train.weights_dtype=bf16 needs BF16 autocast: set train.dtype=bf16 "
                              f"(train.dtype={cfg.train.dtype} runs FP32 here)")
        pc = cfg.parallel
        self.model, self.mesh, self.cfg = model, mesh, cfg
        self.dp, self.dp_index = mesh.dp, dist.get_rank(mesh.group("dp")) if mesh.dp > 1 else 0
        self.moe_names = [n.rsplit(".", 1)[0] for n, _ in model.named_buffers() if n.endswith("tokens_per_expert")]
        self.traffic = None
        if pc.ep > 1:
            self.traffic = apply_expert_parallel(model, mesh, pc, fp8=cfg.fp8.enabled and cfg.fp8.dispatch,
                                                 fp8_grad=cfg.fp8.enabled and cfg.fp8.grad_dispatch)
        on_meta = any(p.is_meta for p in model.parameters())
        expert_names = {n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)}
        self.pipe: Optional[Pipeline] = None
        if pc.pp > 1:
            dispatchers = {}
            for n, moe in zip(self.moe_names, (m for m in model.moe_layers())):
                dispatchers[n], moe.dispatcher = moe.dispatcher, None   # process groups do not deep-copy
            self.num_chunks = check_layout(cfg.train, mesh.dp, pc.pp, pc.pp_schedule)   # of the full global batch
            T, D = cfg.data.seq_len, cfg.model.dim
            lay = layout(pc.pp_schedule, pc.pp)
            if on_meta:
                materialize_own_buffers_(model, device)   # RoPE tables: shared by every stage
            stages = dsv3_stages(model, lay.num_model_stages)
            held = nn.ModuleList([stages[s] for s in lay.model_stages_of(dist.get_rank(mesh.group("pp")))])
            materialize_(held, device, model.init_seed)   # only this rank's stages (no-op for a real model)
            # DualPipe(V) pairs a forward and a backward chunk in its FB ops: with expert parallelism, run
            # them interleaved so each chunk's all-to-alls hide under the other's compute (report §3.2.1)
            overlapped = pc.overlap and pc.ep > 1 and get_schedule(pc.pp_schedule).overlaps_f_and_b
            executor = OverlapPipeline if overlapped else Pipeline
            self.pipe = executor(model, stages, pc.pp_schedule, self.num_chunks,
                                 act_shape=(cfg.train.micro_batch_size, T, D),
                                 act_dtype=torch.bfloat16 if bf16_weights else next(held.parameters()).dtype,
                                 group=mesh.group("pp"),
                                 recv_timeout=pc.timeout_s)
            if on_meta:   # the pipeline runs its own copies: free the materialised originals
                model.to(torch.device("meta"))
            for n, moe in moe_by_name(self.pipe).items():
                moe.dispatcher = dispatchers[n]
            set_aux_loss_scale(self.pipe, 1.0)
            self.params = dict(self.pipe.params)
            copies = {n: self.pipe.copies_of(n) for n in self.params}
            ready = _ready_after(self.pipe)
        else:
            materialize_(model, device, model.init_seed)   # the whole (expert-sharded) model
            model.set_aux_loss_scale(1.0)
            self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            copies = {n: (None, 1) for n in self.params}
            ready = {n: check_layout(cfg.train, mesh.dp) for n in self.params}   # set per step in train_step
        self.expert_names = expert_names
        groups = {"dense": _shard_group(mesh, "dp")}
        groups["expert"] = _shard_group(mesh, "edp") if pc.ep > 1 else groups["dense"]
        self.zero = Zero1(self.params, groups, cfg.train, expert_names=expert_names if pc.ep > 1 else set(),
                          ready_after=ready, copies=copies)

    # ------------------------------------------------------------------------------ a step
    def train_step(self, rows: torch.Tensor, lr: float, mtp_weight: float, gamma: Optional[float] = None,
                   autocast=None, may_step=None, on_micro=None) -> dict:
        """rows: this DP replica's sequences for the step (n, T+1), the same on every rank of its pipeline.
        Returns the global mean loss and its parts, the grad norm, the summed loads per MoE name and
        ``skipped``. ``may_step(loss, grad_norm)`` (default: both finite) decides whether the optimizer
        step and the bias update run; it sees the all-reduced loss and the global norm, so every rank
        decides the same."""
        from contextlib import nullcontext
        autocast = autocast or nullcontext
        may_step = may_step or (lambda loss, norm: math.isfinite(loss) and math.isfinite(norm))
        device = next(iter(self.params.values())).device
        sums = torch.zeros(len(LossSums._fields), dtype=torch.float64, device=device)   # laid out as LossSums
        if self.pipe is not None:
            C = rows.shape[0] // self.cfg.train.micro_batch_size
            if C != self.pipe.num_chunks:   # the batch ramp: this step's schedule has another chunk count
                self._set_chunks(C)
            set_mtp_weight(self.pipe, mtp_weight)
            with autocast():
                losses = self.pipe.step(dsv3_microbatches(rows, C))
            done = [l.detach().double() for l in losses if l is not None]   # device tensors: no sync per micro-batch
            if done:
                sums[_AT.weighted] = torch.stack(done).sum()
            parts = take_loss_parts(self.pipe)
            for i, k in ((_AT.lm, "lm_loss"), (_AT.mtp, "mtp_loss"), (_AT.balance, "balance_loss")):
                sums[i] = parts[k]
        else:
            C = rows.shape[0] // self.cfg.train.micro_batch_size
            self.model.mtp_weight = mtp_weight
            for e in self.zero.entries.values():
                e.ready_after = C
            for mb in dsv3_microbatches(rows, C):
                with autocast():
                    out = self.model(mb["tokens"], labels=mb["labels"])
                out.loss.backward()
                if on_micro is not None:   # the balance monitor's per-layer loss (one replica's micro-batches)
                    on_micro(C)
                sums += torch.stack(LossSums(weighted=out.lm_loss + mtp_weight * out.mtp_loss, lm=out.lm_loss,
                                             mtp=out.mtp_loss, balance=out.balance_loss.detach())
                                    ).double()   # on the device: read once a step
        divisor = C * self.dp
        dist.all_reduce(sums)
        sums /= divisor
        mean = LossSums(*sums.unbind())
        loss = float(mean.weighted + mean.balance)
        grad_norm = self.zero.step(lr, divisor, may_step=lambda norm: may_step(loss, norm))
        stepped = self.zero.stepped
        loads = self._update_bias(gamma if stepped else 0.0)
        return dict(loss=loss, lm_loss=float(mean.lm), mtp_loss=float(mean.mtp),
                    balance_loss=float(mean.balance), grad_norm=grad_norm, loads=loads, skipped=not stepped)

    def _set_chunks(self, C: int) -> None:
        """Rebuild this rank's schedule for C micro-batches, and when each parameter's gradient is
        complete (ZeRO-1 launches a bucket's reduce-scatter then)."""
        self.pipe.set_num_chunks(C)
        for n, count in _ready_after(self.pipe).items():
            self.zero.entries[n].ready_after = count

    def _sum_over_dp(self, loads: list[torch.Tensor]) -> None:
        if self.dp > 1:
            flat = torch.cat(loads)
            dist.all_reduce(flat, group=self.mesh.group("dp"))
            for t, piece in zip(loads, flat.split([t.numel() for t in loads])):
                t.copy_(piece)

    def _update_bias(self, gamma: Optional[float]) -> dict[str, torch.Tensor]:
        if self.pipe is not None:
            return update_bias_pipelined(self.pipe, self._sum_over_dp, gamma)
        loads = self.model.expert_loads()
        self._sum_over_dp(loads)
        self.model.update_bias(loads, gamma)
        return dict(zip(self.moe_names, loads))

    def all_layer_loads(self, loads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every MoE layer's summed load in ``model.moe_layers()`` order, on every rank (pipeline stages
        hold different layers; DualPipe copies hold the same, counted once)."""
        E = self.cfg.model.moe.n_routed_experts
        device = next(iter(self.params.values())).device   # NCCL reduces device tensors only
        out = torch.zeros(len(self.moe_names), E + 1, dtype=torch.float64, device=device)
        for i, n in enumerate(self.moe_names):
            if n in loads:
                out[i, :E], out[i, E] = loads[n].double().to(device), 1.0
        dist.all_reduce(out)
        out = out.cpu()
        return [(row[:E] / row[E]).float() for row in out]


def _shard_group(mesh: Mesh, kind: str) -> tuple[object, int, int]:
    """ZeRO's own copy of a mesh group (so its asynchronous collectives never interleave with the
    expert all-to-all on the same group). Every rank creates every such group, in the same order."""
    mine = None
    for ranks in mesh.all_groups()[kind]:
        g = mesh.new_group(ranks) if len(ranks) > 1 else None
        if dist.get_rank() in ranks:
            mine = (g, len(ranks), ranks.index(dist.get_rank()))
    return mine


def parallelize(model: Transformer, mesh: Mesh, cfg: Config, device: Optional[torch.device] = None) -> ParallelModel:
    """PP × DP (EP inside DP) × ZeRO-1 on a built model; the model object is modified in place (its
    experts sharded when ``parallel.ep > 1``) and, with PP, its stages copied into the pipeline."""
    return ParallelModel(model, mesh, cfg, device)
