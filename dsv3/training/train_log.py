"""Step logging on rank 0: one console line per step (a tqdm bar on a terminal, plain lines
otherwise), ``metrics.jsonl`` in the run folder, and TensorBoard scalars beside them.

metrics.jsonl fields per step: step, tokens, loss, lm_loss, mtp_loss, balance_loss, lr, grad_norm,
tokens_per_s, mfu, maxvio_mean, maxvio_max, maxvio (per MoE layer), and for eval lines val_loss.
Load-balance fields per step and per MoE layer (tokens_per_expert, maxvio_accum, bias, bias_drift,
bias_mean, bias_spread, balance_loss_layers, groups_per_token) and per eval (domain_loads, val_maxvio)
come from dsv3/training/balance_metrics.py; README "Load balancing" documents them. In TensorBoard a per-layer
list ``k`` becomes scalars ``k/layer{i}`` and a per-layer list of lists histograms ``k/layer{i}``."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch

from dsv3.errors import UserError


# per-layer fields that hold counts per value (index = value), not samples
COUNT_HISTOGRAMS = ("groups_per_token",)


class StepLogger:
    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        self.wandb = None
        if not enabled:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError(f"train.wandb={wandb_project}: wandb is not installed; pip install 'dsv3[wandb]' "
                                "(or leave train.wandb unset)") from None
            self.wandb = wandb.init(project=wandb_project, dir=run_dir, config=config or {},
                                    resume="allow", name=os.path.basename(os.path.abspath(run_dir)))
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=False)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:  # TensorBoard is optional for a run; metrics.jsonl always has the numbers
            self.tb = None

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, record: dict, line: Optional[str] = None, advance: bool = True) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars(record).items():
                self.tb.add_scalar(k, v, record["step"])
            for k, v in record.items():
                if isinstance(v, list):
                    self._tb_histograms(k, v, record["step"])
        if self.wandb is not None:   # the same scalars as TensorBoard
            self.wandb.log(scalars(record), step=record["step"])
        if line:
            self.print(line)
        if self.bar is not None and advance:
            self.bar.update(1)

    def _tb_histograms(self, key: str, values: list, step: int) -> None:
        for i, v in enumerate(values):
            if isinstance(v, list) and v and key in COUNT_HISTOGRAMS:
                # v[g] = how many tokens took value g: write the exact histogram
                total = sum(v)
                if total:
                    vals = [g for g, c in enumerate(v) if c]
                    self.tb.add_histogram_raw(f"{key}/layer{i}", min=min(vals), max=max(vals), num=total,
                                              sum=sum(g * c for g, c in enumerate(v)),
                                              sum_squares=sum(g * g * c for g, c in enumerate(v)),
                                              bucket_limits=[g + 0.5 for g in range(len(v))], bucket_counts=v,
                                              global_step=step)
            elif isinstance(v, list) and v:
                self.tb.add_histogram(f"{key}/layer{i}", torch.tensor(v, dtype=torch.float64), step)

    def close(self) -> None:
        """Closes every sink once (safe to call again)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.bar = self.tb = self.jsonl = self.wandb = None
        self.enabled = False


def scalars(record: dict) -> dict[str, float]:
    """The record's scalars as TensorBoard and W&B get them: numbers by name, a per-layer list ``k`` as
    ``k/layer{i}`` (lists of lists are histograms, TensorBoard only)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool) or k == "step":
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, list):
            out.update({f"{k}/layer{i}": x for i, x in enumerate(v) if isinstance(x, (int, float))})
    return out


def step_line(r: dict, total_steps: int) -> str:
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.2f}%"
    return (f"step {r['step']:>5}/{total_steps} | loss {r['loss']:.4f} (lm {r['lm_loss']:.4f} "
            f"mtp {r['mtp_loss']:.4f} bal {r['balance_loss']:.2e}) | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"maxvio {r['maxvio_mean']:.3f}/{r['maxvio_max']:.3f}")


def final_line(val_loss: float, unigram_entropy: float) -> str:
    """The run's last line: the validation loss against the unigram baseline (every token predicted by its
    frequency in the validation split, whose loss is that split's unigram entropy), by how much it is below."""
    gap = unigram_entropy - val_loss
    return (f"validation loss {val_loss:.4f}, unigram entropy {unigram_entropy:.4f}: the model is {abs(gap):.4f} "
            f"nats/token {'below' if gap >= 0 else 'above'} the unigram baseline")
