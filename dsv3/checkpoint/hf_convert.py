"""``python -m dsv3.checkpoint.hf convert IN OUT [--to-bf16 | --to-fp8]``: BF16 <-> block-FP8 conversion of a Hugging
Face checkpoint that never holds more than a few row blocks of one tensor in memory.

Each output tensor is produced in blocks of 128-row multiples (a whole row of 128×128 scale blocks at
a time) and written straight into the output shard; a weight's ``weight_scale_inv`` is read from
whichever shard holds it. --to-bf16: w = w_fp8 · weight_scale_inv[block] (official fp8_cast_bf16);
--to-fp8: the released set of Linear weights (``is_fp8_weight``) becomes E4M3 with 128×128 scales.
Other floating tensors become BF16, except ``e_score_correction_bias``, which stays float32.

Before anything is written the source must be a DeepSeek-V3 / V2 checkpoint (config.json's model_type
and architectures) holding exactly the tensors its config.json implies, with their shapes
(``dsv3.checkpoint.hf_folder.check_hf_tensors``), and OUT must be new, empty or an earlier output (``--overwrite``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterator

import torch

from dsv3.errors import CheckpointError
from dsv3.checkpoint.hf_config import fp8_quantization_config
from dsv3.checkpoint.hf_folder import check_hf_tensors, fp8_block, open_hf_checkpoint
from dsv3.checkpoint.hf_shards import INDEX_NAME, MARKER, check_out_dir, row_blocks, write_checkpoint
from dsv3.checkpoint.hf_weights import SCALE_SUFFIX, is_fp8_weight
from triton_kernels.quant_ref import FP8_DTYPE, weight_dequant_ref, weight_quant_ref

CHUNK_BYTES = 4 << 20  # float32 bytes per produced row block
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _rows_per_chunk(shape: tuple, block: int) -> int:
    row = 4 * max(1, math.prod(shape[1:]))
    return max(block, (CHUNK_BYTES // row) // block * block)


def convert(src: str, dst: str, to: str = "bf16", max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> list[str]:
    """Convert the checkpoint in ``src`` into ``dst`` (written atomically); to is 'bf16' or 'fp8'.
    An earlier output in ``dst`` is replaced only with ``overwrite``."""
    if to not in ("bf16", "fp8"):
        raise ValueError(f"to must be 'bf16' or 'fp8', got {to!r}")
    check_out_dir(dst, [src], overwrite)
    hf, cfg, reader = open_hf_checkpoint(src)
    block = fp8_block(hf, src)
    check_hf_tensors(src, cfg, reader)
    entries, plans, scales = [], {}, {}
    for name in reader.names():
        base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else None
        if base is not None and base in reader:
            continue  # planned with its weight
        dtype, shape = reader.dtype(name), reader.shape(name)
        stored_fp8 = dtype in _FP8
        if stored_fp8 and name + SCALE_SUFFIX not in reader:
            raise CheckpointError(f"tensor '{name}' ({reader.shard_of(name)}) is FP8 but its scale '{name}{SCALE_SUFFIX}' is missing")
        if to == "fp8" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            raise CheckpointError(f"tensor '{name}': fused experts cannot be stored in FP8 per 128×128 block; "
                                  f"load with dsv3.checkpoint.hf.load_hf_checkpoint and save with save_hf_checkpoint(fp8=True)")
        keep_f32 = name.endswith("e_score_correction_bias") or not dtype.is_floating_point
        if to == "bf16" and stored_fp8:
            plans[name] = ("dequant",)
            entries.append((name, torch.bfloat16, shape))
        elif to == "fp8" and stored_fp8:
            plans[name] = plans[name + SCALE_SUFFIX] = ("copy",)
            entries += [(name, dtype, shape), (name + SCALE_SUFFIX, torch.float32, reader.shape(name + SCALE_SUFFIX))]
        elif to == "fp8" and is_fp8_weight(name) and len(shape) == 2:
            plans[name], plans[name + SCALE_SUFFIX] = ("quant",), ("scale",)
            entries += [(name, FP8_DTYPE, shape), (name + SCALE_SUFFIX, torch.float32, tuple(-(-n // block) for n in shape))]
        else:
            out = dtype if keep_f32 else torch.bfloat16
            plans[name] = ("cast", out)
            entries.append((name, out, shape))

    def produce(name: str) -> Iterator[torch.Tensor]:
        plan = plans[name]
        shape = reader.shape(name) if name in reader else None
        if plan[0] == "scale":
            yield torch.cat(scales.pop(name), dim=0)
            return
        rows = _rows_per_chunk(shape, block) if shape else 1
        for r0, r1 in row_blocks(shape[0] if shape else 1, rows):
            if plan[0] == "dequant":
                w = reader.read(name, r0, r1)
                s = reader.read(name + SCALE_SUFFIX, r0 // block, -(-r1 // block))
                yield weight_dequant_ref(w, s, block, torch.bfloat16)
            elif plan[0] == "quant":
                w_fp8, s = weight_quant_ref(reader.read(name, r0, r1).float(), block)
                scales.setdefault(name + SCALE_SUFFIX, []).append(s)
                yield w_fp8
            elif plan[0] == "cast":
                yield reader.read(name, r0, r1).to(plan[1])
            else:
                yield reader.read(name, r0, r1)

    config = {k: v for k, v in hf.items() if k != "quantization_config"}
    config["torch_dtype"] = "bfloat16"
    if "dtype" in config:
        config["dtype"] = "bfloat16"
    if to == "fp8":
        config["quantization_config"] = fp8_quantization_config()
    skip = {"config.json", INDEX_NAME, MARKER}
    extra = {f: os.path.join(src, f) for f in sorted(os.listdir(src))
             if f not in skip and not f.endswith(".safetensors") and os.path.isfile(os.path.join(src, f))}
    return write_checkpoint(dst, entries, produce, max_shard_bytes,
                            extra_files={"config.json": json.dumps(config, indent=2) + "\n"}, copy_files=extra,
                            overwrite=overwrite, input_dirs=[src], written_by=f"python -m dsv3.checkpoint.hf convert --to-{to}")
