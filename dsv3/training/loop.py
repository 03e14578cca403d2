"""The training loop both trainers run (``dsv3/train.py``): one process or plain data parallel through
``dsv3.training.local_steps.LocalSteps``, PP × DP (EP inside DP) with ZeRO-1 through
``parallel.steps.ParallelSteps``. ``run_loop`` takes LR, λ, γ and the batch ramp from ``Schedule``, guards
against divergence (``StepGuard``), honours stop requests, logs one record per step, evaluates, writes
checkpoints and ends with the greedy sample, the same code for every layout.

``Dist`` is this process's place in the run (world 1 without torchrun); ``evaluate`` and ``sample_text`` run
on a whole model (the step interfaces call them, or their pipeline versions in ``parallel/pipeline_eval.py``).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from dsv3.checkpoint.run_dir import clear_for_fresh_run, truncate_metrics
from dsv3.checkpoint.store import remove_stale_partials
from dsv3.config import Config, to_dict
from dsv3.data.dataset import Dataset
from dsv3.errors import UserError
from dsv3.model.moe import max_violation
from dsv3.model.params import count_params
from dsv3.model.sampling import generate
from dsv3.model.transformer import Transformer
from dsv3.training.balance_metrics import BalanceMonitor
from dsv3.training.faults import fault_point, set_step
from dsv3.training.lr_schedule import Schedule
from dsv3.training.runtime import choose_dtype, gpu_speed_defaults, peak_flops
from dsv3.training.stops import NAMES, StopRequests, exit_code, restore
from dsv3.training.train_log import StepLogger, final_line, step_line


class Dist:
    """This process's place in a data-parallel run (world 1 without torchrun)."""

    def __init__(self, backend: str = "auto", timeout_s: float = 1800.0, force: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if (self.world > 1 or force) and not dist.is_initialized():
            if self.world == 1:   # parallel.force without a launcher: a group of one
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", "29500")
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            if backend == "auto":
                backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))

    def all_reduce_(self, tensors: list[torch.Tensor], average: bool) -> None:
        if self.world == 1:
            return
        for t in tensors:
            on = t.to(self.device)   # NCCL reduces device tensors only (a no-op when t is already there)
            dist.all_reduce(on)
            if on is not t:
                t.copy_(on)
            if average:
                t.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, err: Optional[BaseException]) -> None:
        """Every rank learns whether any rank failed a set-up step: the failing rank raises its own
        error, the others one saying where to look (no rank is left waiting for a collective)."""
        failed = err is not None
        if self.world > 1:
            flag = torch.tensor([int(failed)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = bool(flag.item())
        if err is not None:
            raise err
        if failed:
            raise UserError(f"rank {self.rank}: another rank stopped during set-up (its message says why)")


class Diverged(Exception):
    """train.max_skipped_steps consecutive steps had a non-finite loss or gradient norm: exit 3."""


class Stopped(Exception):
    """A graceful stop (signal or time limit) after a checkpoint: ``main`` prints it and exits with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def flops_per_token(cfg: Config, activated_no_embed: int) -> float:
    """6·N_activated for the weights plus causal attention's QKᵀ and PV, forward and backward."""
    mla, T = cfg.model.mla, cfg.data.seq_len
    attn = 3 * cfg.model.n_layers * mla.n_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim) * T
    return 6.0 * activated_no_embed + attn


def run_setup(cfg: Config, env: Dist, data: Dataset, step: int, layout: str = "", resumed: Optional[str] = None):
    """What every training loop needs before its first step: FLOPs per token and the peak for MFU (None:
    unknown GPU), the autocast context, and the step logger; prints the start-up block on rank 0."""
    t = cfg.train
    counts = count_params(cfg.model)
    flops_per_tok = flops_per_token(cfg, counts.activated_no_embed)
    dtype, why = choose_dtype(t.dtype, env.device)
    gpu_speed_defaults(env.device)
    peak, peak_name = peak_flops(env.device, dtype, env.world, t.peak_tflops, cfg.fp8.enabled)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    log = StepLogger(t.out_dir, t.steps, step, enabled=env.rank == 0, wandb_project=t.wandb,
                     config=to_dict(cfg))
    pc = cfg.parallel
    device = (f"{env.device} ({torch.cuda.get_device_name(env.device)})" if env.device.type == "cuda"
              else f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")
    fp8 = "off"
    if cfg.fp8.enabled:
        from triton_kernels.backend import resolve_backend
        fp8 = f"on, backend {resolve_backend(cfg.fp8.backend, env.device)} (fp8.backend={cfg.fp8.backend})"
    sched = pc.pp_schedule if pc.pp > 1 else "none"
    for line in (
            f"device   {device}",
            f"dtype    {dtype}: {why}",
            f"fp8      {fp8}",
            f"layout   world {env.world}: PP {pc.pp} x DP {env.world // pc.pp} (EP {pc.ep} inside DP), "
            f"schedule {sched}{layout}",
            f"model    {counts.total / 1e6:.2f}M params, {counts.activated / 1e6:.2f}M activated",
            f"data     {cfg.data.path or 'embedded corpus'}: {data.n_train_tokens:,} train / {data.n_val_tokens:,} "
            f"val tokens, tokenizer {cfg.data.tokenizer} (vocab {cfg.model.vocab_size}), seq_len {cfg.data.seq_len}",
            f"run      {t.out_dir} ({f'resumed from {resumed} at step {step}' if resumed else 'fresh start'})",
            f"MFU      of {peak_name}"):
        log.print(line)
    return flops_per_tok, peak, autocast, log


def _profiler(cfg: Config, env: Dist):
    """``train.profile_steps=[a, b]``: a torch.profiler schedule recording steps a..b (1-based), its Chrome
    trace and top-ops table written into RUN/profile/ when b ends. None when unset."""
    steps = cfg.train.profile_steps
    if not steps:
        return None
    a, b = steps
    out = os.path.join(cfg.train.out_dir, "profile")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if env.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)

    def ready(prof) -> None:
        os.makedirs(out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out, f"trace_rank{env.rank}.json"))
        sort = "self_cuda_time_total" if env.device.type == "cuda" else "self_cpu_time_total"
        with open(os.path.join(out, f"top_ops_rank{env.rank}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
    # the profiler steps once per training step from the run's first step: skip to a (one warm-up step before it)
    warm = 1 if a > 1 else 0
    return torch.profiler.profile(activities=acts, record_shapes=True, on_trace_ready=ready,
                                  schedule=torch.profiler.schedule(wait=a - 1 - warm, warmup=warm,
                                                                   active=b - a + 1, repeat=1))


def evaluate(model: Transformer, data: Dataset, cfg: Config, autocast,
             monitor: Optional[BalanceMonitor] = None) -> float:
    """Mean LM loss over the fixed validation batches; with a monitor, the routers' choices are also
    counted per domain tag of each sequence (read them with ``monitor.take_domain_loads()``)."""
    model.eval()
    total, count = 0.0, 0
    tags = data.val_batch_domains(cfg.train.micro_batch_size, cfg.train.eval_batches) if monitor else None
    with torch.no_grad(), autocast():
        for i, batch in enumerate(data.val_batches(cfg.train.micro_batch_size, cfg.train.eval_batches)):
            if monitor is not None:
                monitor.domains = tags[i]
            out = model(batch[:, :-1], labels=batch[:, 1:])
            total += out.lm_loss.item() * batch.shape[0]
            count += batch.shape[0]
    model.train()
    return total / max(count, 1)


def sample_text(model: Transformer, data: Dataset, cfg: Config) -> str:
    """The end-of-run greedy sample: ``train.sample_prompt`` and ``train.sample_tokens`` new tokens, decoded."""
    prompt = data.tokenizer.encode(cfg.train.sample_prompt)
    ids = generate(model, data.tokenizer, prompt, max_new_tokens=cfg.train.sample_tokens, temperature=0.0)
    return data.tokenizer.decode(prompt + ids)


def commit_run_dir(cfg: Config, env: Dist, data: Dataset, step: int) -> None:
    """After the resume checkpoint (if any) has been validated and loaded: config.yaml, corpus.json,
    metrics.jsonl cut back to ``step``, partial checkpoint folders of a killed run removed."""
    t = cfg.train
    if env.rank == 0:
        if t.resume == "none" and t.overwrite:
            clear_for_fresh_run(t.out_dir)
        remove_stale_partials(t.out_dir)
        truncate_metrics(t.out_dir, step)
        tmp = os.path.join(t.out_dir, f"config.yaml.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        os.replace(tmp, os.path.join(t.out_dir, "config.yaml"))
        data.write_manifest(t.out_dir)
    env.barrier()


class StepGuard:
    """The divergence guard and the stop requests, shared by both loops. ``finite`` is computed from
    values every rank holds identically (all-reduced losses, the global gradient norm), so every rank
    skips the same steps; the stop request is all-reduced in ``after_step``."""

    def __init__(self, cfg: Config, env: Dist, stops: StopRequests):
        self.t, self.env, self.stops = cfg.train, env, stops
        self.consecutive = 0
        self.skipped_total = 0

    def check(self, loss: float, grad_norm: float, step: int) -> bool:
        """True if the step may update the weights; counts skips; raises Diverged after too many."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.t.max_skipped_steps:
            raise Diverged(f"training diverged: {self.consecutive} consecutive steps (to step {step}) had a non-finite "
                           f"loss ({loss}) or gradient norm ({grad_norm}); no checkpoint was written after the last "
                           f"finite one; lower train.lr or check the data (train.max_skipped_steps={self.t.max_skipped_steps})")
        return False

    def after_step(self, step_time_s: float) -> int:
        return self.stops.agreed(self.env.device if self.env.world > 1 else None, step_time_s)


def stop_message(req: int, step: int, ckpt: str) -> str:
    return (f"stopped by {NAMES[req]} after step {step}; checkpoint {ckpt} written; "
            f"continue with train.resume=auto")


def run_loop(cfg: Config, env: Dist, data: Dataset, steps, start: float, old_handlers: dict) -> dict:
    """The one training loop, for every layout: ``steps`` is ``dsv3.training.local_steps.LocalSteps`` or
    ``parallel.steps.ParallelSteps``.
    LR, λ, γ and the batch come from ``Schedule``; the divergence guard and the stop requests from
    ``StepGuard``; every step logs one record (balance fields where the whole model runs on this rank)."""
    t, rank0 = cfg.train, env.rank == 0
    sampler = data.train_sampler(t.micro_batch_size, t.seed, steps.dp_index, steps.dp)
    step, tokens = 0, 0
    ckpt = steps.latest(t.out_dir) if t.resume == "auto" else (None if t.resume == "none" else t.resume)
    if ckpt is not None:
        state = steps.load(ckpt)
        step, tokens = state["step"], state["tokens"]
        sampler.load_state_dict(state["sampler"])
        if rank0:
            print(f"resumed from {ckpt} at step {step} ({tokens:,} tokens)", flush=True)
    commit_run_dir(cfg, env, data, step)
    flops_per_tok, peak, autocast, log = run_setup(cfg, env, data, step, steps.layout, resumed=ckpt)
    if t.profile_steps and t.profile_steps[0] <= step:
        raise UserError(f"train.profile_steps={list(t.profile_steps)}: the run resumes at step {step}, after step "
                        f"{t.profile_steps[0]}; profile later steps")
    prof = _profiler(cfg, env)
    if prof is not None:
        prof.__enter__()
        for _ in range(step):   # a resumed run: the schedule counts from step 1
            prof.step()
    sched = Schedule(cfg, steps.dp, cfg.parallel.pp if steps.pp > 1 else 1, cfg.parallel.pp_schedule)
    monitor = steps.balance_monitor()
    losses: list[float] = []
    saved_at, req = step, 0
    restore(old_handlers)
    try:
        with StopRequests(t.time_limit_s, start) as stops:
            guard = StepGuard(cfg, env, stops)
            while step < t.steps:
                t0 = time.perf_counter()
                lr, mtp_weight, gamma, n_micro = sched.at(step, tokens)
                rows = torch.cat([sampler.next_batch() for _ in range(n_micro)])
                if env.device.type == "cuda":   # pinned host memory: the copy overlaps the previous step's tail
                    rows = rows.pin_memory().to(env.device, non_blocking=True)
                set_step(step + 1)
                stats = steps.train_step(rows, lr, mtp_weight, gamma, autocast,
                                         lambda loss, norm: guard.check(loss, norm, step + 1), monitor)
                step_tokens = rows[:, :-1].numel() * steps.dp
                tokens += step_tokens
                step += 1
                loads, skipped = stats.pop("loads"), stats.pop("skipped")
                maxvio = [max_violation(load) for load in loads]
                dt = time.perf_counter() - t0
                if prof is not None:
                    prof.step()
                record = dict(step=step, tokens=tokens, **stats, lr=lr, sequences=rows.shape[0] * steps.dp,
                              tokens_per_s=step_tokens / dt, mfu=step_tokens * flops_per_tok / dt / peak if peak else None,
                              maxvio_mean=sum(maxvio) / max(len(maxvio), 1), maxvio_max=max(maxvio, default=0.0),
                              maxvio=maxvio)
                record.update(monitor.step_fields(loads))
                line = step_line(record, t.steps) if step % t.log_every == 0 or step == t.steps else None
                if skipped:
                    record.update(skipped=True, skipped_steps=guard.skipped_total)
                    line = (f"step {step:>5}/{t.steps} | skipped: non-finite loss {stats['loss']} or grad norm "
                            f"{stats['grad_norm']} ({guard.consecutive} in a row, {guard.skipped_total} in all)")
                losses.append(stats["loss"])
                log.log(record, line)
                fault_point("step", step)
                req = guard.after_step(dt)
                if t.eval_every and step % t.eval_every == 0 and step < t.steps and not req:
                    val = steps.evaluate(data, cfg, autocast, monitor)
                    log.log(dict(step=step, val_loss=val, **monitor.take_domain_loads()),
                            f"step {step:>5}/{t.steps} | val loss {val:.4f}", advance=False)
                if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps or req:
                    steps.save(t.out_dir, step, dict(tokens=tokens, sampler=sampler.state_dict()))
                    saved_at = step
                if req:
                    break

        result: dict = dict(losses=losses)
        if req:
            raise Stopped(stop_message(req, step, os.path.join(t.out_dir, f"ckpt_{saved_at:07d}")), exit_code(req))
        # every rank evaluates (the expert all-to-all and the pipeline need them all); rank 0 logs
        val = steps.evaluate(data, cfg, autocast, monitor)
        ent = data.val_unigram_entropy()
        domain = monitor.take_domain_loads()
        log.log(dict(step=step, val_loss=val, val_unigram_entropy=ent, **domain), advance=False)
        log.print(final_line(val, ent))
        if t.sample_tokens > 0:   # every rank decodes (the pipeline and the expert all-to-all need them all)
            result["sample"] = steps.sample_text(data, cfg)
            log.print(f"sample: {result['sample']!r}")
        result.update(val_loss=val, val_unigram_entropy=ent, val_maxvio=domain.get("val_maxvio"))
        log.close()
        return result
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        log.close()
