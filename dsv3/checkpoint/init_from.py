"""``train.init_from=PATH``: start a run from another's weights with a fresh optimizer at step 0, as
the report's long-context extension starts from the pre-trained model (§4.3).

    info = init_from("runs/pretrain", model)         # a dsv3 run folder: its latest checkpoint
    info = init_from("runs/pretrain/ckpt_0001000", model)
    info = init_from("DeepSeek-V3-Base/", model)       # a Hugging Face DeepSeek-V3 / V2 folder

PATH is a dsv3 run folder (one-process or sharded checkpoints; the latest complete one is read), one
``ckpt_*`` folder of either kind, or a Hugging Face folder (``config.json`` + safetensors, BF16 or
block-FP8, read through ``dsv3.checkpoint.hf``). The parameters and the routing biases (``e_score_correction_bias``)
are loaded; the optimizer, step, token count, sampler and RNG are not. Only the tensors' names and
shapes must match the model: settings that leave them unchanged (RoPE/YaRN scaling, max_seq_len, the
balance schedule) may differ from the source run's, which is what a context extension changes.
Every file is verified as a resume verifies it (sha256 manifests; safetensors headers for HF).
A missing path, a folder of none of these kinds, a shape or name mismatch, or an HF folder missing
tensors raise one CheckpointError line.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from dsv3.checkpoint.store import (CKPT_RE, MANIFEST, STATE, check_tensors, checkpoint_kind, latest_checkpoint,
                             load_any_checkpoint)
from dsv3.errors import CheckpointError
from dsv3.model.router import topk_method


def resolve(path: str) -> tuple[str, str]:
    """(kind, folder to read): kind "hf" (a Hugging Face folder) or "single" / "sharded" (a dsv3
    checkpoint folder, the latest complete one of a run folder). Raises CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"init_from {path}: no such file or folder")
    if not os.path.isdir(path):
        raise CheckpointError(f"init_from {path}: expected a folder (a dsv3 run, a ckpt_* folder or a Hugging Face "
                              f"checkpoint), got a file")
    if any(os.path.isfile(os.path.join(path, n)) for n in (STATE, MANIFEST)):
        return checkpoint_kind(path), path
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return checkpoint_kind(ckpt), ckpt
    if os.path.isfile(os.path.join(path, "config.yaml")) or any(CKPT_RE.match(n) for n in os.listdir(path)):
        raise CheckpointError(f"init_from {path}: this run folder has no complete checkpoint (ckpt_* with "
                              f"state.json or manifest.json)")
    raise CheckpointError(f"init_from {path}: not a dsv3 run folder, a ckpt_* folder or a Hugging Face checkpoint "
                          f"(config.json + safetensors)")


def load_hf_weights(path: str, model: torch.nn.Module) -> None:
    """A Hugging Face DeepSeek-V3 / V2 folder's weights into ``model`` (FP8 dequantised). Every tensor the
    model holds must be stored with its shape (``dsv3.checkpoint.hf_folder.check_hf_tensors`` checks the folder
    against its own config.json first, then config.json's shapes are compared with the model's)."""
    from dsv3.checkpoint.hf import iter_hf_weights
    from dsv3.checkpoint.hf_folder import model_shapes, open_hf_checkpoint
    _, hf_cfg, _ = open_hf_checkpoint(path)
    if hf_cfg.mtp.depth != model.cfg.mtp.depth:
        raise CheckpointError(f"init_from {path}: the checkpoint stores {hf_cfg.mtp.depth} MTP layer(s), the model "
                              f"has model.mtp.depth={model.cfg.mtp.depth}; set model.mtp.depth={hf_cfg.mtp.depth}")
    own = model.state_dict()
    check_tensors(f"init_from {path} (config.json)", model_shapes(hf_cfg), {k: v.shape for k, v in own.items()})
    written: set[tuple[str, Optional[int]]] = set()
    with torch.no_grad():
        for ours, expert, tensor, _ in iter_hf_weights(path, dequantize=True):
            (own[ours] if expert is None else own[ours][expert]).copy_(tensor)
            written.add((ours, expert))

    def covered(name: str) -> bool:   # whole, or (stacked experts) every row
        return (name, None) in written or all((name, j) in written for j in range(own[name].shape[0]))
    # check_hf_tensors refuses a folder missing a tensor config.json implies; this guards the name mapping
    missing = [k for k in own if not covered(k)]
    if not topk_method(model.cfg.moe.topk_method).biased:   # a V2-style router has no bias: the buffer stays unused
        for k in [k for k in missing if k.endswith("e_score_correction_bias")]:
            own[k].zero_()
            missing.remove(k)
    if missing:
        raise CheckpointError(f"init_from {path}: tensor '{missing[0]}' was not found in the checkpoint "
                              f"({len(missing)} missing)")


def init_from(path: str, model: torch.nn.Module) -> dict:
    """Load the weights and routing biases of ``path`` into ``model`` (a ``Transformer`` of the new run's
    config, before ``parallelize()``); the optimizer is untouched and the caller starts at step 0.
    Returns {"kind": "hf" | "single" | "sharded", "checkpoint": the folder read, "step": the source's
    step (None for HF)}. Raises CheckpointError (one line)."""
    kind, folder = resolve(path)
    if kind == "hf":
        load_hf_weights(folder, model)
        return dict(kind=kind, checkpoint=folder, step=None)
    meta = load_any_checkpoint(folder, model, None, restore_rng=False)
    return dict(kind=kind, checkpoint=folder, step=meta["step"])
