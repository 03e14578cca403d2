"""Training checkpoints, written atomically: everything goes into a temporary folder beside the
final one, each file is fsynced, a manifest (sizes + sha256) is written last, and the folder is
renamed into place. A crash at any point leaves the previous complete checkpoint untouched.

Layout of ``RUN_DIR/ckpt_0000100/``: ``model.safetensors`` (parameters and the routing-bias
buffers, our own names), ``optimizer.pt`` and ``rng.pt`` (tensors and numbers only, read back with
``torch.load(weights_only=True)``), ``state.json`` (step, tokens, sampler position, manifest).
Nothing is ever unpickled beyond tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsv3.errors import CheckpointError
from dsv3.faults import fault_point

CKPT_RE = re.compile(r"^ckpt_(\d+)$")
FORMAT_VERSION = 1


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> str:
    """Write ckpt_{step} atomically; `state` is JSON-serialisable (tokens, sampler position, …)."""
    final = os.path.join(run_dir, f"ckpt_{step:07d}")
    tmp = os.path.join(run_dir, f".tmp_ckpt_{step:07d}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.pt"))
    files = {}
    for name in ("model.safetensors", "optimizer.pt", "rng.pt"):
        path = os.path.join(tmp, name)
        _fsync(path)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    meta = dict(state, step=step, format_version=FORMAT_VERSION, files=files)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fault_point("ckpt", step)
    if os.path.exists(final):  # re-saving the same step: move the old one aside only after tmp is complete
        old = final + f".old_{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(run_dir)
    return final


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := CKPT_RE.match(n))]
    return [os.path.join(run_dir, n) for _, n in sorted(found)]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_state(path: str) -> dict:
    """state.json of a checkpoint, with every file checked against the manifest."""
    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path} is not a checkpoint: state.json is missing")
    try:
        with open(state_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{state_path} is corrupted (not valid JSON)") from None
    for name, info in meta.get("files", {}).items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint file {fpath} is missing")
        size = os.path.getsize(fpath)
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {fpath} is truncated or corrupted ({size} bytes, expected {info['bytes']})")
        if _sha256(fpath) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {fpath} is corrupted (sha256 mismatch)")
    return meta


def load_model_weights(path: str, model: torch.nn.Module) -> None:
    fpath = os.path.join(path, "model.safetensors")
    try:
        tensors = load_file(fpath)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {fpath}: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unknown tensor '{unexpected[0]}'"
        raise CheckpointError(f"{fpath} does not match the model config: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unknown)")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{fpath}: tensor '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> dict:
    """Verify and load a checkpoint into model (and optimizer, RNG); returns its state dict."""
    meta = read_state(path)
    load_model_weights(path, model)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}/optimizer.pt does not match this model's optimizer: {e}") from None
    if restore_rng:
        torch.set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True)["torch"])
    return meta
