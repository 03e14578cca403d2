"""torch.distributed.checkpoint (DCP) without unpickling anything a checkpoint's author controls.

DCP's ``FileSystemReader.read_metadata`` runs ``pickle.load`` on the ``.metadata`` file, and its
``DefaultLoadPlanner.load_bytes`` runs ``torch.load(weights_only=False)`` on non-tensor entries: a
planted ``__reduce__`` in either executes code on every rank that resumes. Here:

- ``read_metadata(path, data, files)`` unpickles ``.metadata`` with ``_DcpUnpickler``, whose
  ``find_class`` resolves exactly the classes ``dcp.save`` writes (listed in ``_ALLOWED``: DCP's
  metadata dataclasses, ``torch.Size``, dtypes/layouts, ``pathlib`` paths, read from torch 2.13's
  pickles and unchanged since 2.5) and refuses anything else with a ``CheckpointError``. None of
  those classes runs code when built. The result is then checked: every storage entry points at a
  plain file name the sha256 manifest lists, with no stream transforms.
- ``SafeReader`` serves that pre-validated ``Metadata`` to ``dcp.load`` (there is no fallback to
  rank-local ``__N.metadata`` files), ``SafePlanner`` refuses non-tensor (pickled) entries; tensor
  data is read by DCP with ``torch.load(weights_only=True)``.
- ``CheckpointWriter`` is DCP's ``FileSystemWriter`` with the ``ckpt_write`` fault point after this
  rank's data file is written (``DSV3_FAULT=ckpt_write:STEP[:RANK] DSV3_FAULT_ERRNO=ENOSPC``).

A torch that pickles a class not on the list is refused with a message naming it (never retried
with plain pickle); add the class to ``_ALLOWED`` after checking that building it runs no code.
"""
from __future__ import annotations

import importlib
import io
import pickle
from typing import Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                   TensorStorageMetadata)

from dsv3.errors import CheckpointError
from dsv3.faults import fault_point

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
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                pass   # a class this torch/python lacks: refused below
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.where}: refusing to unpickle '{module}.{name}': not one of the classes "
            f"torch.distributed.checkpoint writes (torch {torch.__version__}); the checkpoint was "
            f"tampered with or written by an incompatible torch")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.where}: refusing a persistent reference in DCP metadata")


def read_metadata(where: str, data: bytes, files: Iterable[str]) -> Metadata:
    """``.metadata`` bytes (already checked against the manifest) → DCP ``Metadata``, every storage
    entry pointing into one of ``files``. Raises CheckpointError on anything else."""
    try:
        md = _DcpUnpickler(data, where).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is a corrupted checkpoint
        raise CheckpointError(f"{where} is not valid DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{where} is not valid DCP metadata (got {type(md).__name__})")
    for key, value in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(value, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CheckpointError(f"{where}: malformed entry {key!r} in DCP metadata")
    allowed = set(files)
    for index, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or not isinstance(rel, str) or rel not in allowed \
                or "/" in rel or "\\" in rel or rel in (".", "..") \
                or not isinstance(info.offset, int) or not isinstance(info.length, int) \
                or info.offset < 0 or info.length < 0 or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{where}: storage entry for {getattr(index, 'fqn', index)!r} points "
                                  f"outside the checkpoint's manifest ({rel!r})")
    return md


class SafeReader(FileSystemReader):
    """``FileSystemReader`` that hands DCP the metadata ``read_metadata`` validated."""

    def __init__(self, path: str, metadata: Metadata):
        super().__init__(path)
        self._validated = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: rank-local DCP metadata is not supported")
        return self._validated


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner minus ``torch.load(weights_only=False)`` of non-tensor entries."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"refusing to unpickle the non-tensor entry '{read_item.dest_index.fqn}' "
                              f"of a DCP checkpoint (dsv3 writes none)")


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
