"""Sharded checkpoints read on one process: the format ``parallel.dist_checkpoint.save_sharded`` writes
(torch.distributed.checkpoint files, ``meta.json``, one ``rng_RRRRR.pt`` per rank, all listed with their
sha256 in ``manifest.json``), verified before anything in it is parsed (``verify_sharded``), and loaded
whole into one model and its optimizer (``load_sharded_into_model``) without a process group. The
multi-rank save and load (each rank its ZeRO shards) are ``parallel.dist_checkpoint``'s; it reads through
the functions here. Nothing is unpickled beyond DCP's own metadata classes (``dsv3/checkpoint/dcp_safe.py``).
"""
from __future__ import annotations

import inspect
import io
import json
import os
import re
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dsv3.checkpoint import rng_state
from dsv3.checkpoint.dcp_safe import SafeReader, read_metadata
from dsv3.checkpoint.manifest import MANIFEST, manifest_files, read_json, verify_file
from dsv3.errors import CheckpointError
from dsv3.model.transformer import Transformer
from dsv3.training.faults import first_line

RNG_FILE = re.compile(r"^rng_\d{5}\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")      # AdamW's moments, stored beside each parameter as NAME.exp_avg ...
METADATA, META = ".metadata", "meta.json"
FORMAT = "dsv3-dcp"
FORMAT_VERSION = 1
_HAS_NO_DIST = "no_dist" in inspect.signature(dcp.load).parameters   # older torch infers it


def unwrap_dcp_error(e: BaseException) -> tuple[BaseException, str]:
    """DCP reports failures as CheckpointException({rank: (exception, traceback)}): the lowest rank's."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = min(e.failures.items(), key=lambda kv: kv[0])
        return unwrap_dcp_error(inner)[0], f"rank {rank}: "
    return e, ""


def verify_sharded(path: str, rank: int = 0, world: int = 1):
    """Check a sharded checkpoint before anything in it is parsed: manifest.json, then the files
    (this rank's share of the data files; ``.metadata`` and ``meta.json`` on every rank, hashed from the
    bytes that are then parsed). Returns (validated DCP Metadata, meta dict). Raises CheckpointError."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint folder at {path}")
    manifest = read_json(mpath)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a dsv3 sharded checkpoint manifest")
    files = manifest_files(mpath, manifest.get("files"), required=(METADATA, META))
    data_files = sorted(n for n in files if n not in (METADATA, META))
    for name in data_files[rank::world]:
        verify_file(path, name, files[name])
    data_files = [n for n in data_files if not RNG_FILE.match(n)]   # DCP's own files: RNG states are no storage
    blobs = {}
    for name in (METADATA, META):
        try:
            with open(os.path.join(path, name), "rb") as f:
                blobs[name] = f.read(files[name]["bytes"] + 1)
        except OSError as e:
            raise CheckpointError(f"cannot read {os.path.join(path, name)}: {e.strerror or e}") from None
        verify_file(path, name, files[name], data=blobs[name])
    try:
        meta = json.loads(blobs[META].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{os.path.join(path, META)} is corrupted (not valid JSON)") from None
    for key, kind in (("step", int), ("opt_step", int), ("tokens", int), ("sampler", dict)):
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{os.path.join(path, META)} is corrupted: no valid '{key}' entry")
    return read_metadata(os.path.join(path, METADATA), blobs[METADATA], data_files), meta


def dcp_load(path: str, sd: dict, metadata, no_dist: bool) -> None:
    try:
        with warnings.catch_warnings():   # no_dist=True is what we mean, not a fallback to warn about
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, storage_reader=SafeReader(path, metadata), **({"no_dist": no_dist} if _HAS_NO_DIST else {}))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises it on every rank
        inner, who = unwrap_dcp_error(e)
        if isinstance(inner, CheckpointError):
            raise CheckpointError(first_line(inner)) from None
        raise CheckpointError(f"cannot load sharded checkpoint {path} into this model/layout "
                              f"({who}{first_line(inner)})") from None


def load_sharded_into_model(path: str, model: Transformer, optimizer=None) -> dict:
    """One process: the whole model, its ``dsv3.training.optim.AdamW`` state (unless ``optimizer`` is None) and
    biases from a sharded checkpoint, every file verified first. Raises CheckpointError."""
    metadata, meta = verify_sharded(path)
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    biases = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    check_names(path, metadata, {n: t.numel() for n, t in (*names.items(), *biases.items())})
    sd: dict = {}
    for n, p in names.items():   # the dtypes the parallel run saved: masters ≥ FP32, moments as AdamW keeps them
        sd[n] = torch.empty(p.numel(), dtype=torch.promote_types(p.dtype, torch.float32))
        if optimizer is not None:
            for m in MOMENTS:
                sd[f"{n}.{m}"] = torch.empty(p.numel(), dtype=optimizer.moment_dtype_of(p))
    for n, b in biases.items():
        sd[n] = torch.empty(b.shape, dtype=torch.float32)
    dcp_load(path, sd, metadata, no_dist=True)
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(sd[n].view_as(p))
            if optimizer is not None and meta["opt_step"] > 0:
                optimizer.state[p] = dict(step=torch.tensor(float(meta["opt_step"])),
                                          **{m: sd[f"{n}.{m}"].view_as(p).to(optimizer.moment_dtype_of(p)) for m in MOMENTS})
        for n, b in biases.items():
            b.copy_(sd[n])
    return meta


def check_names(path: str, metadata, numel: dict[str, int]) -> None:
    """The checkpoint stores exactly the model's parameters and biases (moments aside), each with the
    model's element count: else one CheckpointError naming the first offender (a different config)."""
    stored = {k: int(torch.Size(v.size).numel()) for k, v in metadata.state_dict_metadata.items()
              if hasattr(v, "size") and not k.endswith(tuple("." + m for m in MOMENTS))}
    missing, unknown = sorted(set(numel) - set(stored)), sorted(set(stored) - set(numel))
    if missing or unknown:
        what = f"missing tensor '{missing[0]}'" if missing else f"unknown tensor '{unknown[0]}'"
        raise CheckpointError(f"{path} does not match the model config: {what} "
                              f"({len(missing)} missing, {len(unknown)} unknown)")
    for k, n in numel.items():
        if stored[k] != n:
            raise CheckpointError(f"{path}: tensor '{k}' has {stored[k]} elements, the model expects {n}")


def read_rank(path: str, rank: int, world: int):
    """A sharded checkpoint's ``rng_RRRRR.pt`` of this rank: (state, where), its bytes checked against
    the folder's manifest, loaded with ``weights_only`` and checked; None when the checkpoint was
    written by another number of ranks (their streams do not map onto this run's) or holds none."""
    mpath = os.path.join(path, MANIFEST)
    manifest = read_json(mpath)
    files = manifest_files(mpath, manifest.get("files"))
    name = f"rng_{rank:05d}.pt"
    if manifest.get("world") != world or name not in files:
        return None
    where = os.path.join(path, name)
    try:
        with open(where, "rb") as f:
            data = f.read(files[name]["bytes"] + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {where}: {e.strerror or e}") from None
    verify_file(path, name, files[name], data=data)
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - a refused pickle or corrupted bytes: one clear line
        raise CheckpointError(f"{where}: refusing to load it, not a plain RNG state ({first_line(e)})") from None
    rng_state.check(state, where)
    return state, where
