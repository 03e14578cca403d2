"""What the expert all-to-all puts on the wire (SPEC §5): every row of a hop as one byte buffer (gloo has
no float8, so everything travels as uint8: activation or E4M3 bytes and scales, gate weights, expert
slots), and one hop of a route (its group, link kinds and plan)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from parallel.routing_plan import HopPlan


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise concatenation of (S, ...) tensors of any dtype as raw bytes: (S, B) uint8."""
    S = parts[0].shape[0]
    return torch.cat([_dense(p).view(torch.uint8).reshape(S, _row_bytes(p)) for p in parts], dim=1)


def _dense(p: torch.Tensor) -> torch.Tensor:
    """Row-major storage (an empty or expanded grad may report contiguous with stride 0)."""
    p = p.contiguous()
    if p.dim() and p.stride(-1) != 1:
        p = torch.empty(p.shape, dtype=p.dtype, device=p.device).copy_(p)
    return p


def _row_bytes(p: torch.Tensor) -> int:
    n = p.element_size()
    for s in p.shape[1:]:
        n *= s
    return n


def _unpack(buf: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    out, col = [], 0
    for dtype, tail in specs:
        n = torch.empty((), dtype=dtype).element_size()
        for s in tail:
            n *= s
        out.append(buf[:, col:col + n].contiguous().view(dtype).reshape(buf.shape[0], *tail))
        col += n
    return out


@dataclass
class Hop:
    """One collective of a route: its group, the link kind to each peer, and this rank's plan."""
    group: object
    links: list[str]                 # per group rank: self / intra / inter
    plan: Optional[HopPlan] = None
    n_in: int = 0                    # rows of the table the hop sends from
    send_counts: list[int] = field(default_factory=list)
    recv_counts: list[int] = field(default_factory=list)
