"""What the CPU benchmarks (bench_train.py, bench_moe.py) print beside their ratios: the CPU as its
kernels run (``isa_label``), the roofline share of a step (``roofline``) and a torch.profiler breakdown
of where a step's time goes (``profile_breakdown``).

Roofline share: the step's FLOP/s over this CPU's matmul rate in the same dtype, that rate measured in
the same process on the step's own GEMM list — every (M, N, K) the step's forward and backward run
(``aten.mm`` / ``addmm`` / ``bmm`` / ``_grouped_mm`` split into its groups) in the dtype it ran in (under
BF16 autocast most are BF16, the router's and attention's FP32), each timed as one ``torch.mm`` best of 5
at the same thread count, FLOP-weighted (total FLOP / total time). 100% would be
a step that does nothing but its GEMMs, each at the speed this CPU runs it alone. The step's FLOP are
those GEMMs' plus the causal attention core's (counted by formula: 2·B·H·T(T+1)/2·(d_qk + d_v)
forward, twice that backward), which runs inside fused kernels the GEMM list does not see.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.training.runtime import CpuInfo, detect_cpu

_aten = torch.ops.aten
_NARROW = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def bench_cpu() -> CpuInfo:
    """detect_cpu() narrowed to what the kernels may use: with oneDNN capped below AVX-512
    (ONEDNN_MAX_CPU_ISA=AVX2, the AVX2-only emulation) or ATen dispatched below it, the AVX-512 / AMX /
    AVX512-BF16 flags are dropped, so the dtype rule and the peak see an AVX2-only CPU."""
    cpu = detect_cpu()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    narrowed = (onednn and "512" not in onednn and "AMX" not in onednn) or \
        "AVX512" not in torch.backends.cpu.get_cpu_capability()
    if narrowed:
        flags = frozenset(f for f in cpu.flags if not f.startswith(("avx512", "amx")))
        cpu = replace(cpu, flags=flags)
    return cpu


def isa_label(cpu: CpuInfo) -> str:
    """One line: CPU model, the ISA its kernels use, and any narrowing in effect (an emulation)."""
    narrow = [f"{k}={os.environ[k]}" for k in _NARROW if k in os.environ]
    bf16 = "native BF16" if cpu.native_bf16 else "no native BF16"
    how = f"emulated: {' '.join(narrow)} on this CPU" if narrow else "native"
    return (f"ISA {cpu.isa.upper()}, {bf16} (ATen {torch.backends.cpu.get_cpu_capability()}; {how}); "
            f"{cpu.name}")


class GemmRecorder(TorchDispatchMode):
    """Records the (M, N, K, dtype) of every GEMM dispatched while active (a Counter), and the FLOP of the
    causal attention cores (flash kernels) it sees."""

    def __init__(self):
        super().__init__()
        self.gemms: Counter = Counter()
        self.attn_flop = 0.0

    def _grouped(self, a, b, offs):
        ends = offs.tolist() if offs is not None else None
        sizes = [e - s for s, e in zip([0] + ends[:-1], ends)] if ends else None
        if a.dim() == 2 and b.dim() == 3:            # rows of a grouped
            for m in sizes:
                self.gemms[(m, b.shape[2], a.shape[1], a.dtype)] += 1
        elif a.dim() == 2 and b.dim() == 2:          # the reduction dim grouped (weight gradients)
            for k in sizes:
                self.gemms[(a.shape[0], b.shape[1], k, a.dtype)] += 1
        elif a.dim() == 3 and b.dim() == 2:          # columns of b grouped
            for n in sizes:
                self.gemms[(a.shape[1], n, a.shape[2], a.dtype)] += 1
        else:
            self.gemms[(a.shape[1], b.shape[2], a.shape[2], a.dtype)] += a.shape[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pkt = func._overloadpacket
        if pkt in (_aten.mm, _aten.addmm, _aten.addmm_):
            a, b = (args[0], args[1]) if pkt is _aten.mm else (args[1], args[2])
            self.gemms[(a.shape[0], b.shape[1], a.shape[1], a.dtype)] += 1
        elif pkt in (_aten.bmm, _aten.baddbmm):
            a, b = (args[0], args[1]) if pkt is _aten.bmm else (args[1], args[2])
            self.gemms[(a.shape[1], b.shape[2], a.shape[2], a.dtype)] += a.shape[0]
        elif pkt is _aten._grouped_mm:
            self._grouped(args[0], args[1], kwargs.get("offs", args[2] if len(args) > 2 else None))
        elif pkt in (_aten._scaled_dot_product_flash_attention_for_cpu,
                     _aten._scaled_dot_product_flash_attention_for_cpu_backward):
            bwd = pkt is _aten._scaled_dot_product_flash_attention_for_cpu_backward
            q, v = (args[1], args[3]) if bwd else (args[0], args[2])
            B, H, T, d = q.shape
            self.attn_flop += (2 if bwd else 1) * 2 * B * H * T * (T + 1) / 2 * (d + v.shape[-1])
        return func(*args, **kwargs)


def _best_of(fn, n: int, clock) -> float:
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def gemm_rate(gemms: Counter, clock=time.perf_counter, repeats: int = 5) -> tuple[float, float]:
    """(FLOP, seconds) of the GEMM list run as plain torch.mm, each (M, N, K, dtype) best of ``repeats``."""
    flop = secs = 0.0
    for (m, n, k, dtype), count in gemms.items():
        if m == 0 or n == 0 or k == 0:
            continue
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)                       # warm-up (oneDNN compiles its kernel here)
        secs += count * _best_of(lambda: torch.mm(a, b, out=out), repeats, clock)
        flop += count * 2.0 * m * n * k
    return flop, secs


def roofline(step_fn, clock=time.perf_counter) -> dict:
    """Runs ``step_fn`` once under the recorder; returns the step's FLOP (GEMMs + attention core), the
    GEMM list, and the CPU's FLOP-weighted matmul rate on that list."""
    rec = GemmRecorder()
    with rec:
        step_fn()
    flop, secs = gemm_rate(rec.gemms, clock)
    return dict(step_flop=flop + rec.attn_flop, gemm_flop=flop, attn_flop=rec.attn_flop,
                rate=flop / secs, shapes=len(rec.gemms), calls=sum(rec.gemms.values()))


# where a step's time goes: an event's self time goes to the first region among its ancestors (itself
# included) whose name holds one of these, else to its own op's category
_REGIONS = [("optimizer", ("Optimizer.step", "Optimizer.zero_grad", "_fused_adamw", "AdamW")),
            ("attention core", ("FlashMLA", "BlockedCausalMLA", "scaled_dot_product", "flash_attention", "aten::_softmax",
                                "SoftmaxBackward", "softmax_backward", "isneginf")),
            ("head + cross-entropy", ("LinearCrossEntropy", "log_softmax", "LogSoftmax", "nll_loss", "NllLoss",
                                      "cross_entropy")),
            ("RMSNorm", ("RMSNorm",)), ("RoPE", ("RotatePairs", "rotate_half", "apply_rotary")),
            ("SwiGLU", ("SwiGLU", "silu", "Silu"))]
_OPS = [("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")),
        ("MoE routing + permutation", ("index", "sort", "bincount", "topk", "gather", "scatter", "cumsum",
                                       "repeat_interleave", "sigmoid", "masked_fill", "aten::where", "aten::all")),
        ("FP32 casts + copies", ("copy_", "_to_copy", "fill_", "zero_", "aten::cat", "aten::empty", "clone",
                                 "contiguous", "aten::pad", "constant_pad")),
        ("elementwise (other)", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow", "aten::mean",
                                 "aten::sum", "rsqrt", "addcmul", "aten::neg", "aten::exp"))]


def _category(ev) -> str:
    leaf = ev.name
    chain = []
    e = ev
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    if any(g in leaf for g in _OPS[0][1]) and not any(a in n for n in chain for a in _REGIONS[1][1]):
        return "GEMM"
    for cat, keys in _REGIONS:
        if any(k in n for n in chain for k in keys):
            return cat
    for cat, keys in _OPS:
        if any(k in leaf for k in keys):
            return cat
    return "other (dispatch, autograd, views)"


def profile_breakdown(step_fn, steps: int = 1) -> tuple[dict, float]:
    """({category: seconds per step}, total seconds per step) of ``step_fn`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step_fn()
    out: Counter = Counter()
    for ev in prof.events():
        out[_category(ev)] += ev.self_cpu_time_total / 1e6 / steps
    return dict(out), sum(out.values())
