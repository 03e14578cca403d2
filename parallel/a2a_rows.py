"""What the expert all-to-all puts on the wire (report §3.2.2): every row of a hop as one byte buffer (gloo has
no float8, so everything travels as uint8: activation or E4M3 bytes and scales, gate weights, expert
slots), and one hop of a route (its group, link kinds and plan). FP8 rows (report §3.3.3): E4M3 bytes and
one power-of-2 fp32 scale per 1×128 tile — the dispatched activations and, in the backward, the gradient of
the experts' output (the input of the down-projection's backward) that combine's backward sends;
``quantise_grad`` applies the same quantisation to a one-process MoE's routed output gradient."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from parallel.routing_plan import HopPlan

FP8_BLOCK = 128


def quant_pow2(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) → (x_fp8 (N, D) float8_e4m3fn, scale (N, ceil(D/block)) fp32), power-of-2 scales."""
    from triton_kernels.quant_ref import act_quant_ref  # torch only; no triton import
    return act_quant_ref(x, block, pow2_scale=True)


def dequant(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int = FP8_BLOCK) -> torch.Tensor:
    from triton_kernels.quant_ref import act_dequant_ref
    return act_dequant_ref(x_fp8, scale, block, dtype)


def fp8_round_trip(g: torch.Tensor) -> torch.Tensor:
    """g (..., D) as the receivers of an FP8 row see it: quantised (1×128, pow2 scales) and dequantised."""
    flat = g.reshape(-1, g.shape[-1])
    return dequant(*quant_pow2(flat), g.dtype).view(g.shape)


class _QuantiseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return fp8_round_trip(g)


def quantise_grad(y: torch.Tensor) -> torch.Tensor:
    """y unchanged; its gradient goes through ``fp8_round_trip``. Wrapped around a one-process MoE's routed
    output (before the shared expert is added), it quantises the gradient that the expert-parallel backward
    sends to the experts in FP8 (``EPDispatcher(fp8_grad=True)``), at the same point: the emulation."""
    return _QuantiseGrad.apply(y)


def pack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
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


def unpack_rows(buf: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
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
