"""Published figures the planner's expected step time is built from, quoted with source, version and
date beside each (the planner works offline). Nothing here is fitted to the report's 180K GPU-hours.

Each ``Figure`` is one number; the tables are rows of the cited source, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str


DEEPGEMM_SOURCE = ("DeepGEMM README, 'Performance' tables (deepseek-ai/DeepGEMM, first release 2025-02-26, before "
                   "the 2025-04-18 update; H800 SXM5, NVCC 12.8; FP8 E4M3, 1x128 / 128x128 scales, BF16 output)")
# Normal (dense) FP8 GEMMs: (M, N, K) -> TFLOPS. N=2112 is wq_a and wkv_a fused (1536 + 576).
DEEPGEMM_DENSE: dict[tuple[int, int, int], float] = {
    (64, 2112, 7168): 206, (64, 24576, 1536): 289, (64, 32768, 512): 219,
    (64, 7168, 16384): 336, (64, 4096, 7168): 287, (64, 7168, 2048): 295,
    (128, 2112, 7168): 352, (128, 24576, 1536): 535, (128, 32768, 512): 358,
    (128, 7168, 16384): 645, (128, 4096, 7168): 533, (128, 7168, 2048): 510,
    (4096, 2112, 7168): 1058, (4096, 24576, 1536): 990, (4096, 32768, 512): 590,
    (4096, 7168, 16384): 1358, (4096, 4096, 7168): 1304, (4096, 7168, 2048): 1025,
}
# Grouped GEMMs, contiguous layout (MoE training forward / prefill): (groups, M per group, N, K) -> TFLOPS.
DEEPGEMM_GROUPED: dict[tuple[int, int, int, int], float] = {
    (4, 8192, 4096, 7168): 1297, (4, 8192, 7168, 2048): 1099,
    (8, 4096, 4096, 7168): 1288, (8, 4096, 7168, 2048): 1093,
}

DEEPEP_SOURCE = ("DeepEP README / docs/legacy.md, normal kernels (deepseek-ai/DeepEP, V1 tables, 2025-02-25): H800, "
                 "CX7 InfiniBand 400 Gb/s, 4096 tokens, hidden 7168, top-4 groups, top-8 experts, FP8 dispatch, "
                 "BF16 combine; 'bottleneck bandwidth' counts payload bytes deduplicated per node for RDMA")
# EP size -> (dispatch GB/s, combine GB/s); EP8 is intranode (NVLink), larger EP internode (RDMA).
DEEPEP_NORMAL: dict[int, tuple[float, float]] = {8: (153.0, 158.0), 16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0)}

FLASHMLA_TFLOPS = Figure(580.0, "TFLOPS", "FlashMLA README (deepseek-ai/FlashMLA, first release 2025-02-24): 'up to "
                         "580 TFLOPS in computation-bound configuration on H800 SXM5' (BF16, CUDA 12.6)")
FLASHMLA_GBS = Figure(3000.0, "GB/s", "FlashMLA README (2025-02-24): 'up to 3000 GB/s in memory-bound configuration "
                      "on H800 SXM5' — the achievable HBM rate used for memory-bound work (3.35 TB/s peak)")
COMM_SMS = Figure(20.0, "SMs of 132", "DeepSeek-V3 report §3.2.2: 20 of the 132 SMs of an H800 are allotted to "
                  "communication in DualPipe's overlapped chunks, leaving 112 for compute")
IB_GBS = Figure(50.0, "GB/s per GPU", "DeepSeek-V3 report §3.2.2: one 400 Gb/s InfiniBand NIC per GPU "
                "(~50 GB/s), used for PP point-to-point and ZeRO collectives (DeepEP measures 43-58 GB/s on it)")
MAXVIO_DEFAULT = Figure(0.04, "MaxVio", "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing (arXiv:2408.15664) "
                        "Table 2: MaxVio_global 0.04 for Loss-Free Balancing (1B and 3B models); a per-step, per-rank "
                        "imbalance is larger, hence the printed sweep")

REPORT_GPU_HOURS_PER_T = Figure(180e3, "H800 GPU-hours per trillion tokens", "DeepSeek-V3 report §1 / Table 1")
REPORT_PRETRAIN_GPU_HOURS = Figure(2.664e6, "H800 GPU-hours for 14.8T tokens", "DeepSeek-V3 report Table 1")
MEGATRON_H100 = Figure(340.0, "TFLOPS/GPU (~1,300 tokens/s/GPU) on 1,024 H100",
                       "the project brief's Megatron-Core anchor; no primary Megatron-Core publication of this H100 "
                       "figure was found with the search tools (its MoE report gives 1,233 / 1,048 TFLOPS/GPU on "
                       "GB300 / GB200)")


def deepep_bandwidth(ep: int) -> tuple[float, float, str]:
    """(dispatch, combine) GB/s for an EP size: the measured row at or below it (the largest row beyond 64)."""
    rows = sorted(DEEPEP_NORMAL)
    key = max([r for r in rows if r <= ep] or [rows[0]])
    d, c = DEEPEP_NORMAL[key]
    return d, c, f"DeepEP EP{key} {'NVLink' if key == 8 else 'RDMA'} {d:g}/{c:g} GB/s"
