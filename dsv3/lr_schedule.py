"""Learning-rate schedule as data: linear warmup over steps, then segments by token count
(report §4.2: 2K warmup steps to 2.2e-4, constant until 10T tokens, cosine to 2.2e-5 over 4.3T,
2.2e-5 for 333B, 7.3e-6 for 167B), and the batch-size ramp (3072 → 15360 sequences over 469B tokens)."""
from __future__ import annotations

import math

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


def micro_batches_at(cfg: TrainConfig, tokens: int, dp_size: int = 1) -> int:
    """Micro-batches per step under the batch-size ramp: the global batch grows linearly from
    start_sequences to micro_batch_size·grad_accum·dp over `tokens`, rounded to whole micro-batches."""
    full = cfg.grad_accum
    ramp = cfg.batch_ramp
    if ramp is None or ramp.tokens <= 0 or tokens >= ramp.tokens:
        return full
    per_micro = cfg.micro_batch_size * dp_size
    seqs = ramp.start_sequences + (full * per_micro - ramp.start_sequences) * tokens / ramp.tokens
    return max(1, min(full, math.ceil(seqs / per_micro)))
