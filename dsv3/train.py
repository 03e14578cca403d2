"""The pretraining command: ``python -m dsv3.train [CONFIG.yaml] [key.path=value ...]``.

AdamW on FP32 master weights (optionally BF16 moments), warmup + token-segment LR schedule, batch
ramp, gradient accumulation, clipping at 1.0, FP32 or BF16 autocast, optional recomputation, the
aux-loss-free bias update after every optimizer step (γ until ``bias_update_stop_tokens``), the MTP
weight λ switched by token count, atomic checkpoints and ``train.resume=auto``.
With WORLD_SIZE > 1 (torchrun) ranks run data parallel: each takes its slice of the global batch,
gradients are averaged and expert loads summed before the bias update; with parallel.pp/ep/zero1 they
run through ``parallelize()`` (``parallel.steps.ParallelSteps``). Both run the one loop of
``dsv3/training/loop.py``; this module sets the run up, picks the step interface and maps failures
to exit codes.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from dsv3.checkpoint.run_dir import RunLock, has_checkpoints
from dsv3.config import Config, load_config
from dsv3.data.batch import resolved
from dsv3.data.dataset import Dataset, prepare_data
from dsv3.errors import UserError
from dsv3.model.transformer import Transformer
from dsv3.tools.plots import loss_curve
from dsv3.training.faults import PeerError, current_step, first_line
from dsv3.training.local_steps import LocalSteps
from dsv3.training.loop import Dist, Diverged, Stopped, run_loop
from dsv3.training.stops import Interrupted, raise_on_signal, restore
from parallel.steps import ParallelSteps

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug.yaml")


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
            result = train_parallel(cfg, env, data, model, start, old_handlers)
        else:
            result = run_loop(cfg, env, data, LocalSteps(cfg, env, model), start, old_handlers)
        if env.rank == 0 and t.loss_curve:
            loss_curve(os.path.join(t.out_dir, "metrics.jsonl"))
        return result
    finally:
        restore(old_handlers)
        if lock is not None:
            lock.release()


class RankFailure(Exception):
    """Another rank died or hangs: this one cannot go on. ``main`` prints the message and exits 1
    at once (no process-group teardown, which could wait on the dead rank)."""


def _is_peer_failure(e: BaseException) -> bool:
    msg = str(e)
    return (isinstance(e, (PeerError, getattr(dist, "DistError", PeerError)))
            or any(s in msg for s in ("gloo", "Connection closed", "Connection reset", "Timed out", "timed out")))


def train_parallel(cfg: Config, env: Dist, data: Dataset, model: Transformer, start: float = 0.0,
                   old_handlers: Optional[dict] = None) -> dict:
    """The loop through ``parallel.parallelize``: PP × DP (EP inside DP) with ZeRO-1. Every rank of a
    pipeline reads its data-parallel replica's rows; rank 0 logs the global batch's losses.
    A transfer or collective that fails or times out because another rank died or hangs raises
    ``RankFailure`` (one line: this rank, the step, the operation, parallel.timeout_s)."""
    try:
        steps = ParallelSteps(cfg, env, model)   # its mesh makes every process group with parallel.timeout_s
        return run_loop(cfg, env, data, steps, start, old_handlers or {})
    except Exception as e:  # noqa: BLE001 - only peer failures are rewritten
        if not _is_peer_failure(e):
            raise
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
