"""FP8 vs high-precision training loss, paired over seeds (report §3.3: with FP8 the relative loss error
stays below 0.25% of BF16's; issue 19 item 4).

For each config and seed, two runs share the seed (initial weights and data order): the baseline in
BF16 autocast where the CPU has native BF16 GEMMs, else FP32 (dsv3.training.runtime.choose_dtype; printed), and
the report's FP8 recipe in the same autocast dtype — FP8 GEMMs, wo's input cached in E5M6, the SwiGLU
input cached in FP8, and the FP8 dispatch and FP8 gradient before the down-projection emulated by
quantise-dequantise at the points the all-to-alls apply them (benchmarks/fp8_gap_runs.py). Per seed the
relative gap of the final smoothed loss (mean of the last 10% of steps); then the mean gap and the paired
2σ (σ = std of the per-seed gaps / √n), whether it places the gap against 0.25%, the seeds that would,
and whether the gap shrinks from the first (smaller) config to the second.

    python benchmarks/fp8_loss_gap.py --out runs/fp8_gap [--configs configs/small_moe.yaml configs/fp8_gap_512.yaml]
        [--seeds 3] [--steps 200] [--baseline auto|bf16|fp32] [--jobs 2] [--summary]
    python benchmarks/fp8_loss_gap.py --quick --out /tmp/q      # smoke test: 2 tiny runs of 3 steps
    python benchmarks/fp8_loss_gap.py --out runs/fp8_gap --classes [NAME ...]   # which GEMM class carries the gap

Resumable: every finished run (per-step losses, smoothed loss, seconds) goes into OUT/results.json as it
finishes; a rerun with the same settings skips those (``--summary``: only print what is finished). ``--jobs N`` trains N runs at once in worker
processes (one thread each unless OMP_NUM_THREADS says otherwise).

``--classes``: on the first config, the FP8 recipe again with one GEMM class at a time in high precision
(``fp8.high_precision``, triton_kernels/high_precision.py) for the same seeds; a NAME is CLASS.PASS (one of
attention / dense / experts × fprop / dgrad / wgrad), a CLASS or a PASS (all its three passes or classes in one
run); none given: the nine. Per class the gap to the baseline and the change from the full FP8 recipe, each
with its paired 2σ: the class that carries the gap closes it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [p for p in (REPO, HERE) if p not in sys.path]

from fp8_gap_runs import RESOLVE, Results, paired_gap, seeds_to_resolve, train_one, trend, verdict  # noqa: E402
from dsv3.config import FP8_GEMM_CLASSES as CLASSES, FP8_PASSES as PASSES  # noqa: E402

QUICK = {"configs": [os.path.join(REPO, "configs", "debug.yaml")], "seeds": 1, "steps": 3,
         "overrides": ["train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32"]}
VARIANTS = ("base", "fp8")


def class_names(names: list[str]) -> dict[str, list[str]]:
    """--classes NAMEs -> {label: [CLASS.PASS, ...]} (a CLASS or a PASS alone: its three in one run)."""
    out = {}
    for name in names or [f"{c}.{p}" for c in CLASSES for p in PASSES]:
        if name in CLASSES:
            out[name] = [f"{name}.{p}" for p in PASSES]
        elif name in PASSES:
            out[name] = [f"{c}.{name}" for c in CLASSES]
        elif name.partition(".")[0] in CLASSES and name.partition(".")[2] in PASSES:
            out[name] = [name]
        else:
            raise ValueError(f"--classes {name}: expected CLASS.PASS, a CLASS or a PASS (CLASS in {', '.join(CLASSES)}, "
                             f"PASS in {', '.join(PASSES)})")
    return out


def plan(configs: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """(config, variant, seed), seed-major: every config's pair of a seed before the next seed, so a
    study stopped early has paired seeds on every config."""
    return [(c, v, s) for s in range(seeds) for c in configs for v in VARIANTS]


def run_name(config: str, variant: str, seed: int) -> str:
    return f"{os.path.splitext(os.path.basename(config))[0]}/{variant}/seed{seed}"


def overrides_for(args, variant_seed: int, dtype: str) -> list[str]:
    common = [f"train.steps={args.steps}", f"train.dtype={dtype}", f"train.seed={variant_seed}",
              "train.sample_tokens=1", "train.eval_batches=1", "train.eval_every=0"]
    return [*common, *args.overrides]


def tenths_gap(base: list[float], fp8: list[float]) -> list[float]:
    """(mean FP8 loss − mean baseline loss) / mean baseline loss over each tenth of the steps: where in the run
    a seed's final gap was set."""
    n, out = len(base), []
    for i in range(10):
        a, b = i * n // 10, max((i + 1) * n // 10, i * n // 10 + 1)
        mb, mf = sum(base[a:b]) / (b - a), sum(fp8[a:b]) / (b - a)
        out.append((mf - mb) / mb)
    return out


def summarise_classes(results: Results, config: str, labels: list[str], seeds: int, dtype: str) -> list[dict]:
    """Per class in high precision: its gap to the baseline and its change from the full FP8 recipe, paired
    over the seeds that have all three runs."""
    print(f"\n{os.path.basename(config)}: one GEMM class at a time in high precision ({dtype}), the rest of the FP8 "
          f"recipe unchanged")
    print(f"  {'class':18s} seeds  {'gap to ' + dtype:>22s}  {'change from full FP8':>22s}")
    rows = []
    for label in labels:
        trio = [(run_name(config, "base", s), run_name(config, "fp8", s), run_name(config, f"hp-{label}", s))
                for s in range(seeds)]
        done = [[results.runs[n]["smoothed"] for n in t] for t in trio if all(n in results.runs for n in t)]
        if not done:
            continue
        base, fp8, hp = zip(*done)
        gap, change = paired_gap(list(base), list(hp)), paired_gap(list(fp8), list(hp))
        fmt = lambda g: (f"{100 * g['mean']:+.3f}%" + (f" ± {100 * g['two_sigma']:.3f}%" if g["n"] > 1 else ""))  # noqa: E731
        print(f"  {label:18s} {len(done):5d}  {fmt(gap):>22s}  {fmt(change):>22s}")
        rows.append({"class": label, "gap": gap, "change": change})
    return rows


def summarise(results: Results, configs: list[str], seeds: int, dtype: str, steps: int) -> list[dict]:
    rows = []
    for c in configs:
        names = [(s, run_name(c, "base", s), run_name(c, "fp8", s)) for s in range(seeds)]
        paired = [(s, b, f) for s, b, f in names if b in results.runs and f in results.runs]
        done = [(results.runs[b], results.runs[f]) for _, b, f in paired]
        if not done:
            continue
        gap = paired_gap([b["smoothed"] for b, _ in done], [f["smoothed"] for _, f in done])
        pair_cpu = sum(b["cpu_s"] + f["cpu_s"] for b, f in done) / len(done)   # one thread per run
        label = os.path.relpath(c, REPO) if os.path.isabs(c) else c
        print(f"\n{label}: {len(done)} seed pair(s), {steps} steps, baseline {dtype}")
        for (s, _, _), (b, f), g in zip(paired, done, gap["gaps"]):
            print(f"  seed {s}: {dtype} {b['smoothed']:.5f}  fp8 {f['smoothed']:.5f}  gap {100 * g:+.3f}%")
        print("  gap of the mean loss over each tenth of the run, per seed (%):")
        for (s, _, _), (b, f) in zip(paired, done):
            print(f"    seed {s}: " + " ".join(f"{100 * t:+.2f}" for t in tenths_gap(b["losses"], f["losses"])))
        if gap["n"] == 1:
            print(f"  one seed pair: gap {100 * gap['mean']:+.3f}%, no spread to give a 2σ")
            continue
        print(f"  mean gap {100 * gap['mean']:+.3f}% ± {100 * gap['two_sigma']:.3f}% (paired 2σ); "
              f"per-seed sd {100 * gap['sd']:.3f}%")
        print(f"  {verdict(gap)}")
        if gap["two_sigma"] >= RESOLVE:
            n = seeds_to_resolve(gap["sd"])
            print(f"  2σ ≤ {100 * RESOLVE:.2f}% needs ≈ {n} seeds at {steps} steps (σ ∝ 1/√seeds, this spread): "
                  f"≈ {n * pair_cpu / 3600:.1f} core-hours at this study's {pair_cpu:.0f} CPU s per seed pair")
        rows.append(gap)
    if len(rows) == 2:
        print("\n" + trend(*rows))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder of results.json (resumed if present)")
    ap.add_argument("--configs", nargs="+", default=[os.path.join("configs", "small_moe.yaml"),
                                                      os.path.join("configs", "fp8_gap_512.yaml")])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--baseline", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: debug.yaml, 1 seed, 3 tiny steps")
    ap.add_argument("--summary", action="store_true", help="print the finished runs' statistics; train nothing")
    ap.add_argument("--classes", nargs="*", default=None, metavar="NAME",
                    help="also: the first config with one GEMM class in high precision (CLASS.PASS, CLASS or PASS; "
                         "none given: all nine)")
    args = ap.parse_args(argv)
    args.overrides = []
    if args.quick:
        args.configs, args.seeds, args.steps, args.overrides = QUICK["configs"], QUICK["seeds"], QUICK["steps"], QUICK["overrides"]
    if args.seeds < 1 or args.steps < 1 or args.jobs < 1:
        print("fp8_loss_gap: --seeds, --steps and --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        classes = class_names(args.classes) if args.classes is not None else {}
    except ValueError as e:
        print(f"fp8_loss_gap: {e}", file=sys.stderr)
        return 2
    from dsv3.errors import UserError
    import torch
    from dsv3.training.runtime import choose_dtype
    dtype, why = choose_dtype(args.baseline, torch.device("cpu"))
    print(f"baseline: {dtype} ({why}); FP8 recipe: FP8 GEMMs, E5M6 wo cache, FP8 SwiGLU cache, FP8 dispatch and "
          f"FP8 gradient before the down-projection (emulated in one process), other parts {dtype}", flush=True)
    try:
        for c in args.configs:
            if not os.path.isfile(c):
                raise UserError(f"--configs: no such file {c}")
        settings = {"steps": args.steps, "baseline": dtype, "overrides": args.overrides}
        results = Results(args.out, settings)
        todo = [(c, v, s) for c, v, s in plan(args.configs, args.seeds) if run_name(c, v, s) not in results.runs]
        if args.summary:
            todo = []
        print(f"runs: {len(todo)} to run, {len(results.runs)} already in {results.path}", flush=True)
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
        jobs = []
        for c, v, s in todo:
            jobs.append((run_name(c, v, s), c, overrides_for(args, s, dtype), v == "fp8", threads))
        for s in range(args.seeds) if not args.summary else ():
            for label, names in classes.items():
                name = run_name(args.configs[0], f"hp-{label}", s)
                if name not in results.runs:
                    hp = [*overrides_for(args, s, dtype), f"fp8.high_precision=[{', '.join(names)}]"]
                    jobs.append((name, args.configs[0], hp, True, threads))
        if classes and not args.summary:
            print(f"class runs: {len(jobs) - len(todo)} to run", flush=True)
        if args.jobs == 1:
            for name, *a in jobs:
                _finish(results, name, train_one(*a))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
                futures = {pool.submit(train_one, *a): name for name, *a in jobs}
                for fut in cf.as_completed(futures):
                    _finish(results, futures[fut], fut.result())
        summarise(results, args.configs, args.seeds, dtype, args.steps)
        if classes:
            summarise_classes(results, args.configs[0], list(classes), args.seeds, dtype)
    except UserError as e:
        print(f"fp8_loss_gap: {e}", file=sys.stderr)
        return 2
    return 0


def _finish(results: Results, name: str, run: dict) -> None:
    results.add(name, run)
    print(f"{name}: smoothed loss {run['smoothed']:.5f} ({run['wall_s']:.0f} s wall, {run['cpu_s']:.0f} s CPU)",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
