"""Pretraining loop: ``python -m dsv3.train [CONFIG.yaml] [key.path=value ...]``.

AdamW on FP32 master weights (optionally BF16 moments), warmup + token-segment LR schedule, batch
ramp, gradient accumulation, clipping at 1.0, FP32 or BF16 autocast, optional recomputation, the
aux-loss-free bias update after every optimizer step (γ until ``bias_update_stop_tokens``), the MTP
weight λ switched by token count, atomic checkpoints and ``train.resume=auto``.
With WORLD_SIZE > 1 (torchrun) ranks run data parallel: each takes its slice of the global batch,
gradients are averaged and expert loads summed before the bias update.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from dsv3.training.balance_metrics import BalanceMonitor
from dsv3.data.batch import resolved
from dsv3.checkpoint.store import (latest_checkpoint, load_any_checkpoint, prune_checkpoints, remove_stale_partials,
                             save_checkpoint)
from dsv3.config import Config, load_config, to_dict
from dsv3.data.dataset import Dataset, prepare_data
from dsv3.errors import CheckpointError, UserError
from dsv3.training.faults import PeerError, fault_point, first_line, set_step
from dsv3.training.lr_schedule import Schedule
from dsv3.model.transformer import Transformer
from dsv3.model.moe import max_violation
from dsv3.training.optim import build_optimizer, clip_grad_norm
from dsv3.model.params import count_params
from dsv3.checkpoint.run_dir import RunLock, clear_for_fresh_run, has_checkpoints, truncate_metrics
from dsv3.training.runtime import choose_dtype, gpu_speed_defaults, peak_flops, region
from dsv3.training.stops import Interrupted, StopRequests, exit_code, raise_on_signal, restore
from dsv3.training.train_log import StepLogger, final_line, step_line

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug.yaml")


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
            from datetime import timedelta
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


def run_setup(cfg: Config, env: "Dist", data: Dataset, step: int, layout: str = "", resumed: Optional[str] = None):
    """What every training loop needs before its first step: FLOPs per token and the peak for MFU (None:
    unknown GPU), the autocast context, and the step logger; prints the start-up block on rank 0."""
    t = cfg.train
    counts = count_params(cfg.model)
    fpt = flops_per_token(cfg, counts.activated_no_embed)
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
    return fpt, peak, autocast, log


def _profiler(cfg: Config, env: "Dist"):
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
    from dsv3.tools.generate import generate
    prompt = data.tokenizer.encode(cfg.train.sample_prompt)
    ids = generate(model, data.tokenizer, prompt, max_new_tokens=cfg.train.sample_tokens, temperature=0.0)
    return data.tokenizer.decode(prompt + ids)


def _open_run_dir(cfg: Config, env: Dist) -> tuple[Optional[RunLock], Dataset]:
    """Rank 0 takes the run folder's lock and refuses a fresh run over an old one's checkpoints;
    data is prepared (rank 0 first: it fills the shared caches). Nothing in the folder is written yet."""
    t = cfg.train
    lock, data, err = None, None, None
    if env.rank == 0:
        try:
            lock = RunLock(t.out_dir, t.lock_stale_s)
            lock.acquire()
            old = has_checkpoints(t.out_dir)
            if t.resume == "none" and old and not t.overwrite:
                raise UserError(f"train.out_dir={t.out_dir} holds checkpoints of another run ({old[-1]}); pass "
                                f"train.resume=auto to continue it, train.overwrite=true to replace it, or another out_dir")
            data = prepare_data(cfg.data, cfg.model.vocab_size, None, seed=t.seed)
        except UserError as e:
            err = e
            if lock is not None:
                lock.release()
                lock = None
    env.agree(err)
    if env.rank != 0:
        data = prepare_data(cfg.data, cfg.model.vocab_size, None, seed=t.seed)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size}; raise model.vocab_size")
    return lock, data


def _commit_run_dir(cfg: Config, env: Dist, data: Dataset, step: int) -> None:
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
        import math
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


def _stop_message(req: int, step: int, ckpt: str) -> str:
    from dsv3.training.stops import NAMES
    return (f"stopped by {NAMES[req]} after step {step}; checkpoint {ckpt} written; "
            f"continue with train.resume=auto")


def train(cfg: Config) -> dict:
    """Run training; returns final metrics (val_loss, val_unigram_entropy, val_maxvio per MoE layer,
    losses per step, the end sample's text). Raises Stopped after a graceful stop, Diverged, Interrupted, UserError."""
    start = time.monotonic()
    old_handlers = raise_on_signal()
    env = Dist(cfg.parallel.backend, cfg.parallel.timeout_s, cfg.parallel.force)
    pc = cfg.parallel
    parallel = pc.force or (env.world > 1 and (pc.pp > 1 or pc.ep > 1 or pc.zero1))
    torch.manual_seed(cfg.train.seed)
    lock = None
    try:
        # train.micro_batch_size=auto becomes a number for this layout (dsv3/data/batch.py) before anything reads it
        # (a world that pp does not divide is refused by parallel/mesh.py, which names the numbers)
        if not parallel:
            cfg = resolved(cfg, env.world)
        elif env.world % pc.pp == 0:
            cfg = resolved(cfg, env.world // pc.pp, pc.pp, pc.pp_schedule)
        t = cfg.train
        lock, data = _open_run_dir(cfg, env)
        if t.weights_dtype == "bf16" and not parallel:   # BF16 weights live in ZeRO-1 (parallel/zero.py)
            raise UserError("train.weights_dtype=bf16 needs the ZeRO-1 path: more than one rank, or parallel.force=true")
        if parallel and t.init_from is None:
            # parallelize() materialises only this rank's stages and experts (same values as the whole model)
            with torch.device("meta"):
                model = Transformer(cfg.model, seed=t.seed)
        else:
            model = Transformer(cfg.model, seed=t.seed).to(env.device)
        if cfg.fp8.enabled:
            from dsv3.training.precision import apply_fp8
            apply_fp8(model, cfg.fp8, env.device)
        if t.init_from is not None:   # a resumed checkpoint (train.resume) overwrites these weights later
            from dsv3.checkpoint.init_from import init_from
            info = init_from(t.init_from, model)
            if env.rank == 0:
                print(f"initialised from {info['checkpoint']} ({info['kind']}); fresh optimizer at step 0", flush=True)
        model.set_recompute(t.recompute)
        model.train()
        if parallel:
            return train_parallel(cfg, env, data, model, start, old_handlers)
        return _loop(cfg, env, data, LocalSteps(cfg, env, model), start, old_handlers)
    finally:
        restore(old_handlers)
        if lock is not None:
            lock.release()


class LocalSteps:
    """The step interface on one process, or plain data parallel (``parallel.zero1=false``): the whole
    model and optimizer on every rank, gradients averaged by all-reduce. ``ParallelSteps`` is the
    other implementation; ``_loop`` drives either."""

    def __init__(self, cfg: Config, env: Dist, model: Transformer):
        self.cfg, self.env, self.model = cfg, env, model
        self.optimizer = build_optimizer(model, cfg.train)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp, self.dp_index, self.pp = env.world, env.rank, 1
        self.eval_model = model     # eval, balance hooks and the end sample run on it
        self.layout = ""

    def balance_monitor(self) -> BalanceMonitor:
        return BalanceMonitor(self.model)

    def evaluate(self, data: Dataset, cfg: Config, autocast, monitor) -> float:
        return evaluate(self.model, data, cfg, autocast, monitor)

    def sample_text(self, data: Dataset, cfg: Config) -> str:
        return sample_text(self.model, data, cfg)

    def train_step(self, rows: torch.Tensor, lr: float, mtp_weight: float, gamma: Optional[float], autocast,
                   may_step, monitor: BalanceMonitor) -> dict:
        """One optimizer step on this replica's rows (C micro-batches of micro_batch_size): the loss is
        the mean over the global batch (each micro-batch's mean / C, averaged over replicas)."""
        model, env, t = self.model, self.env, self.cfg.train
        C = rows.shape[0] // t.micro_batch_size
        model.mtp_weight = mtp_weight
        model.set_aux_loss_scale(1.0 / C)
        names = ("loss", "lm_loss", "mtp_loss", "balance_loss")
        parts = torch.zeros(len(names), dtype=torch.float64, device=env.device)   # synced once per step
        for micro, batch in enumerate(rows.split(t.micro_batch_size)):
            with region("forward"), autocast():
                out = model(batch[:, :-1], labels=batch[:, 1:])
            with region("backward"):
                (out.loss / C).backward()
            monitor.after_forward(C)
            if micro == 0:
                fault_point("micro")
            parts += torch.stack([getattr(out, k).detach().double() for k in names]) / C
        with region("grad all-reduce"):
            env.all_reduce_([p.grad for p in self.params if p.grad is not None], average=True)
            env.all_reduce_([parts], average=True)   # the global batch's losses, not this rank's slice
        sums = dict(zip(names, parts.tolist()))
        grad_norm = clip_grad_norm(self.params, t.grad_clip)
        ok = may_step(sums["loss"], grad_norm)
        if ok:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with region("optimizer"):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = model.expert_loads()
        env.all_reduce_(loads + monitor.histograms, average=False)
        model.update_bias(loads, gamma if ok else 0.0)
        return dict(sums, grad_norm=grad_norm, loads=loads, skipped=not ok)

    def latest(self, run_dir: str) -> Optional[str]:
        return latest_checkpoint(run_dir)

    def load(self, path: str) -> dict:
        if not os.path.isdir(path):
            raise CheckpointError(f"train.resume={path}: no checkpoint folder there")
        return load_any_checkpoint(path, self.model, self.optimizer)   # either kind: one-process or sharded

    def save(self, run_dir: str, step: int, extra: dict) -> None:
        err = None
        if self.env.rank == 0:
            try:
                save_checkpoint(run_dir, step, self.model, self.optimizer, extra)
                prune_checkpoints(run_dir, self.cfg.train.keep_last)
            except UserError as e:
                err = e
        self.env.agree(err)  # a failed save stops every rank, none waits for it


def _loop(cfg: Config, env: Dist, data: Dataset, steps, start: float, old_handlers: dict) -> dict:
    """The one training loop, for every layout: ``steps`` is ``LocalSteps`` or ``ParallelSteps``.
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
    _commit_run_dir(cfg, env, data, step)
    fpt, peak, autocast, log = run_setup(cfg, env, data, step, steps.layout, resumed=ckpt)
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
                              tokens_per_s=step_tokens / dt, mfu=step_tokens * fpt / dt / peak if peak else None,
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
            raise Stopped(_stop_message(req, step, os.path.join(t.out_dir, f"ckpt_{saved_at:07d}")), exit_code(req))
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
        if rank0 and t.loss_curve:
            from dsv3.tools.plots import loss_curve
            loss_curve(os.path.join(t.out_dir, "metrics.jsonl"))
        return result
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        log.close()


class RankFailure(Exception):
    """Another rank died or hangs: this one cannot go on. ``main`` prints the message and exits 1
    at once (no process-group teardown, which could wait on the dead rank)."""


def _is_peer_failure(e: BaseException) -> bool:
    msg = str(e)
    return (isinstance(e, (PeerError, getattr(dist, "DistError", PeerError)))
            or any(s in msg for s in ("gloo", "Connection closed", "Connection reset", "Timed out", "timed out")))


@contextmanager
def _group_timeout(timeout_s: float):
    """Sub-groups made by ``dist.new_group`` default to 30 minutes; give them parallel.timeout_s too,
    so a hung peer fails every collective within the configured time."""
    from datetime import timedelta
    orig = dist.new_group

    def new_group(ranks=None, timeout=None, **kw):
        return orig(ranks, timeout=timeout or timedelta(seconds=timeout_s), **kw)
    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = orig


def train_parallel(cfg: Config, env: Dist, data: Dataset, model: Transformer, start: float = 0.0,
                   old_handlers: Optional[dict] = None) -> dict:
    """The loop through ``parallel.parallelize``: PP × DP (EP inside DP) with ZeRO-1. Every rank of a
    pipeline reads its data-parallel replica's rows; rank 0 logs the global batch's losses.
    A transfer or collective that fails or times out because another rank died or hangs raises
    ``RankFailure`` (one line: this rank, the step, the operation, parallel.timeout_s)."""
    from parallel.steps import ParallelSteps
    try:
        with _group_timeout(cfg.parallel.timeout_s):
            steps = ParallelSteps(cfg, env, model)
        return _loop(cfg, env, data, steps, start, old_handlers or {})
    except Exception as e:  # noqa: BLE001 - only peer failures are rewritten
        if not _is_peer_failure(e):
            raise
        from dsv3.training.faults import current_step
        raise RankFailure(f"rank {env.rank}/{env.world}: step {current_step()}: {first_line(e)} -- another rank "
                          f"likely died or hangs (parallel.timeout_s={cfg.parallel.timeout_s:g}); giving up") from e


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:   # anywhere: an override always holds '='
        from dsv3.config_doc import train_help
        print(train_help())
        return 0
    path = DEFAULT_CONFIG
    if argv and not ("=" in argv[0]) and not argv[0].startswith("-"):
        path = argv.pop(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"error: '{bad[0]}' is not an override; use key.path=value (e.g. train.steps=50)", file=sys.stderr)
        return 2
    try:
        train(load_config(path, argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.code
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except (Interrupted, KeyboardInterrupt) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        print(f"error: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            os._exit(code)  # no process-group teardown: it could wait on ranks still running
        return code
    except RankFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
