"""The sha256 manifests every checkpoint carries: each file written, fsynced and listed with its size and
sha256 (``file_entry``), the list read back and checked for shape (``read_json``, ``manifest_files``), and
each file checked against its entry before anything in it is parsed (``verify_file``). One-process
checkpoints (``dsv3.checkpoint.store``), sharded ones (``dsv3.checkpoint.sharded``) and their RNG states
(``dsv3.checkpoint.rng_state``) all use it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from dsv3.errors import CheckpointError

STATE, MANIFEST = "state.json", "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: str) -> dict:
    """The manifest entry of one written file: fsynced, then its size and sha256."""
    fsync_path(path)
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str) -> dict:
    """A checkpoint's JSON file as a dict; missing, unreadable or not an object → CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.dirname(path)} is not a complete checkpoint: "
                              f"{os.path.basename(path)} is missing")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path} is corrupted (not valid JSON)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is corrupted (expected a JSON object)")
    return obj


def manifest_files(where: str, files, required: Iterable[str] = ()) -> dict[str, dict]:
    """The ``files`` table of a manifest, checked for shape: {plain file name: {bytes: int, sha256: hex}}."""
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: the manifest has no 'files' table")
    for name, info in files.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{where}: the manifest names an invalid file {name!r}")
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: manifest entry for {name} is malformed")
        for key, kind in (("bytes", int), ("sha256", str)):
            if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
                raise CheckpointError(f"{where}: manifest entry for {name} has no valid '{key}'")
    missing = [n for n in required if n not in files]
    if missing:
        raise CheckpointError(f"{where}: the manifest does not list {missing[0]}")
    return files


def verify_file(folder: str, name: str, info: dict, data: Optional[bytes] = None) -> None:
    """One file (or its already-read bytes) against its manifest entry."""
    fpath = os.path.join(folder, name)
    if data is None and not os.path.isfile(fpath):
        raise CheckpointError(f"checkpoint file {fpath} is missing")
    size = len(data) if data is not None else os.path.getsize(fpath)
    if size != info["bytes"]:
        raise CheckpointError(f"checkpoint file {fpath} is truncated or corrupted "
                              f"({size} bytes, expected {info['bytes']})")
    digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256(fpath)
    if digest != info["sha256"]:
        raise CheckpointError(f"checkpoint file {fpath} is corrupted (sha256 mismatch)")
