"""The global batch and how a layout splits it (report §4.2: 15,360 sequences per step, ramped from
3,072 over the first 469B tokens).

    train.global_batch       sequences per optimizer step, over all data-parallel replicas
    train.micro_batch_size   sequences per forward, in every layout
    micro-batches per replica per step (accumulation steps, or pipeline chunks)
                             = batch / (dp · micro_batch_size)

Under the ramp the step's batch is start + (global_batch − start) · tokens / ramp.tokens, rounded down
to a multiple of dp · micro_batch_size, never below the schedule's fewest micro-batches (pp for
1F1B / ZB1P, 2·pp for DualPipe and DualPipeV; 1 without a pipeline) and, under DualPipe, an even
count. Without a ramp every step takes global_batch, which must split exactly.
"""
from __future__ import annotations

from dsv3.errors import UserError


def fewest_chunks(pp: int, schedule: str) -> int:
    if pp == 1:
        return 1
    return 2 * pp if schedule in ("dualpipe", "dualpipev") else pp


def check_layout(t, dp: int, pp: int = 1, schedule: str = "1f1b") -> int:
    """Micro-batches per replica of the full global batch; a layout that cannot split it is one line."""
    unit = dp * t.micro_batch_size
    if t.global_batch % unit:
        raise UserError(f"train.global_batch={t.global_batch} does not split over dp={dp} × "
                        f"train.micro_batch_size={t.micro_batch_size}: make it a multiple of {unit}")
    chunks, need = t.global_batch // unit, fewest_chunks(pp, schedule)
    if chunks < need or (schedule == "dualpipe" and pp > 1 and chunks % 2):
        even = "an even number of " if schedule == "dualpipe" else ""
        raise UserError(f"train.global_batch={t.global_batch} gives {chunks} micro-batches per pipeline "
                        f"(dp={dp} × micro_batch_size={t.micro_batch_size}); {schedule} with pp={pp} needs {even}"
                        f">= {need}: raise train.global_batch or lower train.micro_batch_size")
    return chunks


def micro_batches_at(t, tokens: int, dp: int = 1, pp: int = 1, schedule: str = "1f1b") -> int:
    """Micro-batches per data-parallel replica for the step taken after ``tokens`` tokens (the rule above)."""
    unit = dp * t.micro_batch_size
    full = t.global_batch // unit
    ramp = t.batch_ramp
    if ramp is None or ramp.tokens <= 0 or tokens >= ramp.tokens:
        return full
    seqs = ramp.start_sequences + (t.global_batch - ramp.start_sequences) * tokens / ramp.tokens
    chunks = max(fewest_chunks(pp, schedule), int(seqs // unit))
    if schedule == "dualpipe" and pp > 1 and chunks % 2:
        chunks -= 1
    return min(full, max(chunks, fewest_chunks(pp, schedule)))
