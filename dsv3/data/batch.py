"""The global batch and how a layout splits it (report §4.2: 15,360 sequences per step, ramped from
3,072 over the first 469B tokens).

    train.global_batch       sequences per optimizer step, over all data-parallel replicas
    train.micro_batch_size   sequences per forward, in every layout; ``auto``: the largest that
                             splits the replica's batch (global_batch / dp; with a ramp,
                             gcd(global_batch, start_sequences) / dp) into a micro-batch count the
                             schedule accepts (below) — without a pipeline, the whole replica batch
                             in one forward
    micro-batches per replica per step (accumulation steps, or pipeline chunks)
                             = batch / (dp · micro_batch_size)

Under the ramp the step's batch is start + (global_batch − start) · tokens / ramp.tokens, rounded down
to a multiple of dp · micro_batch_size, never below the schedule's fewest micro-batches (pp for
1F1B / ZB1P, 2·pp for DualPipe and DualPipeV; 1 without a pipeline) and, under DualPipe, an even
count (``parallel.schedules.Schedule.fewest_chunks`` / ``needs_even_chunks``). Without a ramp every step
takes global_batch, which must split exactly.
"""
from __future__ import annotations

import dataclasses
import math

from dsv3.errors import UserError
from parallel.schedules import get_schedule


def fewest_chunks(pp: int, schedule: str) -> int:
    return get_schedule(schedule).fewest_chunks(pp)


def _even(pp: int, schedule: str) -> bool:
    return get_schedule(schedule).needs_even_chunks(pp)


def _accepted(chunks: int, pp: int, schedule: str) -> bool:
    return get_schedule(schedule).accepts_chunks(pp, chunks)


def micro_batch_size(t, dp: int = 1, pp: int = 1, schedule: str = "1f1b") -> int:
    """``train.micro_batch_size`` for this layout: the value itself, or for ``auto`` the rule above."""
    if t.micro_batch_size != "auto":
        return t.micro_batch_size
    ramp = t.batch_ramp
    batch = t.global_batch
    if ramp is not None and ramp.tokens > 0 and ramp.start_sequences:
        batch = math.gcd(batch, ramp.start_sequences)
    fits = [m for m in range(batch // dp, 0, -1)
            if batch % (dp * m) == 0 and _accepted(batch // (dp * m), pp, schedule)]
    if batch % dp or not fits:
        what = "train.global_batch" if batch == t.global_batch else "gcd(train.global_batch, batch_ramp.start_sequences)"
        even = "an even number of " if _even(pp, schedule) else ""
        raise UserError(f"train.micro_batch_size=auto: {what}={batch} gives no micro-batch over dp={dp} with "
                        f"{even}>= {fewest_chunks(pp, schedule)} micro-batches per replica "
                        f"({schedule if pp > 1 else 'no pipeline'}, pp={pp}); raise train.global_batch")
    return fits[0]


def resolved(cfg, dp: int, pp: int = 1, schedule: str = "1f1b"):
    """``cfg`` with ``train.micro_batch_size`` a number for this layout (``auto`` resolved)."""
    if cfg.train.micro_batch_size != "auto":
        return cfg
    mbs = micro_batch_size(cfg.train, dp, pp, schedule)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=mbs))


def check_layout(t, dp: int, pp: int = 1, schedule: str = "1f1b") -> int:
    """Micro-batches per replica of the full global batch; a layout that cannot split it is one line."""
    mbs = micro_batch_size(t, dp, pp, schedule)
    unit = dp * mbs
    if t.global_batch % unit:
        raise UserError(f"train.global_batch={t.global_batch} does not split over dp={dp} × "
                        f"train.micro_batch_size={mbs}: make it a multiple of {unit}")
    chunks, need = t.global_batch // unit, fewest_chunks(pp, schedule)
    if chunks < need or (_even(pp, schedule) and chunks % 2):
        even = "an even number of " if _even(pp, schedule) else ""
        raise UserError(f"train.global_batch={t.global_batch} gives {chunks} micro-batches per pipeline "
                        f"(dp={dp} × micro_batch_size={mbs}); {schedule} with pp={pp} needs {even}"
                        f">= {need}: raise train.global_batch or lower train.micro_batch_size")
    return chunks


def micro_batches_at(t, tokens: int, dp: int = 1, pp: int = 1, schedule: str = "1f1b") -> int:
    """Micro-batches per data-parallel replica for the step taken after ``tokens`` tokens (the rule above)."""
    unit = dp * micro_batch_size(t, dp, pp, schedule)
    full = t.global_batch // unit
    ramp = t.batch_ramp
    if ramp is None or ramp.tokens <= 0 or tokens >= ramp.tokens:
        return full
    seqs = ramp.start_sequences + (t.global_batch - ramp.start_sequences) * tokens / ramp.tokens
    chunks = max(fewest_chunks(pp, schedule), int(seqs // unit))
    if _even(pp, schedule) and chunks % 2:
        chunks -= 1
    return min(full, max(chunks, fewest_chunks(pp, schedule)))
