"""Learning-rate schedule as data: linear warmup over steps, then segments by token count
(report §4.2: 2K warmup steps to 2.2e-4, constant until 10T tokens, cosine to 2.2e-5 over 4.3T,
2.2e-5 for 333B, 7.3e-6 for 167B), and the batch-size ramp (3072 → 15360 sequences over 469B tokens)."""
from __future__ import annotations

import math
from typing import Optional

from dsv3.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, tokens: int) -> float:
    """LR for optimizer step `step` (0-based) taken after `tokens` training tokens were consumed.
    Segments follow one another by cumulative tokens from the start of training; after the last
    one the final LR holds. Constant and step both hold `lr`; cosine anneals from the previous LR."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    prev_lr, start = cfg.lr, 0
    for seg in cfg.lr_segments:
        end = start + seg.tokens
        if tokens < end:
            if seg.kind == "cosine":
                frac = (tokens - start) / max(seg.tokens, 1)
                return seg.lr + 0.5 * (prev_lr - seg.lr) * (1 + math.cos(math.pi * frac))
            return seg.lr
        prev_lr, start = seg.lr, end
    return prev_lr


class Schedule:
    """Everything a step's number and token count decide, in one place for every layout: the LR (above),
    the MTP weight λ (report §2.2: λ_start, then λ_end after ``lambda_switch_tokens``), the bias-update
    speed γ (report §2.1.2: ``bias_update_speed``, 0 after ``bias_update_stop_tokens``) and the micro-batches
    per data-parallel replica under the batch ramp (dsv3/data/batch.py)."""

    def __init__(self, cfg, dp: int = 1, pp: int = 1, schedule: str = "1f1b"):
        from dsv3.data.batch import check_layout
        self.cfg, self.dp, self.pp, self.schedule = cfg, dp, pp, schedule
        check_layout(cfg.train, dp, pp, schedule)

    def mtp_weight(self, tokens: int) -> float:
        mtp = self.cfg.model.mtp
        return mtp.lambda_end if mtp.lambda_switch_tokens is not None and tokens >= mtp.lambda_switch_tokens \
            else mtp.lambda_start

    def gamma(self, tokens: int) -> Optional[float]:
        """γ for the bias update; None = the config's ``bias_update_speed``."""
        stop = self.cfg.model.moe.bias_update_stop_tokens
        return 0.0 if stop is not None and tokens >= stop else None

    def at(self, step: int, tokens: int) -> tuple[float, float, Optional[float], int]:
        """(lr, λ, γ, micro-batches per replica) of optimizer step ``step`` (0-based) after ``tokens``."""
        from dsv3.data.batch import micro_batches_at
        return (lr_at(self.cfg.train, step, tokens), self.mtp_weight(tokens), self.gamma(tokens),
                micro_batches_at(self.cfg.train, tokens, self.dp, self.pp, self.schedule))
