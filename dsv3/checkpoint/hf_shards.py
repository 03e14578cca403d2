"""Sharded safetensors checkpoints read and written one tensor (or one row block) at a time.

Tensors are read with plain positioned reads, not memory maps, so converting a checkpoint of any size
holds only the tensor in flight (a mapped shard would count towards the process's resident memory).
Files are written header first, then each tensor's bytes as they are produced, into a temporary
folder beside the output that is renamed into place when complete: nothing is half-written.

An output folder is never allowed to lose data: every folder written here carries a ``.dsv3-export``
marker (who wrote it, from what); an existing output is replaced only when it is empty, or carries that
marker and the caller passed ``overwrite`` (the CLIs' ``--overwrite``), and never when it overlaps an
input folder (the same folder, inside it or around it, symlinks resolved). The old folder is removed
only after the new one is complete and renamed into place.

Layout (the Hugging Face one): ``model.safetensors`` alone, or ``model-0000k-of-0000n.safetensors``
shards and ``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map": {name: file}}).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from dsv3.errors import CheckpointError, UserError
from dsv3.training.faults import fault_point

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MARKER = ".dsv3-export"  # in every folder write_checkpoint creates: replaceable with overwrite=True

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """The header of one .safetensors file, validated against its size; tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): no safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise CheckpointError(f"{path} is truncated: its header needs {8 + header_len} bytes, the file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path} is corrupted: its safetensors header is not valid JSON") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple, int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor '{name}' has an unsupported or malformed header entry {info}") from None
            if end - start != nbytes(dtype, shape):
                raise CheckpointError(f"{path} is corrupted: tensor '{name}' of shape {list(shape)} "
                                      f"spans {end - start} bytes, expected {nbytes(dtype, shape)}")
            if self.data_start + end > size:
                raise CheckpointError(f"{path} is truncated: tensor '{name}' needs bytes up to "
                                      f"{self.data_start + end}, the file has {size}")
            self.entries[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, row_start: int = 0, row_end: Optional[int] = None) -> torch.Tensor:
        """The tensor, or rows [row_start, row_end) of its first dimension, as a new CPU tensor."""
        dtype, shape, start, end = self.entries[name]
        if not shape:
            row_start, row_end, out_shape = 0, 1, ()
        else:
            row_end = shape[0] if row_end is None else min(row_end, shape[0])
            out_shape = (max(row_end - row_start, 0),) + shape[1:]
        row_bytes = nbytes(dtype, shape[1:]) if shape else end - start
        n = max(row_end - row_start, 0) * row_bytes
        if n == 0:
            return torch.empty(out_shape, dtype=dtype)
        buf = bytearray(n)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start + row_start * row_bytes)
            if f.readinto(buf) != n:
                raise CheckpointError(f"{self.path} is truncated: tensor '{name}' could not be read")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(out_shape)


class CheckpointReader:
    """A Hugging Face checkpoint folder: every shard's header is read and validated up front."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path} is corrupted: expected JSON with a 'weight_map'") from None
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            weight_map = None
        else:
            raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} found")
        self.files: dict[str, SafetensorsFile] = {}
        if weight_map is None:
            self.files[SINGLE_NAME] = SafetensorsFile(os.path.join(path, SINGLE_NAME))
            weight_map = {k: SINGLE_NAME for k in self.files[SINGLE_NAME].keys()}
        for name, file in weight_map.items():
            if file not in self.files:
                fpath = os.path.join(path, file)
                if not os.path.isfile(fpath):
                    raise CheckpointError(f"shard {fpath} is missing (listed in {INDEX_NAME} for tensor '{name}')")
                self.files[file] = SafetensorsFile(fpath)
            if name not in self.files[file].entries:
                raise CheckpointError(f"tensor '{name}' is listed in {INDEX_NAME} under {file} but that shard does not hold it")
        self.weight_map: dict[str, str] = dict(weight_map)

    def names(self) -> list[str]:
        """Every tensor name, shard by shard in file order, each shard's tensors in storage order."""
        per_file: dict[str, list[str]] = {file: [] for file in self.files}
        for name, file in self.weight_map.items():
            per_file[file].append(name)
        return [n for file, names in per_file.items() for n in sorted(names, key=lambda n: self.files[file].entries[n][2])]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple:
        return self.files[self.weight_map[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.files[self.weight_map[name]].entries[name][0]

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]

    def read(self, name: str, row_start: int = 0, row_end: Optional[int] = None) -> torch.Tensor:
        return self.files[self.weight_map[name]].read(name, row_start, row_end)

    def shard_bytes(self) -> int:
        return max(os.path.getsize(sf.path) for sf in self.files.values())


# --------------------------------------------------------------------------------------- writing
Chunks = Union[torch.Tensor, Iterable[torch.Tensor]]


def plan_shards(entries: list[tuple[str, torch.dtype, tuple]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of entries per shard, in order; a shard closes before it would exceed max_shard_bytes."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        n = nbytes(dtype, shape)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards if shards[0] else []


def _write_file(path: str, entries: list[tuple[str, torch.dtype, tuple]], produce: Callable[[str], Chunks]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            chunks = produce(name)
            written = 0
            for chunk in ([chunks] if isinstance(chunks, torch.Tensor) else chunks):
                if chunk.dtype != dtype:
                    raise ValueError(f"tensor '{name}': produced {chunk.dtype}, planned {dtype}")
                data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != nbytes(dtype, shape):
                raise ValueError(f"tensor '{name}': produced {written} bytes, planned {nbytes(dtype, shape)} {list(shape)}")
        f.flush()
        os.fsync(f.fileno())


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_out_dir(out_dir: str, input_dirs: Iterable[str] = (), overwrite: bool = False) -> None:
    """Raise a UserError unless writing ``out_dir`` loses nothing: it does not overlap any of
    ``input_dirs`` (symlinks resolved), and it is absent, empty, or an earlier output of ours (it holds
    the MARKER file) with ``overwrite`` set."""
    if os.path.islink(out_dir):
        raise UserError(f"output {out_dir} is a symbolic link: give the folder itself ({os.path.realpath(out_dir)})")
    out = os.path.realpath(out_dir)
    for src in input_dirs:
        src_real = os.path.realpath(src)
        if out == src_real:
            raise UserError(f"output {out_dir} is the input folder itself: give a new folder")
        if _inside(out, src_real):
            raise UserError(f"output {out_dir} is inside the input folder {src}: give a folder outside it")
        if _inside(src_real, out):
            raise UserError(f"output {out_dir} contains the input {src}: give a folder that does not hold it")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise UserError(f"output {out_dir} exists and is not a folder: give a new folder")
    try:
        entries = os.listdir(out_dir)
    except OSError as e:
        raise UserError(f"output {out_dir} cannot be read ({e.strerror}): give a new folder") from None
    if not entries:
        return
    if MARKER not in entries:
        raise UserError(f"output {out_dir} is not empty and was not written by dsv3 (no {MARKER} file): "
                        f"give a new or empty folder; nothing was changed")
    if not overwrite:
        raise UserError(f"output {out_dir} holds an earlier dsv3 export: pass --overwrite to replace it")


def marker_text(written_by: str, input_dirs: Iterable[str] = ()) -> str:
    return json.dumps({"written_by": written_by, "inputs": [os.path.realpath(s) for s in input_dirs],
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n"


def write_checkpoint(out_dir: str, entries: list[tuple[str, torch.dtype, tuple]], produce: Callable[[str], Chunks],
                     max_shard_bytes: int = 5 << 30, extra_files: Optional[dict[str, str]] = None,
                     copy_files: Optional[dict[str, str]] = None, overwrite: bool = False,
                     input_dirs: Iterable[str] = (), written_by: str = "dsv3.checkpoint.hf_shards.write_checkpoint") -> list[str]:
    """Write a sharded checkpoint atomically. ``entries``: (name, dtype, shape) in storage order;
    ``produce(name)`` returns the tensor, or an iterator of row blocks whose concatenation is it,
    called once per tensor in that order. ``extra_files``: name -> text (config.json, …);
    ``copy_files``: name -> path of a file copied beside the weights (tokenizers). ``out_dir`` is
    checked by ``check_out_dir(out_dir, input_dirs, overwrite)`` first. Returns the shard paths."""
    input_dirs = list(input_dirs)
    check_out_dir(out_dir, input_dirs, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(os.path.abspath(out_dir))}_{os.getpid()}")
    old = f"{tmp}.old"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover: this name holds our pid
    os.makedirs(tmp)
    swapped = False
    try:
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(marker_text(written_by, input_dirs))
        shards = plan_shards(entries, max_shard_bytes)
        names = [SINGLE_NAME] if len(shards) == 1 else [
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map, total = {}, 0
        for k, (file, idx) in enumerate(zip(names, shards)):
            part = [entries[i] for i in idx]
            _write_file(os.path.join(tmp, file), part, produce)
            for name, dtype, shape in part:
                weight_map[name] = file
                total += nbytes(dtype, shape)
            fault_point("hf_shard", k + 1)  # DSV3_FAULT=hf_shard:k: shard k written, the rest not
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        for name, src in (copy_files or {}).items():
            shutil.copy2(src, os.path.join(tmp, name))
        check_out_dir(out_dir, input_dirs, overwrite)  # still ours to replace after the (long) write
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            os.rename(out_dir, old)  # a marked earlier output: kept until the new one is in place
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
        else:
            os.rename(tmp, out_dir)  # replaces an empty folder in one step
        swapped = True
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if swapped:
            shutil.rmtree(old, ignore_errors=True)
        raise
    return [os.path.join(out_dir, n) for n in names]


def row_blocks(n_rows: int, rows_per_block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, max(n_rows, 1), rows_per_block):
        yield start, min(start + rows_per_block, n_rows)
