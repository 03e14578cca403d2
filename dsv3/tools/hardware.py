"""One table of GPU peaks (issue 17 E): dense BF16 and FP8 tensor-core TFLOPS (no sparsity), HBM
bandwidth and capacity, SM count and NVLink bandwidth, each row with its datasheet. The planner
(``dsv3.tools.plan``), the trainer's MFU and the GPU check read it; nothing else holds a peak.

    gpu = get_gpu("h800")                                   # KeyError naming the known keys
    gpu = gpu_from_device_name(torch.cuda.get_device_name())  # None when unknown

Datasheets quote FP8/BF16 "with sparsity" beside the dense figure; the dense one (half) is kept here.
``hbm_gib`` is the capacity the driver reports (nvidia-smi's MiB / 1024), a little under the datasheet GB.
Stdlib only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    bf16_dense_tflops: float
    fp8_dense_tflops: float
    hbm_tbs: float          # HBM bandwidth, TB/s (10^12 bytes/s)
    hbm_gib: float          # HBM capacity as the driver reports it, GiB
    sms: int
    nvlink_gbs: float       # NVLink, GB/s per GPU, both directions together (datasheet convention)
    source: str


_H100_SXM_DS = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column; 2023)"
GPUS: dict[str, GPU] = {g.key: g for g in (
    GPU("h100_sxm", "H100 SXM5 80GB", 989.4, 1978.9, 3.35, 79.6, 132, 900.0,
        f"{_H100_SXM_DS}: BF16 1,979 / FP8 3,958 TFLOPS with sparsity, 3.35 TB/s HBM3, NVLink 900 GB/s; "
        "132 SMs (NVIDIA Hopper architecture whitepaper, SXM5); 81,559 MiB reported"),
    GPU("h100_pcie", "H100 PCIe 80GB", 756.0, 1513.0, 2.0, 79.6, 114, 600.0,
        f"{_H100_SXM_DS.replace('SXM column', 'PCIe column')}: BF16 1,513 / FP8 3,026 TFLOPS with sparsity, "
        "2 TB/s HBM2e, NVLink bridge 600 GB/s; 114 SMs (Hopper whitepaper, PCIe)"),
    GPU("h800", "H800 SXM5 80GB", 989.4, 1978.9, 3.35, 79.6, 132, 400.0,
        "NVIDIA H800 SXM5 datasheet: compute and HBM as H100 SXM (BF16 1,979 / FP8 3,958 TFLOPS with sparsity, "
        "3.35 TB/s), NVLink 400 GB/s; DeepSeek-V3 report §3.1 (132 SMs, NVLink 160 GB/s per direction achievable)"),
    GPU("h200", "H200 SXM 141GB", 989.4, 1978.9, 4.8, 140.4, 132, 900.0,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM column; 2024): BF16 1,979 / FP8 3,958 TFLOPS with sparsity, "
        "141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; same GH100 die as H100 SXM (132 SMs); 143,771 MiB reported"),
    GPU("b200", "B200 180GB", 2250.0, 4500.0, 8.0, 179.1, 148, 1800.0,
        "NVIDIA HGX B200 datasheet (2024), per GPU = 8-GPU figure / 8: FP8 72 PFLOPS and BF16 36 PFLOPS with "
        "sparsity (dense half), 1.44 TB HBM3e at 64 TB/s, NVLink 1.8 TB/s; 148 SMs (Blackwell architecture "
        "technical brief); 183,359 MiB reported"),
)}

ALIASES = {"h100": "h100_sxm", "h100sxm": "h100_sxm", "h100pcie": "h100_pcie", "h200_sxm": "h200", "h800_sxm": "h800"}


def get_gpu(key: str) -> GPU:
    """The table row for ``key`` (case-insensitive; "h100" means the SXM part)."""
    k = key.strip().lower().replace("-", "_")
    k = ALIASES.get(k.replace("_", ""), ALIASES.get(k, k))
    if k not in GPUS:
        raise KeyError(f"unknown GPU {key!r}; known: {', '.join(sorted(GPUS))} (alias h100 = h100_sxm)")
    return GPUS[k]


def gpu_from_device_name(name: str) -> Optional[GPU]:
    """The row for a ``torch.cuda.get_device_name()`` string ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
    "NVIDIA H800", "NVIDIA H200", "NVIDIA B200"); None for any other GPU."""
    n = name.upper()
    if re.search(r"\bB200\b", n):
        return GPUS["b200"]
    if re.search(r"\bH200\b", n):
        return GPUS["h200"]
    if re.search(r"\bH800\b", n):
        return None if "PCIE" in n else GPUS["h800"]
    if re.search(r"\bH100\b", n):
        if "PCIE" in n:
            return GPUS["h100_pcie"]
        if "NVL" in n:
            return None          # H100 NVL (94 GB) is another part, not in the table
        return GPUS["h100_sxm"]
    return None
