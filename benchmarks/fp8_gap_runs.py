"""The pieces of the FP8 loss-gap study (benchmarks/fp8_loss_gap.py, issue 19 item 4; report §3.3):
one training run with the report's FP8 recipe or the high-precision baseline, the resumable JSON store
of finished runs, and the paired statistics (report §3.3: FP8 within 0.25% relative of BF16).

The recipe in one process: FP8 GEMMs (fprop, dgrad, wgrad), ``wo``'s input cached in E5M6, the MoE
SwiGLU input cached in FP8 (both by ``fp8.enabled`` through ``dsv3.training.precision.apply_fp8``), and the two
low-precision all-to-alls an expert-parallel run would do, emulated where they happen: the dispatched
tokens quantised and dequantised with power-of-2 1×128 scales (``fp8.dispatch``; the backward passes
straight through, as dispatch's backward sends BF16), and the gradient of the routed output — what
combine's backward sends to the experts before their down-projection (``fp8.grad_dispatch``) — through
``parallel.a2a_rows.quantise_grad``. This is the emulation tests/test_all_to_all.py checks bitwise
against the 8-process expert-parallel backward (the same wrapping of ``local_dispatch``).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from typing import Optional

RESOLVE = 0.0025    # the report's bound: FP8 within 0.25% relative of BF16


def smoothed(losses: list[float]) -> float:
    """Mean of the last 10% of steps (at least one)."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def paired_gap(base: list[float], fp8: list[float]) -> dict:
    """Per seed the relative gap (fp8 − base) / base of the smoothed losses; their mean, the std of the
    per-seed differences (n − 1) and the paired 2σ with σ = std / √n. Positive: FP8 behind."""
    if len(base) != len(fp8) or not base:
        raise ValueError("paired_gap: one FP8 and one baseline loss per seed")
    gaps = [(f - b) / b for b, f in zip(base, fp8)]
    n = len(gaps)
    mean = sum(gaps) / n
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (n - 1)) if n > 1 else float("nan")
    return {"gaps": gaps, "mean": mean, "sd": sd, "two_sigma": 2 * sd / math.sqrt(n), "n": n}


def seeds_to_resolve(sd: float, bound: float = RESOLVE) -> int:
    """Seeds n with paired 2σ = 2·sd/√n ≤ bound, the per-seed spread held at the one measured."""
    return max(2, math.ceil((2 * sd / bound) ** 2))


def verdict(gap: dict, bound: float = RESOLVE) -> str:
    """What the interval mean ± 2σ says about the report's bound."""
    lo, hi = gap["mean"] - gap["two_sigma"], gap["mean"] + gap["two_sigma"]
    if hi < bound and lo > -bound:
        return f"within ±{100 * bound:.2f}% (resolved)"
    if lo > bound:
        return f"FP8 behind by more than {100 * bound:.2f}% beyond 2σ"
    if hi < -bound:
        return f"FP8 ahead by more than {100 * bound:.2f}% beyond 2σ"
    return f"not resolved: 2σ {100 * gap['two_sigma']:.3f}% too wide to place the gap against {100 * bound:.2f}%"


def trend(small: dict, large: dict) -> str:
    """Whether the mean gap shrinks from the smaller to the larger config, against the 2σ of the difference."""
    d = large["mean"] - small["mean"]
    two = math.sqrt(small["two_sigma"] ** 2 + large["two_sigma"] ** 2)
    word = "shrinks" if d < 0 else "grows"
    resolved = "resolved" if abs(d) > two else "not resolved"
    return f"gap {word} by {100 * abs(d):.3f}% ± {100 * two:.3f}% (2σ) from the smaller to the larger config: {resolved}"


# ------------------------------------------------------------------------------ one run

def ep_emulation(dispatch: bool, grad: bool, counts: dict):
    """A one-process ``MoE.dispatcher``: local dispatch with the expert all-to-alls' FP8 round trips."""
    from dsv3.model.experts import local_dispatch
    from parallel.a2a_rows import fp8_round_trip, quantise_grad

    def dispatcher(x, indices, weights, experts):
        if dispatch:   # the tokens as the expert ranks receive them; gradient straight through
            flat = x.detach().reshape(-1, x.shape[-1])
            x = fp8_round_trip(flat).view_as(x) + (x - x.detach())
            counts["dispatch"] += 1
        y = local_dispatch(x, indices, weights, experts)
        if grad:       # the gradient combine's backward would send in FP8
            counts["grad_dispatch"] += 1
            y = quantise_grad(y)
        return y
    return dispatcher


@contextlib.contextmanager
def recipe_emulation(counts: dict):
    """While open, ``train`` under ``fp8.enabled`` also installs ``ep_emulation`` on every MoE layer
    (train imports ``dsv3.training.precision.apply_fp8`` at call time; the wrapper is restored on exit)."""
    import dsv3.training.precision as precision
    original = precision.apply_fp8

    def apply_fp8(model, cfg, device=None):
        out = original(model, cfg, device)
        for moe in model.moe_layers():
            moe.dispatcher = ep_emulation(cfg.dispatch, cfg.grad_dispatch, counts)
        return out
    precision.apply_fp8 = apply_fp8
    try:
        yield
    finally:
        precision.apply_fp8 = original


def train_one(config: str, overrides: list[str], fp8: bool, threads: Optional[int] = None) -> dict:
    """Train ``config`` with ``overrides`` (and the FP8 recipe if ``fp8``) in a temporary run
    directory; returns per-step losses, the smoothed loss, the final val loss, wall and CPU seconds."""
    import torch
    from dsv3.config import load_config
    from dsv3.train import train
    if threads:
        torch.set_num_threads(threads)
    counts = {"dispatch": 0, "grad_dispatch": 0}
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        extra = ["fp8.enabled=true"] if fp8 else []
        cfg = load_config(config, [*overrides, *extra, f"train.out_dir={out}", "train.ckpt_every=0"])
        with recipe_emulation(counts) if fp8 else contextlib.nullcontext():
            result = train(cfg)
    losses = [float(v) for v in result["losses"]]
    recipe = None
    if fp8:
        recipe = {k: getattr(cfg.fp8, k) for k in ("cache_wo_e5m6", "cache_swiglu_fp8", "dispatch", "grad_dispatch",
                                                   "high_precision")}
        recipe.update({f"{k}_calls": v for k, v in counts.items()})
    return {"losses": losses, "smoothed": smoothed(losses), "val_loss": float(result["val_loss"]),
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "recipe": recipe}


# ------------------------------------------------------------------------------ the store

class Results:
    """``OUT/results.json``: the study's settings and every finished run, keyed by run name; rewritten
    (atomically) as each run finishes, so an interrupted study resumes where it stopped."""

    def __init__(self, out: str, settings: dict):
        from dsv3.errors import UserError
        self.path = os.path.join(out, "results.json")
        self.settings, self.runs = settings, {}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                saved, runs = data["settings"], data["runs"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{self.path} is not a results file of this study ({e}); use another --out") from e
            if saved != settings:
                raise UserError(f"{self.path} holds runs with settings {saved}, not {settings}; use another --out")
            self.runs = runs
        os.makedirs(out, exist_ok=True)

    def add(self, name: str, run: dict) -> None:
        self.runs[name] = run
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": self.settings, "runs": self.runs}, f, indent=1)
        os.replace(tmp, self.path)
