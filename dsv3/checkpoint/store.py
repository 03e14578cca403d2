"""Training checkpoints, written atomically: everything goes into a temporary folder beside the
final one, each file is fsynced, a manifest (sizes + sha256) is written last, and the folder is
renamed into place. A crash at any point leaves the previous complete checkpoint untouched; a
failed write (disk full, I/O error) removes the temporary folder and raises one CheckpointError.

Layout of ``RUN_DIR/ckpt_0000100/``: ``model.safetensors`` (parameters and the routing-bias
buffers, our own names), ``optimizer.pt`` and ``rng.pt`` (tensors and numbers only, read back with
``torch.load(weights_only=True)``), ``state.json`` (step, tokens, sampler position, manifest).
Nothing is ever unpickled beyond tensors and plain containers. ``load_any_checkpoint`` reads either
kind into one process (a sharded one through ``dsv3.checkpoint.sharded``). Sharded checkpoints (written
by ``parallel/dist_checkpoint.py``) share the folder names, the manifests (``dsv3/checkpoint/manifest.py``),
pruning and the clean-up of partial folders below; theirs is complete when ``manifest.json`` is present.
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import re
import shutil
import sys
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load, load_file, save_file

from dsv3.checkpoint import rng_state
from dsv3.checkpoint.manifest import (MANIFEST, STATE, file_entry, fsync_path, manifest_files, read_json, verify_file,
                                      write_json)
from dsv3.checkpoint.sharded import load_sharded_into_model
from dsv3.errors import CheckpointError
from dsv3.training.faults import fault_point, first_line

CKPT_RE = re.compile(r"^ckpt_(\d+)$")
# what a dead writer leaves: one-process temp folders, sharded temp folders, a re-saved step's old
# copy, a pruned checkpoint being deleted
PARTIAL_RE = re.compile(r"^(\.tmp_ckpt_\d+_\d+|ckpt_\d+\.tmp|ckpt_\d+\.old_\d+|ckpt_\d+\.del)$")
FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.pt", "rng.pt")


class NonFiniteCheckpointError(CheckpointError):
    """The model or optimizer state holds NaN/Inf: the checkpoint was not written."""


# ------------------------------------------------------------------------------ write failures
def is_write_failure(e: BaseException) -> bool:
    """An error of writing files (disk full, I/O, permissions), not a bug to show as a traceback."""
    if isinstance(e, (OSError, SafetensorError)):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in (
        "unexpected pos", "PytorchStreamWriter", "file write failed", "inline_container"))


def free_bytes(folder: str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(e: BaseException, free: Optional[int]) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a short write as "unexpected pos N vs M", without an errno
    return free is not None and free < (16 << 20)


def write_error(final: str, previous: Optional[str], detail: str, disk_full: bool,
                free: Optional[int] = None) -> CheckpointError:
    """The one-line CheckpointError for a failed checkpoint write (its temp folder already removed)."""
    intact = f"previous checkpoint {previous} is intact" if previous else "there is no previous checkpoint"
    if disk_full:
        return CheckpointError(f"disk full while writing checkpoint {final} ({detail}); the partial checkpoint "
                               f"was removed, {intact}; free space and resume with train.resume=auto")
    room = f", {free / 2**20:.0f} MiB free" if free is not None else ""
    return CheckpointError(f"cannot write checkpoint {final} ({detail}{room}); the partial checkpoint was "
                           f"removed, {intact}")


# ------------------------------------------------------------------------------ finite guard
def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first floating tensor holding NaN or Inf, else None."""
    for name, t in named:
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()):   # FP8: no isfinite kernel
                return name
    return None


def _model_and_optimizer_tensors(model: torch.nn.Module, optimizer) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.state_dict().items()
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, st in optimizer.state.items():
            for k, v in st.items():
                yield f"optimizer {k} of {names.get(id(p), 'a parameter')}", v


def validate_finite(model: torch.nn.Module, optimizer=None, what: str = "checkpoint") -> None:
    """Raise NonFiniteCheckpointError if a parameter, buffer or optimizer state tensor is NaN/Inf."""
    bad = first_non_finite(_model_and_optimizer_tensors(model, optimizer))
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to write {what}: {bad} holds NaN/Inf (the run diverged; "
                                       f"lower train.lr or resume from an earlier checkpoint)")


# ---------------------------------------------------------------------------------- one process
def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> str:
    """Write ckpt_{step} atomically; `state` is JSON-serialisable (tokens, sampler position, …).
    Raises NonFiniteCheckpointError (nothing written) or CheckpointError (write failed: temp folder
    removed, the previous checkpoint untouched)."""
    final = os.path.join(run_dir, f"ckpt_{step:07d}")
    tmp = os.path.join(run_dir, f".tmp_ckpt_{step:07d}_{os.getpid()}")
    previous = latest_checkpoint(run_dir)
    validate_finite(model, optimizer, f"checkpoint {final}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        fault_point("ckpt_write", step)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state.capture(), os.path.join(tmp, "rng.pt"))   # CPU and, on CUDA, every device
        files = {name: file_entry(os.path.join(tmp, name)) for name in FILES}
        write_json(os.path.join(tmp, STATE), dict(state, step=step, format_version=FORMAT_VERSION, files=files))
        fault_point("ckpt", step)
        rename_into_place(tmp, final)
        fsync_path(run_dir)
    except BaseException as e:
        free = free_bytes(run_dir)   # before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_error(final, previous, first_line(e), is_disk_full(e, free), free) from None
        raise
    return final


def rename_into_place(tmp: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    old = final + f".old_{os.getpid()}"   # re-saving a step: move the old one aside only now
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def is_complete(path: str) -> bool:
    """A checkpoint folder renamed into place with its manifest (state.json or manifest.json)."""
    return os.path.isfile(os.path.join(path, STATE)) or os.path.isfile(os.path.join(path, MANIFEST))


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of either kind, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := CKPT_RE.match(n))]
    return [p for _, n in sorted(found) if is_complete(p := os.path.join(run_dir, n))]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_state(path: str, verify: bool = True) -> dict:
    """state.json of a checkpoint, checked for shape, with every file checked against the manifest
    (``verify=False``: the caller checks each file's bytes itself, ``read_checkpoint_files``)."""
    state_path = os.path.join(path, STATE)
    if not os.path.isfile(state_path):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            raise CheckpointError(f"{path} is a sharded checkpoint (a multi-rank run's); load it with "
                                  f"load_any_checkpoint or parallel.dist_checkpoint")
        raise CheckpointError(f"{path} is not a checkpoint: state.json is missing")
    meta = read_json(state_path)
    for key, kind in (("step", int), ("tokens", int), ("sampler", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{state_path} is corrupted: no valid '{key}' entry")
    files = manifest_files(state_path, meta.get("files"), required=FILES)
    if verify:
        for name, info in files.items():
            verify_file(path, name, info)
    return meta


def checkpoint_kind(path: str) -> str:
    """"single" (a one-process checkpoint: state.json) or "sharded" (a multi-rank run's DCP folder:
    manifest.json) for a complete checkpoint folder; anything else is one CheckpointError."""
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint folder at {path}")
    if os.path.isfile(os.path.join(path, STATE)):
        return "single"
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return "sharded"
    raise CheckpointError(f"{path} is not a complete checkpoint: it has neither state.json (one process) "
                          f"nor manifest.json (sharded)")


def check_tensors(where: str, tensors: dict, shapes: dict) -> None:
    """The checkpoint's tensor names and shapes are exactly the model's (``tensors``: name → tensor or
    shape; ``shapes``: name → shape)."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unknown tensor '{unexpected[0]}'"
        raise CheckpointError(f"{where} does not match the model config: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unknown)")
    for k, v in tensors.items():
        if tuple(getattr(v, "shape", v)) != tuple(shapes[k]):
            raise CheckpointError(f"{where}: tensor '{k}' has shape {tuple(getattr(v, 'shape', v))}, the model expects "
                                  f"{tuple(shapes[k])}")


def read_checkpoint_files(path: str, rng: bool = False) -> tuple[dict, dict, dict, Optional[dict]]:
    """A one-process checkpoint read without a model: (state.json, model tensors, optimizer state dict,
    RNG dict or None). Each file is read once and its bytes checked against the manifest before they
    are parsed (so what is parsed is what was hashed, also when ranks read one folder together)."""
    meta = read_state(path, verify=False)
    files = meta["files"]
    blobs = {}
    for name in FILES if rng else FILES[:2]:
        fpath = os.path.join(path, name)
        try:
            with open(fpath, "rb") as f:
                blobs[name] = f.read(files[name]["bytes"] + 1)
        except OSError as e:
            raise CheckpointError(f"cannot read {fpath}: {e.strerror or e}") from None
        verify_file(path, name, files[name], data=blobs[name])
    if not rng:
        verify_file(path, FILES[2], files[FILES[2]])
    try:
        tensors = safetensors_load(blobs["model.safetensors"])
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {os.path.join(path, 'model.safetensors')}: {first_line(e)}") from None
    opt = _torch_load(os.path.join(path, "optimizer.pt"), blobs["optimizer.pt"])
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise CheckpointError(f"{os.path.join(path, 'optimizer.pt')} is corrupted: not an optimizer state dict")
    rng_state = _torch_load(os.path.join(path, "rng.pt"), blobs["rng.pt"]) if rng else None
    return meta, tensors, opt, rng_state


def load_model_weights(path: str, model: torch.nn.Module, verify: bool = True) -> None:
    """The weights of a checkpoint of either kind into ``model`` (verified against its manifest)."""
    if not os.path.isfile(os.path.join(path, STATE)) and os.path.isfile(os.path.join(path, MANIFEST)):
        load_sharded_into_model(path, model, None)
        return
    if verify:
        read_state(path)
    fpath = os.path.join(path, "model.safetensors")
    try:
        tensors = load_file(fpath)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {fpath}: {e}") from None
    check_tensors(fpath, tensors, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(tensors)


def _torch_load(fpath: str, data: Optional[bytes] = None):
    try:
        return torch.load(fpath if data is None else io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{fpath}: refusing to load it, it holds more than tensors and plain "
                              f"containers ({first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {fpath}: {first_line(e)}") from None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> dict:
    """Verify and load a checkpoint into model (and optimizer, RNG); returns its state dict."""
    meta = read_state(path)
    load_model_weights(path, model, verify=False)
    if optimizer is not None:
        opt_state = _torch_load(os.path.join(path, "optimizer.pt"))
        try:
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path}/optimizer.pt does not match this model's optimizer: "
                                  f"{first_line(e)}") from None
    if restore_rng:
        rng_state.restore(_torch_load(os.path.join(path, "rng.pt")), f"{path}/rng.pt")
    return meta


def load_any_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        restore_rng: bool = True) -> dict:
    """One process: a checkpoint of either kind into ``model`` (parameters and routing biases) and
    ``optimizer`` (a ``dsv3.training.optim.AdamW``: moments and step; None to skip), every file verified first.
    Returns the checkpoint's meta (step, tokens, sampler, ...) with ``kind``: "single" or "sharded".

    A sharded checkpoint holds one RNG state per rank of its run, so one process restores the RNG only
    from a one-process checkpoint (CPU and CUDA generators); training draws no random numbers after
    initialisation, so the losses do not depend on it. The optimizer's hyper-parameters (lr, betas,
    weight decay) come from a one-process checkpoint's optimizer.pt, from ``optimizer`` as built for a
    sharded one. The sampler state is the global position (epoch, index of sequences consumed by all
    ranks together): it carries over between layouts (``dsv3.data.dataset.Sampler``). Raises CheckpointError."""
    kind = checkpoint_kind(path)
    if kind == "single":
        meta = load_checkpoint(path, model, optimizer, restore_rng)
    else:
        meta = load_sharded_into_model(path, model, optimizer)
    return dict(meta, kind=kind)


# ------------------------------------------------------------------------- run-folder upkeep
def prune_checkpoints(run_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (keep_last ≤ 0: keep all).
    Only folders named ckpt_N with a manifest count or go; incomplete ones and symlinks are left
    alone. Call it after a save returned (on one rank): the newest is then complete. Returns the
    deleted paths; a folder that cannot be deleted is reported on stderr, not raised."""
    if keep_last <= 0:
        return []
    ckpts = [p for p in list_checkpoints(run_dir) if not os.path.islink(p)]
    gone = []
    for path in ckpts[:-keep_last]:
        doomed = path + ".del"   # renamed first: a crash mid-delete leaves no half checkpoint named ckpt_N
        try:
            os.rename(path, doomed)
            shutil.rmtree(doomed)
            gone.append(path)
        except OSError as e:
            print(f"warning: could not delete old checkpoint {path}: {e.strerror or e}", file=sys.stderr)
    return gone


def remove_stale_partials(run_dir: str) -> list[str]:
    """Remove what a dead writer left in ``run_dir``: ``.tmp_ckpt_*`` / ``ckpt_N.tmp`` temp folders
    and ``ckpt_N.del`` / ``ckpt_N.old_*`` folders; a complete ``ckpt_N.old_*`` whose ckpt_N is missing
    (killed mid re-save) is renamed back instead. Only while no other process writes this run folder
    (hold the run lock), on one rank. Returns the removed paths."""
    if not os.path.isdir(run_dir):
        return []
    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if not PARTIAL_RE.match(name) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if ".old_" in name:
            final = path.split(".old_")[0]
            if not os.path.exists(final) and is_complete(path):
                os.rename(path, final)
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
