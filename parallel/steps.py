"""The training loop's step interface over ``parallelize()``: PP × DP (EP inside DP) with ZeRO-1 and
sharded checkpoints. ``dsv3.training.local_steps.LocalSteps`` is the one-process implementation;
``dsv3.training.loop.run_loop`` drives either, so LR, λ, γ, the batch ramp, the divergence guard, stops, logging and checkpoints are
the same code in every layout."""
from __future__ import annotations

from typing import Optional

import torch

from dsv3.checkpoint.store import latest_checkpoint, prune_checkpoints
from dsv3.training.balance_metrics import BalanceMonitor
from dsv3.training.loop import evaluate, sample_text
from parallel.dist_checkpoint import load_sharded, save_sharded
from parallel.mesh import Mesh
from parallel.parallelize import parallelize
from parallel.pipeline_eval import PipelineBalance, pipeline_generate


class ParallelSteps:
    def __init__(self, cfg, env, model):
        self.cfg, self.env = cfg, env
        pc = cfg.parallel
        self.mesh = Mesh.from_config(pc)   # every group with parallel.timeout_s
        self.parallel_model = parallelize(model, self.mesh, cfg, env.device)
        self.dp, self.dp_index, self.pp = self.parallel_model.dp, self.parallel_model.dp_index, pc.pp
        # without a pipeline every rank runs the whole (expert-sharded) model: eval, balance hooks and the
        # end sample run on it, every rank together (the expert all-to-all needs them all); with one, they
        # run through the stages (parallel/pipeline_eval.py)
        self.eval_model = model if pc.pp == 1 else None
        overlap = getattr(self.parallel_model.pipe, "overlap", False) if self.parallel_model.pipe is not None else False
        sched = f"pp {pc.pp} {pc.pp_schedule}{' overlapped' if overlap else ''} × " if pc.pp > 1 else ""
        self.layout = f" ({sched}dp {self.mesh.dp}, ep {pc.ep}, ZeRO-1)"

    def balance_monitor(self):
        """Hooks on the model's routers, or, under a pipeline, on this rank's stage copies with every
        layer's fields gathered across the ranks (parallel/pipeline_eval.py)."""
        if self.parallel_model.pipe is None:
            return BalanceMonitor(self.eval_model)
        return PipelineBalance(self.parallel_model)

    def evaluate(self, data, cfg, autocast, monitor) -> float:
        if self.parallel_model.pipe is None:
            return evaluate(self.eval_model, data, cfg, autocast, monitor)
        return monitor.evaluate(data, cfg, autocast)

    def sample_text(self, data, cfg) -> str:
        """The end-of-run greedy sample (every rank takes part; rank 0 prints it)."""
        if self.parallel_model.pipe is None:
            return sample_text(self.eval_model, data, cfg)
        prompt = data.tokenizer.encode(cfg.train.sample_prompt)
        ids = pipeline_generate(self.parallel_model, data.tokenizer, prompt, cfg.train.sample_tokens)
        return data.tokenizer.decode(prompt + ids)

    def train_step(self, rows: torch.Tensor, lr: float, mtp_weight: float, gamma: Optional[float], autocast,
                   may_step, monitor) -> dict:
        stats = self.parallel_model.train_step(rows, lr, mtp_weight, gamma, autocast, may_step=may_step,
                                   on_micro=monitor.after_forward)
        self.env.all_reduce_(monitor.histograms, average=False)   # summed over every rank that routed tokens
        stats["loads"] = self.parallel_model.all_layer_loads(stats["loads"])
        return stats

    def latest(self, run_dir: str) -> Optional[str]:
        return latest_checkpoint(run_dir)   # either kind

    def load(self, path: str) -> dict:
        return load_sharded(path, self.parallel_model)  # a sharded checkpoint of any layout, or a one-process one

    def save(self, run_dir: str, step: int, extra: dict) -> None:
        save_sharded(run_dir, step, self.parallel_model, extra)
        if self.env.rank == 0:
            prune_checkpoints(run_dir, self.cfg.train.keep_last)
