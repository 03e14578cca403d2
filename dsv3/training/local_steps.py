"""The training loop's step interface on one process, or plain data parallel (``parallel.zero1=false``):
``LocalSteps`` keeps the whole model and optimizer on every rank and averages gradients by all-reduce.
``parallel.steps.ParallelSteps`` is the other implementation; ``dsv3.training.loop.run_loop`` drives either.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from dsv3.checkpoint.store import latest_checkpoint, load_any_checkpoint, prune_checkpoints, save_checkpoint
from dsv3.config import Config
from dsv3.data.dataset import Dataset
from dsv3.errors import CheckpointError, UserError
from dsv3.model.transformer import Transformer
from dsv3.training.balance_metrics import BalanceMonitor
from dsv3.training.faults import fault_point
from dsv3.training.loop import Dist, evaluate, sample_text
from dsv3.training.optim import build_optimizer, clip_grad_norm
from dsv3.training.runtime import region


class LocalSteps:
    """The step interface on one process, or plain data parallel (``parallel.zero1=false``): the whole
    model and optimizer on every rank, gradients averaged by all-reduce. ``ParallelSteps`` is the
    other implementation (``parallel/steps.py``); ``dsv3.training.loop.run_loop`` drives either."""

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
