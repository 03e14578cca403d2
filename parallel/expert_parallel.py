"""Expert parallelism applied to a built model: each EP rank keeps only its placement's experts and
every MoE layer's ``dispatcher`` hook becomes the all-to-all of parallel/all_to_all.py.

    mesh = Mesh.from_config(cfg.parallel)
    traffic = apply_expert_parallel(model, mesh, cfg.parallel, fp8=cfg.fp8.enabled and cfg.fp8.dispatch,
                                    fp8_grad=cfg.fp8.enabled and cfg.fp8.grad_dispatch)
    ... loss.backward()
    sync_grads(model, mesh)                      # replicated: mean over DP; experts: over expert-DP
    norm = clip_grad_norm_ep(model, mesh, 1.0)   # global norm across the expert shards
    model.update_bias(global_expert_loads(model, mesh))

Gradient scale: each rank's loss is the mean over its own tokens and the global loss the mean over
the DP ranks, so replicated grads are averaged over DP; an expert's grad already sums the
contributions of every rank of its EP group (they arrive through the all-to-all), so it is summed
over its expert-data-parallel copies and divided by the same DP size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from dsv3.training import optim
from dsv3.model.experts import GroupedExperts
from dsv3.model.moe import MoE
from dsv3.model.param_init import tag_parameter
from parallel.all_to_all import EPDispatcher, TrafficCounters
from parallel.mesh import Mesh
from parallel.placement import Placement


def shard_experts(experts: GroupedExperts, logical_ids: list[int]) -> GroupedExperts:
    """A GroupedExperts holding copies of ``logical_ids``' weights, in that (local slot) order."""
    E, inter, dim = experts.w1.shape
    local = GroupedExperts(len(logical_ids), dim, inter)
    idx = torch.tensor(logical_ids, dtype=torch.long, device=experts.w1.device)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            src = getattr(experts, name)
            w = torch.nn.Parameter(src.index_select(0, idx).clone(), requires_grad=src.requires_grad)
            if getattr(src, "init_name", None) is not None:   # a meta shard materialises as these experts' slices
                tag_parameter(w, src.init_name, src.init_kind, src.init_std,
                              experts=[src.init_experts[i] for i in logical_ids])
            setattr(local, name, w)
    # keep the grouped-GEMM hooks (FP8: gate/up on one FP8 copy, the SwiGLU-input cache) and recompute
    local.gmm, local.gate_up, local.swiglu_down = experts.gmm, experts.gate_up, experts.swiglu_down
    local.swiglu = experts.swiglu   # and the SwiGLU hook (dsv3.model.fast), so an override carries over
    local.recompute = experts.recompute
    for p in local.parameters():
        p.expert_parallel = True
    return local


def apply_expert_parallel(model: torch.nn.Module, mesh: Mesh, pcfg=None, *, fp8: bool = False,
                          placement: Optional[Placement] = None, kind: Optional[str] = None,
                          fp8_grad: bool = False) -> TrafficCounters:
    """Shard every MoE layer's routed experts over the mesh's EP group and install the dispatcher
    (``pcfg.dispatcher``: flat | two_hop); ``fp8`` / ``fp8_grad``: dispatch / combine's backward in FP8.
    ``placement`` defaults to contiguous blocks of experts.
    A placement with redundant replicas (EPLB) routes correctly in forward, but the replicas' grads
    are not yet summed across the ranks holding them: use it for inference only.
    Returns the traffic counters shared by all layers (``traffic.per_token()`` for the step log)."""
    kind = kind or getattr(pcfg, "dispatcher", "two_hop")
    traffic = TrafficCounters()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        n_experts = moe.experts.n_experts
        layer_placement = placement or Placement.contiguous(n_experts, mesh.ep)
        if layer_placement.n_logical != n_experts:
            raise ValueError(f"placement has {layer_placement.n_logical} logical experts but the layer has {n_experts}")
        moe.experts = shard_experts(moe.experts, layer_placement.local_experts(mesh.ep_rank))
        moe.dispatcher = EPDispatcher(mesh, layer_placement, kind, fp8, traffic, chunks=getattr(pcfg, "a2a_chunks", 1),
                                      fp8_grad=fp8_grad)
    return traffic


def _expert_params(model):
    return [p for p in model.parameters() if getattr(p, "expert_parallel", False)]


def _replicated_params(model):
    return [p for p in model.parameters() if p.requires_grad and not getattr(p, "expert_parallel", False)]


def sync_grads(model: torch.nn.Module, mesh: Mesh) -> None:
    """All-reduce: replicated params mean over DP; expert shards summed over expert-DP, ÷ DP."""
    dp = mesh.dp
    for p in _replicated_params(model) + _expert_params(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dp > 1:
        for p in _replicated_params(model):
            dist.all_reduce(p.grad, group=mesh.group("dp"))
            p.grad.div_(dp)
        for p in _expert_params(model):
            if dp // mesh.ep > 1:
                dist.all_reduce(p.grad, group=mesh.group("edp"))
            p.grad.div_(dp)


def clip_grad_norm_ep(model: torch.nn.Module, mesh: Mesh, max_norm: float) -> float:
    """Global L2 norm of the full model's gradient (expert shards' squares summed over EP), clipped."""
    device = next(model.parameters()).device   # NCCL reduces device tensors only

    def sq(ps):
        return sum((p.grad.double().pow(2).sum() for p in ps if p.grad is not None),
                   torch.zeros((), dtype=torch.float64, device=device))
    total = sq(_replicated_params(model))
    expert = sq(_expert_params(model))
    if mesh.ep > 1:
        dist.all_reduce(expert, group=mesh.group("ep"))
    norm = float((total + expert).sqrt())
    coef = optim.clip_coefficient(norm, max_norm)
    if coef != 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def global_expert_loads(model, mesh: Mesh) -> list[torch.Tensor]:
    """Each MoE layer's tokens per expert summed over the DP ranks (for ``model.update_bias``)."""
    loads = model.expert_loads()
    if mesh.dp > 1:
        for load in loads:
            dist.all_reduce(load, group=mesh.group("dp"))
    return loads
