"""The run's loss curve: ``RUN/loss_curve.png`` from ``RUN/metrics.jsonl`` (dsv3/training/train_log.py's format).

Training LM loss per step (the main model's next-token loss, the quantity the validation loss measures;
a moving average over it), validation loss at each eval, the validation split's unigram entropy as
a dashed baseline when the run recorded it, and the learning rate on a second axis.

    from dsv3.tools.plots import loss_curve
    loss_curve("runs/debug/metrics.jsonl")          # -> runs/debug/loss_curve.png
    python -m dsv3.tools.plots RUN_DIR                    # the same, for a finished or running run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

from dsv3.errors import UserError

FILE = "loss_curve.png"


def curve_series(metrics_path: str) -> dict:
    """{"train": (steps, lm_loss), "val": (steps, val_loss), "lr": (steps, lr), "entropy": float | None}.
    A step logged twice (a resumed run's repeated steps) counts once, the later line; non-finite
    (skipped) losses are left out."""
    train: dict[int, tuple[float, float]] = {}
    val: dict[int, float] = {}
    entropy = None
    try:
        with open(metrics_path) as f:
            lines = f.readlines()
    except OSError as e:
        raise UserError(f"cannot read {metrics_path} ({e.strerror}); give a run folder holding metrics.jsonl") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue   # a line being written by a running run
            raise UserError(f"{metrics_path}: line {i + 1} is not JSON") from None
        step = r.get("step")
        if not isinstance(step, int):
            continue
        if "lm_loss" in r and "lr" in r:
            train[step] = (float(r["lm_loss"]), float(r["lr"]))
        if "val_loss" in r:
            val[step] = float(r["val_loss"])
        if "val_unigram_entropy" in r:
            entropy = float(r["val_unigram_entropy"])
    steps = sorted(train)
    keep = [s for s in steps if math.isfinite(train[s][0])]
    vsteps = sorted(s for s in val if math.isfinite(val[s]))
    return dict(train=(keep, [train[s][0] for s in keep]), val=(vsteps, [val[s] for s in vsteps]),
                lr=(steps, [train[s][1] for s in steps]), entropy=entropy)


def moving_average(ys: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def figure(s: dict, title: str = ""):
    """The loss-curve figure of ``curve_series``'s output (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = s["train"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = max(1, len(steps) // 20)
    ax.plot(steps, loss, color="#9ecae1", linewidth=0.8, label="train LM loss (per step)")
    if window > 1:
        ax.plot(steps, moving_average(loss, window), color="#2171b5", linewidth=1.6,
                label=f"train LM loss ({window}-step moving average)")
    vs, vl = s["val"]
    if vs:
        ax.plot(vs, vl, "o-", color="#d94801", markersize=4, linewidth=1.2, label="validation loss")
    if s["entropy"] is not None:
        ax.axhline(s["entropy"], color="#636363", linestyle="--", linewidth=1,
                   label=f"validation unigram entropy {s['entropy']:.3f} (baseline)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(*s["lr"], color="#31a354", linewidth=1, linestyle=":", label="learning rate (right axis)")
    ax2.set_ylabel("learning rate")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax.set_title(f"{title}: loss and learning rate" if title else "loss and learning rate", fontsize=10)
    fig.tight_layout()
    return fig


def loss_curve(metrics_path: str, out_path: Optional[str] = None) -> Optional[str]:
    """Writes the loss-curve PNG (default: beside metrics.jsonl, atomically); returns its path, or None
    when the file has no training step yet."""
    s = curve_series(metrics_path)
    if not s["train"][0]:
        return None
    run_dir = os.path.dirname(os.path.abspath(metrics_path))
    out_path = out_path or os.path.join(run_dir, FILE)
    fig = figure(s, os.path.basename(run_dir))
    import matplotlib.pyplot as plt
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3.tools.plots", description="Write RUN_DIR/loss_curve.png: training "
                                "and validation loss per step, the learning rate on a second axis.")
    p.add_argument("run_dir", help="run folder holding metrics.jsonl (train.out_dir)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss_curve.png)")
    args = p.parse_args(argv)
    try:
        path = loss_curve(os.path.join(args.run_dir, "metrics.jsonl"), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if path is None:
        print(f"error: {args.run_dir}/metrics.jsonl has no training step yet", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
