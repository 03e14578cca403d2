"""FP8 vs BF16 training loss (report §3.3: FP8 stays within 0.25% relative of BF16 over the run).

Trains the same config three times in this process: BF16 (seed 0), FP8 GEMMs (seed 0, same data
order and initial weights) and BF16 (seed 1, the noise floor), and prints the relative gap of the
final smoothed loss (mean over the last 10% of steps) for FP8 vs BF16 beside the BF16-vs-BF16 gap.

    python benchmarks/fp8_loss_gap.py [--config configs/small_moe.yaml] [--steps 200] [--dtype bf16|fp32]

On CPU, BF16 autocast is emulated and slow; --dtype fp32 keeps the non-FP8 parts in FP32 for all
three runs (the FP8 GEMMs still run through the fake-quant reference).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3.config import load_config  # noqa: E402
from dsv3.train import train  # noqa: E402


def smoothed(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def run(config: str, overrides: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        result = train(load_config(config, [*overrides, f"train.out_dir={out}", "train.ckpt_every=0"]))
    return smoothed(result["losses"]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/small_moe.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    base = [f"train.steps={args.steps}", f"train.dtype={args.dtype}", "train.sample_tokens=1", "train.eval_batches=1"]
    ref, t_ref = run(args.config, [*base, "train.seed=0"])
    print(f"{args.dtype} seed 0: smoothed loss {ref:.5f} ({t_ref:.0f} s)", flush=True)
    fp8, t_fp8 = run(args.config, [*base, "train.seed=0", "fp8.enabled=true"])
    print(f"fp8  seed 0: smoothed loss {fp8:.5f} ({t_fp8:.0f} s)", flush=True)
    other, t_other = run(args.config, [*base, "train.seed=1"])
    print(f"{args.dtype} seed 1: smoothed loss {other:.5f} ({t_other:.0f} s)", flush=True)
    noise = abs(other - ref) / ref
    gap = abs(fp8 - ref) / ref
    print(f"noise floor ({args.dtype} seed 0 vs seed 1): {100 * noise:.3f}%")
    print(f"report: FP8 within 0.25% of BF16")
    print(f"FP8 vs {args.dtype} relative gap: {100 * gap:.3f}% (ratio to noise floor {gap / max(noise, 1e-12):.2f})")


if __name__ == "__main__":
    main()
