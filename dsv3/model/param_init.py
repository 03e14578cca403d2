"""Per-parameter seeded initialisation, so a rank can build the model on the meta device and materialise
only what it holds (its pipeline stages, its experts) with exactly the values the whole model gets.

Every parameter carries its full-model name (``init_name``), how it starts (``init_kind``: "normal" with
``init_std`` — report §4.2, N(0, 0.006) — or "ones" for RMSNorm), and for routed-expert tensors the
logical ids of the experts along dim 0 (``init_experts``). Its values come from a CPU generator seeded
by (seed, name[, expert id]): independent of the device, of the construction order and of which other
parameters exist, so an expert-parallel shard or a pipeline stage equals the same slice of the whole
model bitwise.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
from torch import nn


def tag_parameter(p: nn.Parameter, name: str, kind: str, std: float = 0.0,
                  experts: Optional[Sequence[int]] = None) -> None:
    p.init_name, p.init_kind, p.init_std = name, kind, std
    p.init_experts = list(experts) if experts is not None else None


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(key.encode())) % (2 ** 63))
    return g


@torch.no_grad()
def init_parameter_(p: torch.Tensor, seed: int) -> None:
    """Fills ``p`` (any device) from its tags; a parameter without tags is an error (nothing is left
    uninitialised by accident)."""
    kind = getattr(p, "init_kind", None)
    if kind == "ones":
        p.fill_(1.0)
    elif kind == "zeros":
        p.zero_()
    elif kind == "normal":
        if p.init_experts is not None:     # one stream per expert: a shard is the same slice of the whole
            for i, e in enumerate(p.init_experts):
                v = torch.empty(p.shape[1:], dtype=torch.float32).normal_(0.0, p.init_std,
                                                                          generator=_generator(seed, f"{p.init_name}[{e}]"))
                p[i].copy_(v)
        else:
            v = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, p.init_std, generator=_generator(seed, p.init_name))
            p.copy_(v)
    else:
        raise ValueError(f"parameter {getattr(p, 'init_name', '?')} of shape {tuple(p.shape)} has no init tag")


def materialize_(root: nn.Module, device: torch.device, seed: int) -> int:
    """Replaces every meta parameter and buffer reachable from ``root`` by a real one on ``device``:
    parameters initialised from their tags, buffers zeroed, then each module's ``init_buffers_`` (RoPE
    tables) run. A tensor shared by several modules stays one tensor. Returns the elements allocated."""
    memo: dict[int, torch.Tensor] = {}
    allocated = 0
    for mod in root.modules():
        for slot in ("_parameters", "_buffers"):
            table = getattr(mod, slot)
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in memo:
                    real = torch.empty(t.shape, dtype=t.dtype, device=device)
                    if slot == "_parameters":
                        real = nn.Parameter(real, requires_grad=t.requires_grad)
                        real.__dict__.update(t.__dict__)       # tags, expert_parallel
                        init_parameter_(real, seed)
                    else:
                        real.zero_()
                    memo[id(t)] = real
                    allocated += t.numel()
                table[name] = memo[id(t)]
    for mod in root.modules():
        fn = getattr(mod, "init_buffers_", None)
        if fn is not None:
            fn()
    return allocated


def materialize_own_buffers_(module: nn.Module, device: torch.device) -> None:
    """Allocates ``module``'s own meta buffers (not its children's) and runs its ``init_buffers_``: the
    tables a pipeline's stages share with the model (RoPE), before the stages are cut from it."""
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    fn = getattr(module, "init_buffers_", None)
    if fn is not None:
        fn()
