"""A Hugging Face checkpoint folder opened and checked against the model its config.json describes:
``open_hf_checkpoint`` (config.json, our ModelConfig, a shard reader), ``fp8_block`` (the FP8 weight
block side) and ``check_hf_tensors`` (every stored tensor has a place and the shape it implies; every
needed tensor is stored). Loading (``dsv3.checkpoint.hf``) and streaming conversion
(``dsv3.checkpoint.hf_convert``) both start here. Reads headers only.
"""
from __future__ import annotations

import json
import os

import torch

from dsv3.checkpoint.hf_config import config_from_hf
from dsv3.checkpoint.hf_shards import CheckpointReader
from dsv3.checkpoint.hf_weights import SCALE_SUFFIX, fused_expert_names, hf_slots, stored_mtp_layers
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.model.transformer import Transformer

BLOCK = 128
ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


def read_hf_config(path: str) -> dict:
    """config.json of a Hugging Face folder; a missing or corrupted one is one CheckpointError."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: config.json is missing (not a Hugging Face checkpoint folder)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{cfg_path} is corrupted (not valid JSON)") from None


def fp8_block(hf: dict, where: str) -> int:
    """The side of the square FP8 weight blocks config.json's quantization_config declares (128 when
    the checkpoint is not quantised); anything else is one CheckpointError."""
    q = hf.get("quantization_config")
    if not q:
        return BLOCK
    block = q.get("weight_block_size", [BLOCK, BLOCK])
    if q.get("quant_method") != "fp8" or len(block) != 2 or block[0] != block[1]:
        raise CheckpointError(f"{where}: quantization_config {q} is not supported (fp8 with square weight blocks only)")
    return int(block[0])


def open_hf_checkpoint(path: str) -> tuple[dict, ModelConfig, CheckpointReader]:
    """config.json, our ModelConfig (MTP depth = the MTP layers actually stored) and a shard reader."""
    hf = read_hf_config(path)
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    if archs and not any(a in ARCHITECTURES for a in archs):
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: architectures {archs} is not a DeepSeek-V3 / V2 "
                              f"model (expected one of {', '.join(ARCHITECTURES)})")
    reader = CheckpointReader(path)
    stored = stored_mtp_layers(reader.names(), int(hf.get("num_hidden_layers", 0)))
    cfg = config_from_hf(hf, None if stored else 0, where=os.path.join(path, "config.json"))
    return hf, cfg, reader


def model_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our state_dict's shapes for ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def check_hf_tensors(path: str, cfg: ModelConfig, reader: CheckpointReader) -> None:
    """Every stored tensor has a place in the model config.json describes, with the shape it implies,
    and every tensor that model needs is stored (per expert or fused); else one CheckpointError naming
    the first offender (missing: with the count). Reads headers only."""
    shapes = model_shapes(cfg)
    slots = {s.hf: s for s in hf_slots(cfg)}
    fused = fused_expert_names(cfg)
    needed = {(s.ours, s.expert): s.hf for s in slots.values() if not s.copy}
    for name in reader.names():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in reader:
            continue  # checked with its weight
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old exports stored; recomputed from config.json
        where = f"tensor '{name}' ({os.path.join(path, reader.shard_of(name))})"
        if name in slots:
            s = slots[name]
            want = shapes[s.ours][1:] if s.expert is not None else shapes[s.ours]
            needed.pop((s.ours, s.expert), None)
        elif name in fused:
            prefix, kind = fused[name]
            want = shapes[prefix + ("w1" if kind == "gate_up" else "w2")]
            if kind == "gate_up":
                want = (want[0], 2 * want[1], want[2])
            for ours in ((prefix + "w1", prefix + "w3") if kind == "gate_up" else (prefix + "w2",)):
                for j in range(cfg.moe.n_routed_experts):
                    needed.pop((ours, j), None)
        else:
            raise CheckpointError(f"unknown {where}: config.json has no place for it")
        got = reader.shape(name)
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{where} has shape {list(got)}, config.json implies {list(want)}")
    if needed:
        hf_name = next(iter(needed.values()))
        raise CheckpointError(f"{path}: tensor '{hf_name}' is missing ({len(needed)} missing in all)")
