"""Hugging Face checkpoints in and out: DeepSeek-V3 / V2(-Lite) layouts, BF16 or block-FP8.

    model = load_hf_checkpoint("DeepSeek-V2-Lite/")                 # config.json + sharded safetensors
    save_hf_checkpoint(model, "out/", dtype=torch.bfloat16, fp8=False, max_shard_bytes=5 << 30)

    python -m dsv3.checkpoint.hf convert IN OUT [--to-bf16 | --to-fp8] [--max-shard-size 5GB]   # streams, shard by shard
    python -m dsv3.checkpoint.hf export RUN_DIR OUT_DIR [--fp8]                                # a training run -> HF

RUN_DIR is a training run folder or one of its ckpt_* folders, of a one-process or a sharded (multi-rank)
run; the tokenizer is the run folder's copy (``tokenizer/``, named by corpus.json).

Both CLIs refuse an OUT that overlaps the input or holds anything but an earlier output of theirs
(``hf_shards.check_out_dir``); ``--overwrite`` replaces an earlier output, atomically.

FP8 checkpoints store E4M3 weights with a float32 ``weight_scale_inv`` per 128×128 block (report §3.3):
w = w_fp8 · weight_scale_inv[block]. Loading dequantises on CPU; ``iter_hf_weights(...,
dequantize=False)`` hands the FP8 tensors and their scales over unchanged for FP8 training.
Every bad checkpoint (missing shard, shape mismatch, unknown tensor, truncated file) raises one
``CheckpointError`` naming the tensor or file; the CLIs print it and exit with code 2 (130 on Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, Optional

import torch

from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError, UserError
from dsv3.training.faults import first_line
from dsv3.checkpoint.hf_config import config_to_hf, rope_interleaved
from dsv3.checkpoint.hf_folder import BLOCK, check_hf_tensors, fp8_block, open_hf_checkpoint
from dsv3.checkpoint.hf_shards import check_out_dir, write_checkpoint
from dsv3.checkpoint.hf_weights import (SCALE_SUFFIX, fused_expert_names, hf_slots, is_fp8_weight,
                                       rope_row_permutation)
from dsv3.model.transformer import Transformer
from dsv3.model.rope import rope_cos_sin
from triton_kernels.quant_ref import FP8_DTYPE, weight_dequant_ref, weight_quant_ref

def iter_hf_weights(path: str, dequantize: bool = True) -> Iterator[tuple[str, Optional[int], torch.Tensor, Optional[torch.Tensor]]]:
    """(our state_dict key, expert row or None, tensor, scale or None) for every stored tensor, checked
    against config.json first (``check_hf_tensors``: shapes, unknown and missing tensors). FP8 weights
    come dequantised to float32, or with ``dequantize=False`` as stored with their float32 block scales."""
    hf, cfg, reader = open_hf_checkpoint(path)
    block = fp8_block(hf, path)
    check_hf_tensors(path, cfg, reader)
    slots = {s.hf: s for s in hf_slots(cfg)}
    fused = fused_expert_names(cfg)
    interleaved = rope_interleaved(hf)
    for name in reader.names():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in reader:
            continue  # read together with its weight, wherever its shard
        if name.endswith("rotary_emb.inv_freq") or (name in slots and slots[name].copy):
            continue  # MTP embed_tokens / shared_head.head: copies of the tensors we share
        where = f"tensor '{name}' ({os.path.join(path, reader.shard_of(name))})"
        if name in slots:
            targets = [(slots[name].ours, slots[name].expert, None)]
        else:
            prefix, kind = fused[name]
            targets = [(prefix + "w1", None, 0), (prefix + "w3", None, 1)] if kind == "gate_up" else [(prefix + "w2", None, None)]
        tensor, scale = reader.read(name), None
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in reader:
                raise CheckpointError(f"{where} is FP8 but its scale '{scale_name}' is missing")
            scale = reader.read(scale_name).float()
            want_scale = tuple(-(-n // block) for n in tensor.shape[-2:])
            if tensor.dim() != 2 or tuple(scale.shape) != want_scale:
                raise CheckpointError(f"tensor '{scale_name}' has shape {list(scale.shape)}, expected {list(want_scale)} "
                                      f"for {list(tensor.shape)} in {block}x{block} blocks")
            if dequantize:
                tensor, scale = weight_dequant_ref(tensor, scale, block, torch.float32), None
        if not interleaved and (perm := rope_row_permutation(name, cfg)) is not None:
            if scale is not None:
                raise CheckpointError(f"{where}: FP8 rows cannot be permuted for rope_interleave=false; dequantize")
            tensor = tensor[perm]
        for ours, expert, half in targets:
            yield ours, expert, (tensor if half is None else tensor.chunk(2, dim=1)[half]), scale


def _empty_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    """A Transformer whose parameters are allocated in ``dtype`` but not initialised (no float32 copy,
    no random init: a 16B model loads in its BF16 size). Buffers get their constructor values."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.to_empty(device="cpu")
    cos, sin = rope_cos_sin(cfg.mla, cfg.max_seq_len)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name == "rope_cos":
                buf.copy_(cos)
            elif name == "rope_sin":
                buf.copy_(sin)
            else:  # routing biases (loaded next when stored) and load counters start at zero
                buf.zero_()
    unmapped = set(model.state_dict()) - {s.ours for s in hf_slots(cfg)}
    unmapped = {k for k in unmapped if not k.endswith("e_score_correction_bias")}
    if unmapped:  # a parameter the HF layout has no name for would stay uninitialised
        raise RuntimeError(f"dsv3.checkpoint.hf_weights has no Hugging Face name for {sorted(unmapped)[0]}")
    return model


def load_hf_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer (in eval mode) with the weights of a Hugging Face DeepSeek-V3 / V2 checkpoint, FP8
    weights dequantised on CPU. Parameters in ``dtype``; the routing bias stays float32."""
    _, cfg, _ = open_hf_checkpoint(path)
    model = _empty_model(cfg, dtype).eval()
    state = model.state_dict()
    with torch.no_grad():
        for ours, expert, tensor, _ in iter_hf_weights(path, dequantize=True):
            dst = state[ours] if expert is None else state[ours][expert]
            dst.copy_(tensor)
    return model


# ------------------------------------------------------------------------------------------ saving
def save_hf_checkpoint(model: Transformer, path: str, dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                       max_shard_bytes: int = 5 << 30, extra_files: Optional[dict[str, str]] = None,
                       copy_files: Optional[dict[str, str]] = None, bos_token_id: Optional[int] = None,
                       eos_token_id: Optional[int] = None, overwrite: bool = False, input_dirs: tuple = (),
                       written_by: str = "dsv3.checkpoint.hf.save_hf_checkpoint") -> list[str]:
    """config.json, sharded safetensors and the index in the released layout (per-expert tensors,
    the MTP layer as layer num_hidden_layers with its embed_tokens / shared_head.head copies).
    ``fp8=True`` stores the released set of Linear weights in E4M3 with 128×128 ``weight_scale_inv``
    and writes the quantization_config block. Written atomically, into a new or empty folder, or over an
    earlier output with ``overwrite=True`` (``hf_shards.check_out_dir``). Returns the shard paths."""
    cfg = model.cfg
    state = model.state_dict()
    entries, sources, pending = [], {}, {}
    for s in hf_slots(cfg):
        src = state[s.ours] if s.expert is None else state[s.ours][s.expert]
        shape = tuple(src.shape)
        if s.hf.endswith("e_score_correction_bias"):
            entries.append((s.hf, torch.float32, shape))
        elif fp8 and is_fp8_weight(s.hf):
            entries.append((s.hf, FP8_DTYPE, shape))
            entries.append((s.hf + SCALE_SUFFIX, torch.float32, tuple(-(-n // BLOCK) for n in shape)))
        else:
            entries.append((s.hf, dtype, shape))
        sources[s.hf] = src
    out_dtypes = {name: dt for name, dt, _ in entries}

    def produce(name: str) -> torch.Tensor:
        if name in pending:
            return pending.pop(name)
        src = sources[name].detach().cpu()
        if out_dtypes[name] == FP8_DTYPE:
            w_fp8, scale = weight_quant_ref(src.float(), BLOCK)
            pending[name + SCALE_SUFFIX] = scale
            return w_fp8
        return src.to(out_dtypes[name])

    dtype_name = str(dtype).replace("torch.", "")
    config = config_to_hf(cfg, dtype_name, fp8, bos_token_id, eos_token_id)
    files = dict(extra_files or {}, **{"config.json": json.dumps(config, indent=2) + "\n"})
    return write_checkpoint(path, entries, produce, max_shard_bytes, extra_files=files, copy_files=copy_files,
                            overwrite=overwrite, input_dirs=input_dirs, written_by=written_by)


# ---------------------------------------------------------------------------- run folders, inference
def run_folder(path: str) -> str:
    """The training run folder of a run folder or of one of its ckpt_* folders."""
    path = os.path.abspath(path)
    is_ckpt = any(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "manifest.json"))
    if is_ckpt and not os.path.isfile(os.path.join(path, "config.yaml")):
        return os.path.dirname(path)
    return path


def run_model_config(run_dir: str) -> ModelConfig:
    """The ``model`` section of a run's config.yaml, validated. Only it is read: the weights need nothing
    else, and a run written by an older version may hold keys since removed from other sections (or
    ``model.linear_impl``, listed in ``dsv3.config.REMOVED``), which would otherwise make its
    checkpoints unreadable. Raises CheckpointError (missing, not YAML) or ConfigError (bad values)."""
    import yaml
    from dsv3 import config
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{run_dir}: config.yaml is missing (not a training run folder)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {first_line(e)}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{cfg_path} has no 'model' section (not a training run's config.yaml)")
    removed = getattr(config, "REMOVED", {})
    model = {k: v for k, v in model.items() if f"model.{k}" not in removed}
    return config.from_dict({"model": model, "data": {"seq_len": 1}}).model


def load_run_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> tuple[Transformer, str, str]:
    """Our training run folder (config.yaml + ckpt_*/model.safetensors) or one ckpt_* folder:
    (model, run folder, checkpoint folder) with the latest checkpoint's weights."""
    from dsv3.checkpoint.store import latest_checkpoint, load_model_weights
    path, run_dir = os.path.abspath(path), run_folder(path)
    if run_dir != path:
        ckpt = path
    else:
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"{path}: no ckpt_* checkpoint folder in this run")
    model = Transformer(run_model_config(run_dir)).eval()
    load_model_weights(ckpt, model)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model, run_dir, ckpt


def find_tokenizer_file(folder: str) -> Optional[str]:
    """tokenizer.json / tokenizer.model beside the weights (a Hugging Face folder), else the copy in a
    run folder that its corpus.json names (``tokenizer.file``, relative to the run folder, checked
    against ``tokenizer.file_sha256``), else the absolute ``tokenizer.source`` older runs recorded.
    A copy that no longer matches its sha256 is one CheckpointError."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    manifest = os.path.join(folder, "corpus.json")
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            tok = json.load(f).get("tokenizer")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        tok = None
    if not isinstance(tok, dict):
        return None
    rel, sha = tok.get("file"), tok.get("file_sha256")
    if isinstance(rel, str) and rel and not os.path.isabs(rel) and ".." not in rel.replace("\\", "/").split("/"):
        path = os.path.join(folder, rel)
        if os.path.isfile(path):
            _check_sha256(path, sha, manifest)
            return path
    source = tok.get("source")
    if isinstance(source, str) and source and os.path.isfile(source):
        return source
    return None


def _check_sha256(path: str, sha: object, manifest: str) -> None:
    import hashlib
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if isinstance(sha, str) and digest != sha:
        raise CheckpointError(f"{path} does not match the sha256 {manifest} records for it (edited or damaged); "
                              f"put back the tokenizer file the run trained with")


class _PlainTokenizer:
    """A tokenizer.json without the special tokens our data pipeline insists on."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer
        self.backend = HFTokenizer.from_file(path)
        self.eos_id = None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: Optional[str]):
    if path is None:
        return None
    from dsv3.data.tokenizer import load_tokenizer_file
    try:
        return load_tokenizer_file(path)
    except UserError:
        if path.endswith(".json"):
            return _PlainTokenizer(path)
        raise


def load_for_inference(path: str, dtype: torch.dtype = torch.float32, tokenizer_path: Optional[str] = None):
    """(model, tokenizer or None) from a Hugging Face checkpoint, a run folder or a ckpt_* folder."""
    if os.path.isfile(os.path.join(path, "config.json")):
        model, folder = load_hf_checkpoint(path, dtype), path
    else:
        model, folder, _ = load_run_checkpoint(path, dtype)
    return model, load_tokenizer(tokenizer_path or find_tokenizer_file(folder))


def export_run(run_dir: str, out_dir: str, fp8: bool = False, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> list[str]:
    """A training run's latest checkpoint as a Hugging Face checkpoint, with its tokenizer as
    tokenizer.json + tokenizer_config.json (or tokenizer.model) and its EOS id in config.json.
    ``out_dir`` must not overlap the run folder; an earlier export is replaced only with ``overwrite``."""
    check_out_dir(out_dir, [run_folder(run_dir)], overwrite)  # before the (slow) load
    model, folder, _ = load_run_checkpoint(run_dir)
    tok_file = find_tokenizer_file(folder)
    extra, copy, eos = {}, {}, None
    if tok_file is not None:
        tok = load_tokenizer(tok_file)
        eos = getattr(tok, "eos_id", None)
        if tok_file.endswith(".json"):
            with open(tok_file) as f:
                extra["tokenizer.json"] = f.read()
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.max_seq_len}
            if eos is not None:
                tok_cfg["eos_token"] = tok.backend.id_to_token(eos)
            extra["tokenizer_config.json"] = json.dumps(tok_cfg, indent=2) + "\n"
        else:
            copy["tokenizer.model"] = tok_file
    return save_hf_checkpoint(model, out_dir, dtype, fp8, max_shard_bytes, extra_files=extra, copy_files=copy,
                              eos_token_id=eos, overwrite=overwrite, input_dirs=(folder,),
                              written_by="python -m dsv3.checkpoint.hf export")


# ---------------------------------------------------------------------------------------------- CLI
def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    raise UserError(f"--max-shard-size {text!r}: expected bytes or a size such as 500MB or 5GB")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one UserError line (exit 2 through main), not usage + error."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def main(argv: Optional[list[str]] = None) -> int:
    from dsv3.checkpoint.hf_convert import convert
    p = OneLineParser(prog="python -m dsv3.checkpoint.hf", description="Hugging Face checkpoint conversion")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="convert or export; python -m dsv3.checkpoint.hf COMMAND --help for its flags")
    c = sub.add_parser("convert", help="BF16 <-> FP8, shard by shard")
    c.add_argument("src", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    c.add_argument("dst", help="output folder (new, or an earlier output of this command with --overwrite)")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--to-bf16", action="store_true", help="dequantise FP8 weights (the default)")
    mode.add_argument("--to-fp8", action="store_true", help="quantise the released set of weights to E4M3")
    c.add_argument("--max-shard-size", default="5GB", help="largest output shard: bytes or 500MB, 5GB (default 5GB)")
    e = sub.add_parser("export", help="a training run's latest checkpoint -> Hugging Face layout")
    e.add_argument("run_dir", help="training run folder (its latest checkpoint) or one of its ckpt_* folders")
    e.add_argument("out_dir", help="output folder (new, or an earlier output of this command with --overwrite)")
    e.add_argument("--fp8", action="store_true",
                   help="store the released set of weights as E4M3 with 128×128 weight_scale_inv blocks")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the unquantised tensors")
    e.add_argument("--max-shard-size", default="5GB", help="largest output shard: bytes or 500MB, 5GB (default 5GB)")
    for q in (c, e):
        q.add_argument("--overwrite", action="store_true",
                       help="replace an earlier output of this command (a folder holding its .dsv3-export marker)")
    try:
        args = p.parse_args(argv)
        size = parse_size(args.max_shard_size)
        if args.cmd == "convert":
            shards = convert(args.src, args.dst, "fp8" if args.to_fp8 else "bf16", size, overwrite=args.overwrite)
        else:
            dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
            shards = export_run(args.run_dir, args.out_dir, args.fp8, dtype, size, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # the temporary output folder is already removed
        return 130
    out = args.dst if args.cmd == "convert" else args.out_dir
    print(f"wrote {len(shards)} shard(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
