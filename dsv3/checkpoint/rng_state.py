"""The random-number generators' state as a checkpoint keeps it: the CPU generator's and, where CUDA
is available, every visible device's (``torch.cuda.get_rng_state_all``). Stored with ``torch.save`` as a
dict of uint8 tensors and lists of them only, so it reads back with ``torch.load(weights_only=True)``
(no pickle of a user-writable file is executed); the caller checks the file against its manifest first.

    torch.save(capture(), path)
    restore(torch.load(path, weights_only=True), where=path)
"""
from __future__ import annotations

import torch

from dsv3.errors import CheckpointError


def capture() -> dict:
    """{"torch": CPU state, "cuda": [state of device 0, 1, ...]} (no "cuda" entry without CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def _line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _is_state(t) -> bool:
    return torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1


def check(state, where: str) -> None:
    """CheckpointError unless ``state`` has the layout ``capture`` writes."""
    cuda = state.get("cuda", []) if isinstance(state, dict) else None
    if not (isinstance(state, dict) and _is_state(state.get("torch")) and isinstance(cuda, list)
            and all(_is_state(s) for s in cuda)):
        raise CheckpointError(f"{where} is corrupted: not an RNG state (uint8 tensors 'torch' and 'cuda')")


def restore(state, where: str) -> None:
    """Sets the CPU generator and, with CUDA available, the devices that both the checkpoint and this
    machine have (a checkpoint written without CUDA leaves the CUDA generators as they are). Raises
    CheckpointError for anything but the layout ``capture`` writes."""
    check(state, where)
    cuda = state.get("cuda", [])
    try:
        torch.set_rng_state(state["torch"])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    except (RuntimeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where} is corrupted: {_line(e)}") from None
