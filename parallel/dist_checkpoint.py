"""Sharded checkpoints with torch.distributed.checkpoint (DCP), independent of the parallel layout.

Every parameter is stored under its single-process ``state_dict`` name as a flat global tensor of the
whole (unsharded) parameter: ``{name}`` FP32 master weights, ``{name}.exp_avg`` / ``{name}.exp_avg_sq``
AdamW moments. Each rank writes the slice its ZeRO-1 shard covers (expert parameters offset by the
rank's block of experts), and of DualPipe's two copies of a stage only the lower pipeline rank writes.
Routing biases (``...e_score_correction_bias``), the AdamW step, token count and the global sampler
position are written once. DCP reads any slice back, so a run resumes on another layout
(``load_sharded``) or on one process (``load_sharded_into_model``). Written to ``ckpt_NNNNNNN.tmp`` and
renamed, so a crash leaves the previous checkpoint complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

from dsv3.errors import CheckpointError
from dsv3.model import Transformer

_NAME = re.compile(r"^ckpt_(\d{7})$")
_MOMENTS = ("exp_avg", "exp_avg_sq")


def latest_sharded(run_dir: str) -> Optional[str]:
    if not os.path.isdir(run_dir):
        return None
    steps = sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(run_dir)) if m
                   and os.path.exists(os.path.join(run_dir, m.group(0), ".metadata")))
    return os.path.join(run_dir, f"ckpt_{steps[-1]:07d}") if steps else None


def _global_numel(pm) -> dict[str, int]:
    with torch.device("meta"):
        full = Transformer(pm.cfg.model)
    return {n: p.numel() for n, p in full.named_parameters() if p.requires_grad}


def _slices(pm) -> dict[str, tuple[int, object]]:
    """name → (offset in the global flat tensor, ZeRO entry) for the slices this rank writes/reads."""
    out = {}
    ep_rank = pm.mesh.ep_rank if pm.cfg.parallel.ep > 1 else 0
    for n, e in pm.zero.entries.items():
        if pm.pipe is not None and pm.pipe.rank != min(pm.pipe.holders[n]):
            continue  # the other copy of a mirrored stage writes it
        valid = min(e.chunk, e.param.numel() - e.index * e.chunk)
        if valid <= 0:
            continue
        base = ep_rank * e.param.numel() if n in pm.expert_names else 0
        out[n] = (base + e.index * e.chunk, e, valid)
    return out


def _state(pm, numel: dict[str, int], fill: bool) -> dict:
    """The DCP state dict of this rank: a ShardedTensor per global name (collective, every rank
    iterates all names in the same order), the biases and the scalars."""
    rank = dist.get_rank()
    mine = _slices(pm)
    sd: dict = {}
    for n in sorted(numel):
        for suffix in ("",) + tuple("." + m for m in _MOMENTS):
            shards = []
            if n in mine:
                off, e, valid = mine[n]
                if suffix:
                    st = pm.zero.optimizer.state.get(e.master)
                    dtype = pm.zero.optimizer._moment_dtype(e.master)
                    src = st[suffix[1:]][:valid] if st else torch.zeros(valid, dtype=dtype)
                else:
                    src = e.master.detach()[:valid]
                t = src.clone() if fill else torch.empty_like(src)
                shards = [Shard(t, ShardMetadata([off], [valid], f"rank:{rank}/cpu"))]
            sd[n + suffix] = init_from_local_shards(shards, numel[n])
    for name, moe in _moes(pm).items():
        sd[f"{name}.gate.e_score_correction_bias"] = moe.gate.e_score_correction_bias.clone().float()
    return sd


def _moes(pm) -> dict:
    from parallel.dsv3_stages import moe_by_name
    return moe_by_name(pm.pipe) if pm.pipe is not None else dict(zip(pm.moe_names, pm.model.moe_layers()))


def _opt_step(pm) -> int:
    return max((int(st["step"]) for st in pm.zero.optimizer.state.values()), default=0)


def save_sharded(run_dir: str, step: int, pm, extra: dict) -> str:
    """Collective. ``extra``: tokens and the sampler state (rank 0's is the global position)."""
    final = os.path.join(run_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    sd = _state(pm, _global_numel(pm), fill=True)
    sd["meta"] = json.dumps(dict(step=step, opt_step=_opt_step(pm), **extra))
    dcp.save(sd, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_sharded(path: str, pm) -> dict:
    """Collective: fills this rank's ZeRO shards, moments, parameters and biases from any layout's
    checkpoint. Returns the meta dict (step, tokens, sampler)."""
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path} is not a complete sharded checkpoint")
    sd = _state(pm, _global_numel(pm), fill=False)
    sd["meta"] = ""
    dcp.load(sd, checkpoint_id=path)
    meta = json.loads(sd["meta"])
    mine = _slices(pm)
    step_t = torch.tensor(float(meta["opt_step"]))
    with torch.no_grad():
        for n, e in pm.zero.entries.items():
            vals = {}
            for suffix in ("",) + tuple("." + m for m in _MOMENTS):
                full = torch.zeros(e.chunk, dtype=e.master.dtype)
                if n in mine:
                    local = sd[n + suffix].local_shards()[0].tensor
                    full[:mine[n][2]] = local.to(full.dtype)
                vals[suffix] = full
            if e.copies[0] is not None:  # only one copy of a mirrored stage read it: share by summing
                flat = torch.cat(list(vals.values()))
                dist.all_reduce(flat, group=e.copies[0])
                vals = dict(zip(vals, flat.split(e.chunk)))
            e.master.copy_(vals[""])
            if meta["opt_step"] > 0:
                pm.zero.optimizer.state[e.master] = dict(
                    step=step_t.clone(), **{m: vals["." + m].to(pm.zero.optimizer._moment_dtype(e.master)) for m in _MOMENTS})
        for name, moe in _moes(pm).items():
            b = moe.gate.e_score_correction_bias
            b.copy_(sd[f"{name}.gate.e_score_correction_bias"].to(b.dtype))
    pm.zero._all_gather()
    return meta


def load_sharded_into_model(path: str, model: Transformer, optimizer) -> dict:
    """One process: the whole model, its ``dsv3.optim.AdamW`` state and biases from a sharded checkpoint."""
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sd: dict = {}
    for n, p in names.items():   # the dtypes the parallel run saved: masters ≥ FP32, moments as AdamW keeps them
        sd[n] = torch.empty(p.numel(), dtype=torch.promote_types(p.dtype, torch.float32))
        for m in _MOMENTS:
            sd[f"{n}.{m}"] = torch.empty(p.numel(), dtype=optimizer._moment_dtype(p))
    biases = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    for n, b in biases.items():
        sd[n] = torch.empty(b.shape, dtype=torch.float32)
    sd["meta"] = ""
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    meta = json.loads(sd["meta"])
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(sd[n].view_as(p))
            if meta["opt_step"] > 0:
                optimizer.state[p] = dict(step=torch.tensor(float(meta["opt_step"])),
                                          **{m: sd[f"{n}.{m}"].view_as(p).to(optimizer._moment_dtype(p)) for m in _MOMENTS})
        for n, b in biases.items():
            b.copy_(sd[n])
    return meta


def export_hf(path: str, model: Transformer, out_dir: str) -> None:
    """A sharded checkpoint → the Hugging Face layout (one process; ``model`` gives the architecture)."""
    from dsv3.config import TrainConfig
    from dsv3.hf import save_hf_checkpoint
    from dsv3.optim import build_optimizer
    load_sharded_into_model(path, model, build_optimizer(model, TrainConfig()))
    save_hf_checkpoint(model, out_dir)
