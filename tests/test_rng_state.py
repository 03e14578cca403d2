"""RNG state in one-process checkpoints (issue 17 item 7): the CPU generator's and, on CUDA, every
device's (``torch.cuda.get_rng_state_all``) are saved and restored. On this CPU machine the CUDA branch
runs against fakes of ``torch.cuda`` that hand out known states and record what they are given back.
(Sharded checkpoints' per-rank states: tests/test_device_audit.py.)"""
from __future__ import annotations

import pytest
import torch

from dsv3.checkpoint import rng_state
from dsv3.checkpoint.store import load_checkpoint, save_checkpoint
from dsv3.errors import CheckpointError


class FakeCuda:
    """``n`` devices whose RNG states are distinct byte patterns; ``set_to`` records restores."""

    def __init__(self, monkeypatch, n: int):
        self.states = [torch.arange(16, dtype=torch.uint8) * (i + 1) for i in range(n)]
        self.set_to: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.set_to.append(list(states)))


def _save(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(123)
    path = save_checkpoint(str(tmp_path), 7, model, opt, dict(tokens=0, sampler={}))
    return path, model, opt


def test_cpu_rng_round_trips_without_cuda(tmp_path):
    path, model, opt = _save(tmp_path)
    expected = torch.rand(5)          # what the generator gives right after the checkpoint
    torch.rand(100)                   # moves on
    load_checkpoint(path, model, opt)
    assert torch.equal(torch.rand(5), expected)
    assert "cuda" not in torch.load(f"{path}/rng.pt", weights_only=True)   # no CUDA here: nothing to keep


def test_cuda_rng_of_every_device_saved_and_restored(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, 2)
    original = [s.clone() for s in cuda.states]
    path, model, opt = _save(tmp_path)
    saved = torch.load(f"{path}/rng.pt", weights_only=True)
    assert len(saved["cuda"]) == 2 and all(torch.equal(a, b) for a, b in zip(saved["cuda"], cuda.states))
    expected = torch.rand(5)
    cuda.states = [torch.zeros(16, dtype=torch.uint8)] * 2   # the generators move on
    load_checkpoint(path, model, opt)
    assert torch.equal(torch.rand(5), expected)                # CPU restored with CUDA
    assert len(cuda.set_to) == 1 and len(cuda.set_to[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(cuda.set_to[0], original))


def test_restore_on_fewer_devices_and_without_cuda(monkeypatch):
    state = {"torch": torch.get_rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]}
    cuda = FakeCuda(monkeypatch, 2)
    rng_state.restore(state, "x")
    assert [int(s[0]) for s in cuda.set_to[0]] == [0, 1]       # the devices both sides have
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rng_state.restore(state, "x")                               # a CPU machine keeps the CPU part only
    assert len(cuda.set_to) == 1


@pytest.mark.parametrize("bad", [None, {"cuda": []}, {"torch": torch.zeros(4)},
                                 {"torch": torch.get_rng_state(), "cuda": [torch.zeros(2)]},
                                 {"torch": torch.get_rng_state(), "cuda": "x"}])
def test_malformed_rng_state_is_a_checkpoint_error(bad):
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="not an RNG state"):
        rng_state.restore(bad, "ckpt/rng.pt")
    assert torch.equal(torch.get_rng_state(), before)
