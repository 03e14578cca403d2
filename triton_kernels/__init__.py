"""FP8 training kernels (Triton) beside their torch references. Importing this package does not import triton.

``counters`` counts FP8 GEMM calls by op name (``fp8_linear.fprop``, ``fp8_linear.dgrad``,
``fp8_linear.wgrad``, ``fp8_grouped_mm.fprop`` …) so a test can show which GEMMs ran quantised.
"""
from collections import Counter

counters: Counter = Counter()


def reset_counters() -> None:
    counters.clear()
