"""Where a run executes and what it can reach: the compute dtype ``train.dtype: auto`` picks, the GPU
speed switches, and the peak FLOP/s that MFU divides by.

dtype (``train.dtype``):
  auto  BF16 autocast on CUDA and on CPUs with native BF16 GEMMs (AVX512-BF16 or AMX), FP32 elsewhere —
        on an AVX2-only CPU BF16 GEMMs are emulated and ~16× slower than FP32.
  bf16  BF16 autocast everywhere (a one-line warning where the CPU has no native BF16).
  fp32  FP32 everywhere (the tests that compare numbers pin it).

Compute weights under ZeRO-1 (``train.weights_dtype``, ``with_weights_dtype``): auto is BF16 where the
run is on CUDA under BF16 autocast (what ``dsv3.tools.plan`` and the report §3.3 assume: BF16 weights, FP32
main grads and master), FP32 elsewhere — on a CPU the FP32 weights keep the parallel layouts' numbers
equal to one process's.

Peak (``peak_flops``): on a GPU the dense tensor-core peak of ``dsv3.tools.hardware`` for the compute dtype
(``MFU n/a (<name>)`` for a GPU not in the table, unless ``train.peak_tflops`` is set); on a CPU
threads × FLOP per cycle of the widest FMA path the CPU has for that dtype × clock — a computed ceiling,
never a timed matmul, and never clamped, so an MFU above 100% would show the description is wrong.
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

# FP32 FLOP per cycle per core: FMA = 2 FLOP per lane, two FMA pipes (Intel Skylake-SP and later server
# parts, AMD Zen 2+); lanes: AVX-512 16, AVX2 8, SSE 4. BF16: AMX-BF16 1024 FLOP/cycle/core (Intel
# Sapphire Rapids optimisation manual, TMUL 16×32×16 BF16 per 16 cycles); AVX512-BF16 VDPBF16PS on two
# pipes: 32 pairs × 2 FLOP × 2 = 128.
FP32_PER_CYCLE = {"avx512f": 64, "avx2": 32, "sse": 8}
BF16_PER_CYCLE = {"amx_bf16": 1024, "avx512_bf16": 128}


@dataclass(frozen=True)
class CpuInfo:
    """What the peak depends on: threads used, ISA flags (``/proc/cpuinfo`` names), clock in GHz."""
    threads: int
    flags: frozenset
    ghz: float
    name: str = "CPU"

    @property
    def isa(self) -> str:
        """The widest vector ISA with FMA: the one the FP32 peak uses."""
        for isa in ("avx512f", "avx2"):
            if isa in self.flags and "fma" in self.flags:
                return isa
        return "sse"

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & set(BF16_PER_CYCLE))


def detect_cpu() -> CpuInfo:
    """This machine from ``/proc/cpuinfo`` (Linux); torch's own capability checks elsewhere."""
    flags, ghz, name = set(), 0.0, "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
        m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
        ghz = float(m.group(1)) / 1000 if m else 0.0
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()   # what ATen's kernels were dispatched to
    if "AVX512" in cap:
        flags |= {"avx512f", "fma"}
    elif "AVX2" in cap:
        flags |= {"avx2", "fma"}
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        flags.add("amx_bf16")
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    return CpuInfo(torch.get_num_threads(), frozenset(flags), ghz or 2.0, name)


def choose_dtype(setting: str, device: torch.device, cpu: Optional[CpuInfo] = None) -> tuple[str, str]:
    """(dtype, why) for ``train.dtype``: "bf16" or "fp32", and the reason printed at start-up."""
    if device.type == "cuda":
        if setting == "fp32":
            return "fp32", "train.dtype=fp32"
        return "bf16", "CUDA" if setting == "auto" else "train.dtype=bf16"
    cpu = cpu or detect_cpu()
    native = cpu.native_bf16
    if setting == "auto":
        return ("bf16", "this CPU has native BF16 GEMMs (AVX512-BF16/AMX)") if native else \
               ("fp32", f"this CPU has no native BF16 GEMMs ({cpu.isa.upper()}): BF16 would be emulated")
    if setting == "bf16" and not native:
        return "bf16", ("train.dtype=bf16 — warning: this CPU has no native BF16 GEMMs, BF16 is emulated and "
                        "~16x slower than FP32; train.dtype=auto picks FP32 here")
    return setting, f"train.dtype={setting}"


def with_weights_dtype(cfg, device: torch.device):
    """``cfg`` with ``train.weights_dtype`` "fp32" or "bf16" for a ZeRO-1 run on ``device`` (``auto`` resolved)."""
    if cfg.train.weights_dtype != "auto":
        return cfg
    bf16 = device.type == "cuda" and choose_dtype(cfg.train.dtype, device)[0] == "bf16"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, weights_dtype="bf16" if bf16 else "fp32"))


def cpu_peak_flops(cpu: CpuInfo, dtype: str) -> tuple[float, str]:
    """(FLOP/s, how it was computed) of ``cpu`` in ``dtype``."""
    per_cycle, path = FP32_PER_CYCLE[cpu.isa], cpu.isa.upper() + " FMA"
    if dtype == "bf16":
        for flag, n in BF16_PER_CYCLE.items():
            if flag in cpu.flags:
                per_cycle, path = n, flag.upper()
                break
    peak = cpu.threads * per_cycle * cpu.ghz * 1e9
    return peak, f"{cpu.threads} threads × {per_cycle} FLOP/cycle ({path}, {dtype.upper()}) × {cpu.ghz:.2f} GHz"


def peak_flops(device: torch.device, dtype: str, world: int, peak_tflops: Optional[float] = None,
               fp8: bool = False) -> tuple[Optional[float], str]:
    """(the run's peak FLOP/s over ``world`` devices or None, its name for the log)."""
    if peak_tflops:
        return peak_tflops * 1e12 * world, f"{peak_tflops:g} TFLOPS per device (train.peak_tflops) × {world}"
    if device.type == "cuda":
        from dsv3.tools.hardware import gpu_from_device_name
        name = torch.cuda.get_device_name(device)
        gpu = gpu_from_device_name(name)
        if gpu is None:
            return None, f"n/a ({name}; set train.peak_tflops)"
        # MFU's denominator is the dense BF16 peak even for FP8 GEMMs (the report and Megatron convention);
        # the FP8 peak is named beside it
        low = dtype == "bf16" or fp8
        tf = gpu.bf16_dense_tflops if low else gpu.bf16_dense_tflops / 2   # Hopper's dense TF32 is half BF16
        what = "dense BF16" if low else "dense TF32"
        return tf * 1e12 * world, f"{gpu.name} {what} {tf:,.0f} TFLOPS × {world}"
    peak, how = cpu_peak_flops(detect_cpu(), dtype)
    return peak * world, f"{how} × {world} process{'es' if world > 1 else ''}"


@contextmanager
def region(name: str):
    """A named range in profiler traces (``train.profile_steps``) and, on CUDA, an NVTX range for Nsight."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def gpu_speed_defaults(device: torch.device) -> None:
    """TF32 for FP32 matmuls and convolutions on CUDA (Ampere+): the FP32 parts (router, norms' reductions)
    keep FP32 range at a 10-bit mantissa, as Megatron and torchtitan run them."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

