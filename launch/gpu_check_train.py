"""Parts 3–5 of the GPU check: training runs through ``python -m dsv3.train``, compared step by step.

3. configs/small_moe.yaml, 20 steps, BF16 autocast: plain, FP8 with the Triton kernels, FP8 with the
   torch fake-quant reference (``fp8.backend=torch``). Tokens/s (median after the first steps, which
   compile), MFU against dsv3/tools/hardware.py's dense peak, and every step's FP8 loss within 1e-3 relative
   of the reference run with the same seed on the same GPU (report §3.3: FP8 training stays within
   0.25% of BF16; the two FP8 backends compute the same quantised products, FP32 sums in another order).
4. The parallelize() path with ZeRO-1 on a process group of world size 1 (``parallel.force=true``, NCCL
   on the GPU): every step's loss and gradient norm within 1e-3 relative of the one-process loop.
5. One run in this process under ``torch.cuda.set_sync_debug_mode("warn")`` and the profiler: host
   syncs per step and whether the attention ran as a fused kernel (flash / cuDNN / efficient). Reported,
   never failed on.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-3
# the dry run: configs/debug.yaml shrunk to one MoE layer, so the interpreted FP8 kernels take seconds
TINY = ["model.vocab_size=512", "model.dim=32", "model.n_layers=1", "model.n_dense_layers=0", "model.inter_dim=48",
        "data.seq_len=16", "data.tokenizer_sample_mb=0.5", "model.mla.n_heads=2", "model.mla.q_lora_rank=null",
        "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
        "model.mla.v_head_dim=8", "model.moe.n_routed_experts=4", "model.moe.moe_inter_dim=16",
        "model.moe.n_activated_experts=2", "model.moe.n_shared_experts=0", "model.moe.n_group=1", "model.moe.topk_group=1", "model.mtp.depth=0",
        "train.micro_batch_size=2", "train.global_batch=2"]
FP8_RUNS = [("bf16", []), ("fp8", ["fp8.enabled=true", "fp8.backend=triton"]),
            ("fp8_ref", ["fp8.enabled=true", "fp8.backend=torch"])]


def setup(dry: bool, steps_gpu: int) -> tuple[str, list[str], int]:
    """(config path, overrides shared by every run, steps)."""
    steps = 2 if dry else steps_gpu
    common = [f"train.steps={steps}", "train.dtype=bf16", "train.eval_every=0", "train.eval_batches=1",
              "train.sample_tokens=0", "train.ckpt_every=0", "train.overwrite=true",
              f"data.cache_dir={REPO / '.cache' / 'dsv3'}"]
    if dry:
        return str(REPO / "configs" / "debug.yaml"), TINY + common, steps
    return str(REPO / "configs" / "small_moe.yaml"), common, steps


def train_run(name: str, config: str, overrides: list[str], work: str, timeout_s: float) -> dict:
    """One ``python -m dsv3.train`` subprocess; its per-step records from the run folder's metrics.jsonl."""
    out_dir = os.path.join(work, "runs", name)
    cmd = [sys.executable, "-m", "dsv3.train", config, *overrides, f"train.out_dir={out_dir}"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout_s, 1))
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    with open(os.path.join(work, f"run_{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + output)
    records = []
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            records = [r for r in map(json.loads, f) if "loss" in r and "val_loss" not in r]
    lines = [s for s in output.strip().splitlines() if s.strip()]
    err = next((s for s in reversed(lines) if s.startswith("error") or "Error" in s), lines[-1] if lines else "")
    return dict(name=name, rc=rc, seconds=time.monotonic() - t0, records=records, error=err[:300])


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def median_tokens_per_s(records: list[dict]) -> tuple[float, str]:
    """Median tokens/s after the first steps (Triton compiles and caches warm up there)."""
    skip = min(5, len(records) // 2)
    rest = records[skip:]
    if not rest:
        return float("nan"), "no steps"
    return _median(r.get("tokens_per_s") for r in rest), f"median of steps {skip + 1}–{len(records)}"


def _median(values) -> float:
    """Median of the numbers among ``values`` (a field the trainer leaves out or sets to None is skipped)."""
    nums = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else float("nan")


def model_flops_per_token(config: str, overrides: list[str]) -> float:
    from dsv3.config import load_config
    from dsv3.model.params import count_params
    from dsv3.training.loop import flops_per_token
    cfg = load_config(config, overrides)
    return flops_per_token(cfg, count_params(cfg.model).activated_no_embed)


def peaks(dry: bool):
    """(BF16 TFLOPS, FP8 TFLOPS, why not) of this GPU from dsv3/tools/hardware.py; (None, None, why) on CPU."""
    if dry:
        return None, None, "MFU n/a (CPU)"
    import torch
    gpu, why = hardware_row(torch.cuda.get_device_name())
    return (gpu.bf16_dense_tflops, gpu.fp8_dense_tflops, "") if gpu else (None, None, why)


def hardware_row(device_name: str):
    """(GPU row or None, why not) from dsv3/tools/hardware.py, imported lazily: MFU degrades to n/a without it."""
    try:
        from dsv3.tools import hardware
        gpu = hardware.gpu_from_device_name(device_name)
    except (ImportError, AttributeError) as e:
        return None, f"MFU n/a: dsv3/tools/hardware.py unavailable ({type(e).__name__}: {e})"
    return gpu, ("" if gpu else f"MFU n/a ({device_name} is not in dsv3/tools/hardware.py)")


def _budget(a) -> float:
    return time.monotonic() + (a.budget or 600) - 3


# ------------------------------------------------------------------------------------------- part 3
def part_train(sec, a) -> None:
    deadline = _budget(a)
    config, common, steps = setup(a.dry_run, 20)
    bf16_peak, fp8_peak, why = peaks(a.dry_run)
    try:
        flops_per_tok = model_flops_per_token(config, common)
    except Exception as e:  # noqa: BLE001 - MFU only; the runs go on
        flops_per_tok, why = None, f"MFU n/a: FLOPs per token unavailable ({type(e).__name__}: {e})"
    sec.line(f"`python -m dsv3.train {os.path.relpath(config, REPO)}` with {' '.join(common[:-1])}, seed 0; "
             f"{'FLOPs/token ' + format(flops_per_tok, '.3g') + '; ' if flops_per_tok else ''}peaks: "
             + (f"BF16 {bf16_peak:g}, FP8 {fp8_peak:g} dense TFLOPS (dsv3/tools/hardware.py)" if bf16_peak else why) + "\n")
    fp8_runs = list(FP8_RUNS)
    if not a.dry_run and importlib.util.find_spec("transformer_engine") is not None:
        # fp8.backend=te (triton_kernels/te_backend.py): TE's Float8BlockScaling Linears, reported beside ours
        fp8_runs.append(("fp8_te", ["fp8.enabled=true", "fp8.backend=te", "fp8.cache_wo_e5m6=false",
                                    "fp8.cache_swiglu_fp8=false", "fp8.grad_dispatch=false"]))
    else:
        sec.line("Transformer Engine not installed (or dry run): the fp8.backend=te run is skipped.\n")
    sec.table("run", "extra overrides", "exit", "steps", "tokens/s", "MFU (hardware table)", "trainer's MFU",
              "last loss", "seconds")
    runs = {}
    for name, extra in fp8_runs:
        r = runs[name] = train_run(name, config, common + extra, a.work, deadline - time.monotonic())
        recs = r["records"]
        tps, how = median_tokens_per_s(recs)
        mfu = "n/a"
        if bf16_peak and flops_per_tok and recs:
            mfu = f"{100 * tps * flops_per_tok / (bf16_peak * 1e12):.2f}% of BF16"
            if name != "bf16":
                mfu += f", {100 * tps * flops_per_tok / (fp8_peak * 1e12):.2f}% of FP8"
        trainer_mfu = _median(x.get("mfu") for x in recs[len(recs) // 2:])
        trainer = f"{100 * trainer_mfu:.2f}%" if math.isfinite(trainer_mfu) else "n/a"
        sec.row(name, " ".join(extra) or "-", "timeout" if r["rc"] is None else r["rc"], len(recs),
                f"{tps:,.0f} ({how})" if recs else "n/a", mfu, trainer,
                f"{recs[-1]['loss']:.5f}" if recs else "n/a", f"{r['seconds']:.0f}")
        if r["rc"] != 0:
            sec.line(f"\n`{name}` failed: `{r['error']}`\n")
    sec.line(f"\nPer-step loss; rel = |fp8 − fp8_ref| / |fp8_ref| (bound {LOSS_RTOL:g}):\n")
    sec.table("step", "bf16", "fp8", "fp8_ref", "rel")
    worst, compared = 0.0, 0
    by_step = {n: {r["step"]: r for r in runs[n]["records"]} for n in runs}
    for step in range(1, steps + 1):
        cells = [by_step[n].get(step, {}).get("loss") for n in ("bf16", "fp8", "fp8_ref")]
        d = rel(cells[1], cells[2]) if cells[1] is not None and cells[2] is not None else None
        if d is not None:
            worst, compared = max(worst, d if math.isfinite(d) else math.inf), compared + 1
        sec.row(step, *(f"{c:.6f}" if c is not None else "-" for c in cells), f"{d:.2e}" if d is not None else "-")
    fp8_on = any(by_step["fp8"].get(s, {}).get("loss") != by_step["bf16"].get(s, {}).get("loss")
                 for s in by_step["fp8"])
    ok = (all(r["rc"] == 0 and len(r["records"]) == steps for r in runs.values())
          and compared == steps and worst <= LOSS_RTOL and fp8_on)
    sec.line(f"\nworst FP8 vs reference: {worst:.2e} over {compared} of {steps} steps"
             + ("" if fp8_on else "; the FP8 losses equal the BF16 ones: FP8 was not applied"))
    if "fp8_te" in runs:   # reported, not judged: TE's recipe rounds its own way
        te_steps = {r["step"]: r["loss"] for r in runs["fp8_te"]["records"]}
        diffs = [rel(te_steps[s], by_step["fp8_ref"][s]["loss"]) for s in te_steps if s in by_step["fp8_ref"]]
        sec.line(f"\nfp8.backend=te vs the torch reference: worst rel {max(diffs, default=math.nan):.2e} over "
                 f"{len(diffs)} steps (exit {runs['fp8_te']['rc']})")
    tps = {n: median_tokens_per_s(runs[n]["records"])[0] for n in runs}
    sec.done("PASS" if ok else "FAIL", f"FP8 vs torch reference worst {worst:.1e} (bound {LOSS_RTOL:g}); tokens/s "
             + ", ".join(f"{n} {v:,.0f}" for n, v in tps.items()))


# ------------------------------------------------------------------------------------------- part 4
def part_zero1(sec, a) -> None:
    deadline = _budget(a)
    config, common, steps = setup(a.dry_run, 5)
    backend = "gloo" if a.dry_run else "nccl"
    common = common + ["train.warmup_steps=1"]     # full LR from step 1: a wrong update shows in the loss
    sec.line(f"One process (`LocalSteps`) against `parallel.force=true parallel.backend={backend}` "
             f"(`ParallelSteps`, ZeRO-1, world size 1), {steps} steps, same seed; bound {LOSS_RTOL:g} relative.\n")
    local = train_run("local", config, common, a.work, (deadline - time.monotonic()) / 2)
    zero1 = train_run("zero1", config, common + ["parallel.force=true", f"parallel.backend={backend}"], a.work,
                      deadline - time.monotonic())
    for r in (local, zero1):
        if r["rc"] != 0:
            sec.line(f"`{r['name']}` exited {'by timeout' if r['rc'] is None else r['rc']}: `{r['error']}`\n")
    sec.table("step", "loss local", "loss ZeRO-1", "rel", "grad norm local", "grad norm ZeRO-1", "rel")
    worst, compared = 0.0, 0
    zs = {r["step"]: r for r in zero1["records"]}
    for r in local["records"]:
        z = zs.get(r["step"])
        if z is None:
            sec.row(r["step"], f"{r['loss']:.6f}", "-", "-", f"{r['grad_norm']:.6f}", "-", "-")
            continue
        d_loss, d_norm = rel(z["loss"], r["loss"]), rel(z["grad_norm"], r["grad_norm"])
        worst, compared = max(worst, d_loss, d_norm), compared + 1
        sec.row(r["step"], f"{r['loss']:.6f}", f"{z['loss']:.6f}", f"{d_loss:.2e}",
                f"{r['grad_norm']:.6f}", f"{z['grad_norm']:.6f}", f"{d_norm:.2e}")
    ok = local["rc"] == 0 and zero1["rc"] == 0 and compared == steps and worst <= LOSS_RTOL
    sec.done("PASS" if ok else "FAIL", f"ZeRO-1 ({backend}, world 1) vs one process: worst {worst:.1e} over "
             f"{compared} of {steps} steps" + ("" if zero1["rc"] == 0 else f"; ZeRO-1 run failed: {zero1['error']}"))


# ------------------------------------------------------------------------------------------- part 5
FUSED_ATTENTION = re.compile(r"flash|fmha|cudnn.*(sdpa|attention|mha)|efficient_attention|mem_eff", re.I)


def part_syncs(sec, a) -> None:
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    import dsv3.train as T
    import dsv3.training.loop as loop
    from dsv3.config import load_config
    config, common, steps = setup(a.dry_run, 6)
    cfg = load_config(config, common + [f"train.out_dir={os.path.join(a.work, 'runs', 'syncs')}"])
    cuda = torch.cuda.is_available()
    marks: list[int] = []
    orig_set_step = loop.set_step

    def set_step(step: int) -> None:   # the loop calls it once at the start of every step
        marks.append(len(caught))
        orig_set_step(step)

    loop.set_step = set_step
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=activities) as prof:
                T.train(cfg)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            loop.set_step = orig_set_step
    syncs = [sum("synchroniz" in str(w.message) for w in caught[b:e]) for b, e in zip(marks, marks[1:])]
    if cuda:
        sec.line(f"Host syncs per step (`set_sync_debug_mode(\"warn\")`), steps 1–{len(syncs)} of {steps} "
                 f"(the last step's interval also holds the final eval, so it is left out): {syncs}; "
                 f"median {statistics.median(syncs) if syncs else 'n/a'} (issue 17 D wants 1)")
    else:
        sec.line("Host syncs: n/a on the CPU (CUDA's sync debug mode needs a GPU)")
    events = prof.key_averages()
    is_device = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernels = sorted(is_device, key=lambda e: -getattr(e, "self_device_time_total", 0))
    total = sum(getattr(e, "self_device_time_total", 0) for e in kernels) or 1
    sdpa_ops = sorted({e.key for e in events if "scaled_dot_product" in e.key})
    fused = sorted({e.key[:90] for e in (kernels if cuda else events) if FUSED_ATTENTION.search(e.key)})
    sec.line(f"SDPA ops seen: {', '.join(f'`{k}`' for k in sdpa_ops) or 'none (attention not through SDPA)'}")
    sec.line(f"Fused attention {'kernels' if cuda else 'ops'}: {', '.join(f'`{k}`' for k in fused) or 'none seen'}")
    if kernels:
        sec.line("\nTop kernels by GPU time:\n")
        sec.table("kernel", "share", "calls")
        for e in kernels[:10]:
            sec.row(f"`{e.key[:100]}`", f"{100 * e.self_device_time_total / total:.1f}%", e.count)
    med = statistics.median(syncs) if cuda and syncs else None
    sec.done("INFO", (f"syncs/step median {med}; " if med is not None else "syncs n/a on CPU; ")
             + f"fused attention {'seen' if fused else 'not seen'}")
