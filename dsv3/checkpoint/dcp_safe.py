"""torch.distributed.checkpoint (DCP) without unpickling anything a checkpoint's author controls.

DCP's ``FileSystemReader.read_metadata`` runs ``pickle.load`` on the ``.metadata`` file, and its
``DefaultLoadPlanner.load_bytes`` runs ``torch.load(weights_only=False)`` on non-tensor entries: a
planted ``__reduce__`` in either executes code on every rank that resumes. Here:

- ``read_metadata(path, data, files)`` unpickles ``.metadata`` with ``_DcpUnpickler``, whose
  ``find_class`` resolves exactly the classes ``dcp.save`` writes (listed in ``_ALLOWED``: DCP's
  metadata dataclasses, ``torch.Size``, dtypes/layouts, ``pathlib`` paths: what torch 2.13's pickles
  hold, tested on 2.13 only) and refuses anything else with a ``CheckpointError``. None of
  those classes runs code when built. The result is then checked: every storage entry points at a
  plain file name the sha256 manifest lists, with no stream transforms.
- ``SafeReader`` serves that pre-validated ``Metadata`` to ``dcp.load`` (there is no fallback to
  rank-local ``__N.metadata`` files) and reads tensor data itself with
  ``torch.load(weights_only=True)`` (whatever the torch version's default), refusing non-tensor
  (pickled) entries.
- ``CheckpointWriter`` is DCP's ``FileSystemWriter`` with the ``ckpt_write`` fault point after this
  rank's data file is written (``DSV3_FAULT=ckpt_write:STEP[:RANK] DSV3_FAULT_ERRNO=ENOSPC``).

A torch that pickles a class not on the list is refused with a message naming it (never retried
with plain pickle); add the class to ``_ALLOWED`` after checking that building it runs no code.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                   TensorStorageMetadata)

from dsv3.errors import CheckpointError
from dsv3.training.faults import fault_point, first_line

_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_META, "Metadata"), (_META, "MetadataIndex"), (_META, "TensorStorageMetadata"),
    (_META, "BytesStorageMetadata"), (_META, "ChunkStorageMetadata"), (_META, "TensorProperties"),
    (_META, "StorageMeta"), (_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),   # (_get_layout, ("torch.strided",)): a dict lookup
    *((mod, cls) for mod in ("pathlib", "pathlib._local")
      for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)   # torch.float32 etc. as plain globals


class _DcpUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                pass   # a class this torch/python lacks: refused below
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source}: refusing to unpickle '{module}.{name}': not one of the classes "
            f"torch.distributed.checkpoint writes (torch {torch.__version__}); the checkpoint was "
            f"tampered with or written by an incompatible torch")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: refusing a persistent reference in DCP metadata")


def read_metadata(source: str, data: bytes, files: Iterable[str]) -> Metadata:
    """``.metadata`` bytes (already checked against the manifest) → DCP ``Metadata``, every storage
    entry pointing into one of ``files``. Raises CheckpointError on anything else."""
    try:
        md = _DcpUnpickler(data, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is a corrupted checkpoint
        raise CheckpointError(f"{source} is not valid DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{source} is not valid DCP metadata (got {type(md).__name__})")
    for key, value in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(value, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CheckpointError(f"{source}: malformed entry {key!r} in DCP metadata")
    allowed = set(files)
    for index, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or not isinstance(rel, str) or rel not in allowed \
                or "/" in rel or "\\" in rel or rel in (".", "..") \
                or not isinstance(info.offset, int) or not isinstance(info.length, int) \
                or info.offset < 0 or info.length < 0 or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{source}: storage entry for {getattr(index, 'fqn', index)!r} points "
                                  f"outside the checkpoint's manifest ({rel!r})")
    return md


class SafeReader(FileSystemReader):
    """``FileSystemReader`` that hands DCP the metadata ``read_metadata`` validated, and reads tensor
    data itself with ``torch.load(weights_only=True)`` (torch < 2.6 defaults to False, and DCP's own
    ``read_data`` changed across versions); non-tensor (pickled) entries are refused."""

    def __init__(self, path: str, metadata: Metadata):
        super().__init__(path)
        self._root = str(path)
        self._validated = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self._root}: rank-local DCP metadata is not supported")
        return self._validated

    def read_data(self, plan, planner) -> Future:
        by_file: dict[str, list] = {}
        for req in plan.items:
            by_file.setdefault(self._validated.storage_data[req.storage_index].relative_path, []).append(req)
        for rel, reqs in by_file.items():
            fpath = os.path.join(self._root, rel)
            with open(fpath, "rb") as f:
                for req in reqs:
                    if req.type == LoadItemType.BYTE_IO:
                        raise CheckpointError(f"refusing to unpickle the non-tensor entry '{req.dest_index.fqn}' "
                                              f"of {self._root} (dsv3 writes none)")
                    info = self._validated.storage_data[req.storage_index]
                    f.seek(info.offset)
                    blob = f.read(info.length)
                    try:
                        tensor = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                    except Exception as e:  # noqa: BLE001 - refused pickle or corrupted bytes
                        raise CheckpointError(f"{fpath}: refusing entry '{req.dest_index.fqn}', it is not a plain "
                                              f"tensor ({type(e).__name__}: {first_line(e)})") from None
                    if not torch.is_tensor(tensor):
                        raise CheckpointError(f"{fpath}: entry '{req.dest_index.fqn}' is not a tensor")
                    for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                        tensor = tensor.narrow(dim, offset, length)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise CheckpointError(f"{fpath}: entry '{req.dest_index.fqn}' has shape {tuple(tensor.shape)}, "
                                              f"expected {tuple(target.shape)}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut


class CheckpointWriter(FileSystemWriter):
    """DCP's FileSystemWriter with the ``ckpt_write`` fault point after this rank's data is on disk."""

    def __init__(self, path: str, step: int):
        super().__init__(path)
        self._step = step

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        fut.wait()
        fault_point("ckpt_write", self._step)
        return fut
