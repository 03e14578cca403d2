"""Sharded checkpoints with torch.distributed.checkpoint (DCP), independent of the parallel layout.

Every parameter is stored under its single-process ``state_dict`` name as a flat global tensor of the
whole (unsharded) parameter: ``{name}`` FP32 master weights, ``{name}.exp_avg`` / ``{name}.exp_avg_sq``
AdamW moments. Each rank writes the slice its ZeRO-1 shard covers (expert parameters offset by the
rank's block of experts), and of DualPipe's two copies of a stage only the lower pipeline rank writes.
Routing biases (``...e_score_correction_bias``) are written once; the AdamW step, token count and the
global sampler position go to ``meta.json``, each rank's RNG state (CPU and, on CUDA, every device's:
``dsv3.checkpoint.rng_state``) to ``rng_RRRRR.pt``, restored when a run resumes on as many ranks. DCP reads any
slice back, so a run resumes on another layout (``load_sharded``) or on one process
(``dsv3.checkpoint.sharded.load_sharded_into_model``, or ``dsv3.checkpoint.store.load_any_checkpoint``);
``load_sharded`` also starts a multi-rank run from a one-process checkpoint.

Safety: written to ``ckpt_NNNNNNN.tmp``; after every rank's data is on disk each rank hashes a share
of the files, rank 0 writes ``manifest.json`` (bytes + sha256 of every file) last and renames the
folder, so a checkpoint is complete exactly when its manifest is there. Loading checks the manifest
before reading anything (ranks split the data files; ``.metadata`` and ``meta.json`` are hashed from
the very bytes then parsed), and DCP's pickled ``.metadata`` is read through the allow-list of
``dsv3/checkpoint/dcp_safe.py``, never plain pickle. Every failure (disk full on one rank, a non-finite shard,
a corrupted file) is agreed across ranks, so all raise the same one-line CheckpointError, none hangs,
and the temp folder is removed.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

from dsv3.checkpoint import rng_state
from dsv3.checkpoint.dcp_safe import CheckpointWriter
from dsv3.checkpoint.manifest import MANIFEST, STATE, file_entry, fsync_path, write_json
from dsv3.checkpoint.sharded import (FORMAT, FORMAT_VERSION, META, MOMENTS, dcp_load, load_sharded_into_model, read_rank,
                                     unwrap_dcp_error, verify_sharded)
from dsv3.checkpoint.store import (NonFiniteCheckpointError, check_tensors, first_non_finite, free_bytes, is_disk_full,
                                   is_write_failure, read_checkpoint_files, rename_into_place, write_error)
from dsv3.errors import CheckpointError
from dsv3.training.faults import fault_point, first_line
from dsv3.model.transformer import Transformer

_NAME = re.compile(r"^ckpt_(\d{7})$")


def latest_sharded(run_dir: str) -> Optional[str]:
    """The newest complete sharded checkpoint (its manifest written), or None."""
    if not os.path.isdir(run_dir):
        return None
    steps = sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(run_dir)) if m
                   and os.path.isfile(os.path.join(run_dir, m.group(0), MANIFEST)))
    return os.path.join(run_dir, f"ckpt_{steps[-1]:07d}") if steps else None


def _global_numel(parallel_model) -> dict[str, int]:
    with torch.device("meta"):
        full = Transformer(parallel_model.cfg.model)
    return {n: p.numel() for n, p in full.named_parameters() if p.requires_grad}


def _slices(parallel_model) -> dict[str, tuple[int, object]]:
    """name → (offset in the global flat tensor, ZeRO entry) for the slices this rank writes/reads."""
    out = {}
    ep_rank = parallel_model.mesh.ep_rank if parallel_model.cfg.parallel.ep > 1 else 0
    for n, e in parallel_model.zero.entries.items():
        if parallel_model.pipe is not None and parallel_model.pipe.rank != parallel_model.pipe.holders_of(n)[0]:
            continue  # the other copy of a mirrored stage writes it
        valid = min(e.chunk, e.param.numel() - e.index * e.chunk)
        if valid <= 0:
            continue
        base = ep_rank * e.param.numel() if n in parallel_model.expert_names else 0
        out[n] = (base + e.index * e.chunk, e, valid)
    return out


def _state(parallel_model, numel: dict[str, int], fill: bool) -> dict:
    """The DCP state dict of this rank: a ShardedTensor per global name (collective, every rank
    iterates all names in the same order), the biases and the scalars."""
    rank = dist.get_rank()
    mine = _slices(parallel_model)
    sd: dict = {}
    for n in sorted(numel):
        for suffix in ("",) + tuple("." + m for m in MOMENTS):
            shards = []
            if n in mine:
                off, e, valid = mine[n]
                if suffix:
                    st = parallel_model.zero.optimizer.state.get(e.master)
                    dtype = parallel_model.zero.optimizer.moment_dtype_of(e.master)
                    src = st[suffix[1:]][:valid] if st else torch.zeros(valid, dtype=dtype, device=e.master.device)
                else:
                    src = e.master.detach()[:valid]
                t = src.clone() if fill else torch.empty_like(src)
                shards = [Shard(t, ShardMetadata([off], [valid], f"rank:{rank}/{t.device}"))]   # the shard's own device
            sd[n + suffix] = init_from_local_shards(shards, numel[n])
    for name, moe in _moes(parallel_model).items():
        sd[f"{name}.gate.e_score_correction_bias"] = moe.gate.e_score_correction_bias.clone().float()
    return sd


def _moes(parallel_model) -> dict:
    from parallel.dsv3_stages import moe_by_name
    if parallel_model.pipe is not None:
        return moe_by_name(parallel_model.pipe)
    return dict(zip(parallel_model.moe_names, parallel_model.model.moe_layers()))


def _opt_step(parallel_model) -> int:
    return max((int(st["step"]) for st in parallel_model.zero.optimizer.state.values()), default=0)


def _failure(e: BaseException, run_dir: str) -> tuple[str, str, Optional[int]]:
    """(kind, one-line detail, free bytes) of this rank's failed write; kind: disk (full), io, bug."""
    inner, who = unwrap_dcp_error(e)
    free = free_bytes(run_dir)
    kind = "disk" if is_disk_full(inner, free) else "io" if is_write_failure(inner) else "bug"
    return kind, f"{who or f'rank {dist.get_rank()}: '}{first_line(inner)}", free


def _gathered(mine) -> list:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _agree(mine):
    """Collective: each rank's failure (None if it succeeded) → the lowest failing rank's, on every rank."""
    return next((f for f in _gathered(mine) if f is not None), None)


def _local_tensors(sd: dict):
    for name, v in sd.items():
        if hasattr(v, "local_shards"):   # a ShardedTensor (torch.is_tensor says yes to it too)
            for shard in v.local_shards():
                yield name, shard.tensor
        else:
            yield name, v


def save_sharded(run_dir: str, step: int, parallel_model, extra: dict) -> str:
    """Collective. ``extra``: tokens and the sampler state (rank 0's is the global position).
    Every rank raises the same NonFiniteCheckpointError (a shard holds NaN/Inf: nothing written) or
    CheckpointError (a rank's write failed, e.g. disk full: temp folder removed, previous checkpoint
    untouched)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = os.path.join(run_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    previous = latest_sharded(run_dir)
    sd = _state(parallel_model, _global_numel(parallel_model), fill=True)
    bad = first_non_finite(_local_tensors(sd))
    bad = _agree(None if bad is None else f"rank {rank}'s shard of {bad}")
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to write checkpoint {final}: {bad} holds NaN/Inf (the run "
                                       f"diverged; lower train.lr or resume from an earlier checkpoint)")
    meta = dict(step=step, opt_step=_opt_step(parallel_model), **extra)
    failure, error, done = None, None, False
    try:
        for phase in ("prepare", "write", "hash", "commit"):
            entries: dict = {}
            try:
                if phase == "prepare" and rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                    os.makedirs(tmp)
                elif phase == "write":
                    dcp.save(sd, storage_writer=CheckpointWriter(tmp, step))
                    torch.save(rng_state.capture(), os.path.join(tmp, f"rng_{rank:05d}.pt"))   # tensors only
                elif phase == "hash":   # each rank a share of the files (the ones it wrote are in its page cache)
                    names = sorted(os.listdir(tmp))
                    entries = {n: file_entry(os.path.join(tmp, n)) for n in names[rank::world]}
                elif phase == "commit" and rank == 0:
                    files = {n: e for part in shares for n, e in part.items()}
                    write_json(os.path.join(tmp, META), meta)
                    files[META] = file_entry(os.path.join(tmp, META))
                    write_json(os.path.join(tmp, MANIFEST), dict(format=FORMAT, format_version=FORMAT_VERSION,
                                                                 step=step, world=world, files=files))
                    fsync_path(tmp)
                    fault_point("ckpt", step)
                    rename_into_place(tmp, final)
                    fsync_path(run_dir)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed below: no rank waits for another
                failure, error = _failure(e, run_dir), e
            if phase == "hash":
                gathered = _gathered((failure, entries))
                failure = next((f for f, _ in gathered if f is not None), None)
                shares = [part for _, part in gathered]
            else:
                failure = _agree(failure)
            if failure is not None:
                break
        done = failure is None
    finally:
        if not done and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if done:
        return final
    kind, detail, free = failure
    if kind == "bug" and error is not None:
        raise error
    raise write_error(final, previous, detail, kind == "disk", free)


def load_sharded(path: str, parallel_model) -> dict:
    """Collective: fills this rank's ZeRO shards, moments, parameters and biases from any layout's
    sharded checkpoint (after ``verify_sharded`` passed on every rank), or from a one-process
    checkpoint (``state.json``: every rank reads and verifies the whole of it, then keeps its slices).
    Returns the meta dict (step, tokens, sampler, opt_step, kind, rng_restored). The sampler state is the
    global position, valid on any layout; each rank's RNG state is restored from a sharded checkpoint of
    as many ranks (rank r's own stream), not from another world size or a one-process checkpoint. Every
    rank raises the same CheckpointError if any check fails."""
    rank, world = dist.get_rank(), dist.get_world_size()
    single = os.path.isfile(os.path.join(path, STATE))
    checked, failure, rng = None, None, None
    try:
        checked = _read_single(path, parallel_model) if single else verify_sharded(path, rank, world)
        rng = None if single else read_rank(path, rank, world)
    except CheckpointError as e:
        failure = first_line(e)
    except Exception as e:  # noqa: BLE001 - agreed below; a rank must not leave the others waiting
        failure = f"rank {rank}: {type(e).__name__}: {first_line(e)}"
    failure = _agree(failure)
    if failure is not None:
        raise CheckpointError(failure)
    if single:
        meta, flat = checked
        mine = _slices(parallel_model)
        _install(parallel_model, meta["opt_step"],
                 lambda n, suffix: flat[n + suffix][mine[n][0]:mine[n][0] + mine[n][2]], flat)
        return dict(meta, kind="single", rng_restored=False)
    metadata, meta = checked
    sd = _state(parallel_model, _global_numel(parallel_model), fill=False)
    dcp_load(path, sd, metadata, no_dist=False)
    _install(parallel_model, meta["opt_step"], lambda n, suffix: sd[n + suffix].local_shards()[0].tensor, sd)
    if rng is not None:
        rng_state.restore(*rng)   # checked by read_rank on every rank already
    return dict(meta, kind="sharded", rng_restored=rng is not None)


def _install(parallel_model, opt_step: int, local, biases: dict) -> None:
    """This rank's masters, moments (with ``opt_step``) and biases from ``local(name, suffix)`` (the
    slice ``_slices`` assigns this rank, suffix "" / ".exp_avg" / ".exp_avg_sq") and ``biases`` (by
    state-dict name); then every rank's parameters are all-gathered from the masters."""
    mine = _slices(parallel_model)
    step_t = torch.tensor(float(opt_step))
    with torch.no_grad():
        for n, e in parallel_model.zero.entries.items():
            vals = {}
            for suffix in ("",) + tuple("." + m for m in MOMENTS):
                full = torch.zeros(e.chunk, dtype=e.master.dtype, device=e.master.device)   # NCCL: device tensors
                if n in mine:
                    full[:mine[n][2]] = local(n, suffix).to(full.dtype)
                vals[suffix] = full
            if e.copies[0] is not None:  # only one copy of a mirrored stage read it: share by summing
                flat = torch.cat(list(vals.values()))
                dist.all_reduce(flat, group=e.copies[0])
                vals = dict(zip(vals, flat.split(e.chunk)))
            e.master.copy_(vals[""])
            if opt_step > 0:
                optimizer = parallel_model.zero.optimizer
                optimizer.state[e.master] = dict(
                    step=step_t.clone(), **{m: vals["." + m].to(optimizer.moment_dtype_of(e.master)) for m in MOMENTS})
        for name, moe in _moes(parallel_model).items():
            b = moe.gate.e_score_correction_bias
            b.copy_(biases[f"{name}.gate.e_score_correction_bias"].to(b.dtype))
    parallel_model.zero.all_gather_params()


def _read_single(path: str, parallel_model) -> tuple[dict, dict[str, torch.Tensor]]:
    """A one-process checkpoint as flat global tensors: ``{name}``, ``{name}.exp_avg``,
    ``{name}.exp_avg_sq`` per parameter (moments zero if it has no optimizer state) and the biases,
    checked against the full model of ``parallel_model.cfg`` (names, shapes; the optimizer's parameter order from
    ``dsv3.training.optim.build_optimizer`` on that model). Returns (meta with opt_step, tensors)."""
    from dsv3.training.optim import build_optimizer
    meta, tensors, opt, _ = read_checkpoint_files(path)
    with torch.device("meta"):
        full = Transformer(parallel_model.cfg.model)
    check_tensors(os.path.join(path, "model.safetensors"), tensors,
                  {k: v.shape for k, v in full.state_dict().items()})
    names = {id(p): n for n, p in full.named_parameters()}
    order = [[names[id(p)] for p in g["params"]] for g in build_optimizer(full, parallel_model.cfg.train).param_groups]
    where = os.path.join(path, "optimizer.pt")
    saved = [g.get("params") if isinstance(g, dict) else None for g in opt["param_groups"]]
    if [len(g) if isinstance(g, list) else None for g in saved] != [len(g) for g in order]:
        raise CheckpointError(f"{where} does not match this model's optimizer: parameter groups of "
                              f"{[len(g) if isinstance(g, list) else None for g in saved]} tensors, "
                              f"expected {[len(g) for g in order]}")
    flat: dict[str, torch.Tensor] = {k: v.reshape(-1) for k, v in tensors.items()}
    opt_step = 0
    for idx_group, name_group in zip(saved, order):
        for idx, n in zip(idx_group, name_group):
            st = opt["state"].get(idx, {})
            numel = tensors[n].numel()
            for m in MOMENTS:
                v = st.get(m, torch.zeros(numel))
                if not torch.is_tensor(v) or v.numel() != numel:
                    raise CheckpointError(f"{where}: the {m} of '{n}' does not match its parameter "
                                          f"({numel} elements)")
                flat[f"{n}.{m}"] = v.reshape(-1)
            if "step" in st:
                opt_step = max(opt_step, int(float(st["step"])))
    return dict(meta, opt_step=opt_step), flat


def export_hf(path: str, model: Transformer, out_dir: str, overwrite: bool = False) -> None:
    """A sharded checkpoint → the Hugging Face layout (one process; ``model`` gives the architecture).
    ``out_dir`` follows ``save_hf_checkpoint``'s rules: refused if non-empty without its marker, or
    overlapping the checkpoint; a marked one replaced only with ``overwrite``."""
    from dsv3.checkpoint.hf import save_hf_checkpoint
    load_sharded_into_model(path, model)
    save_hf_checkpoint(model, out_dir, overwrite=overwrite, input_dirs=(os.path.dirname(os.path.abspath(path)),),
                       written_by="parallel.dist_checkpoint.export_hf")
