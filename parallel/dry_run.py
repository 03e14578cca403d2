"""What every rank of a layout would allocate, without processes: the model built on the meta device, cut
by the trainer's own ``dsv3_stages`` (``parallel/stage_cut.py``), its experts sharded by the trainer's own
``shard_experts``, and the state ZeRO-1 keeps for the rank's parameters (issue: meta-device construction).

    python -m parallel.dry_run configs/dsv3_671b.yaml --pp 16 --dp 128 --ep 64 [--schedule dualpipe] [train.weights_dtype=bf16]

Per pipeline rank (every data-parallel rank of a stage holds the same bytes): parameters (as the trainer
keeps them: FP32, or BF16 with ``train.weights_dtype=bf16``), gradients (FP32 either way: the FP32
parameters' own, or the BF16 parameters' FP32 main-grad buffers), and the ZeRO-1 shard of the
FP32 master and the two AdamW moments (``train.bf16_moments``: BF16 moments) — dense parameters over DP,
experts over DP/EP, each parameter padded to a multiple of its group size (``parallel/zero.py``).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

import torch
from torch import nn

from dsv3.config import Config, load_config
from dsv3.errors import UserError
from dsv3.training.runtime import with_weights_dtype
from dsv3.model.transformer import Transformer
from parallel.dsv3_stages import dsv3_stages
from parallel.expert_parallel import shard_experts
from parallel.placement import Placement
from parallel.schedules import layout


def rank_bytes(cfg: Config, pp: int, dp: int, ep: int, schedule: str) -> list[dict]:
    """Per pipeline rank 0…pp−1: {"params", "grads", "optimizer"} bytes and "n_params", "n_dense",
    "n_expert", "stages" — read off the meta model the trainer would build."""
    m = cfg.model
    if m.moe.n_routed_experts % ep:
        raise UserError(f"ep={ep} must divide model.moe.n_routed_experts={m.moe.n_routed_experts}")
    if dp % ep:
        raise UserError(f"ep={ep} must divide dp={dp} (experts are sharded inside the data-parallel ranks)")
    with torch.device("meta"):
        model = Transformer(m, seed=0)
        if ep > 1:   # every EP rank holds the same number of experts: rank 0's shard stands for all
            ids = Placement.contiguous(m.moe.n_routed_experts, ep).local_experts(0)
            for moe in model.moe_layers():
                moe.experts = shard_experts(moe.experts, ids)
    lay = layout(schedule, pp) if pp > 1 else None
    stages = dsv3_stages(model, lay.num_model_stages) if lay else [model]
    moment = 2 if cfg.train.bf16_moments else 4
    dense_world, expert_world = dp, dp // ep
    out = []
    for r in range(pp):
        held = lay.model_stages_of(r) if lay else [0]
        params: dict[int, nn.Parameter] = {}
        for s in held:
            for p in stages[s].parameters():
                params[id(p)] = p                       # a tensor shared between held stages counts once
        n_expert = sum(p.numel() for p in params.values() if getattr(p, "expert_parallel", False))
        n_params = sum(p.numel() for p in params.values())
        bf16 = with_weights_dtype(cfg, torch.device("cuda")).train.weights_dtype == "bf16"   # a GPU cluster's ranks
        weight = sum(p.numel() * (2 if bf16 else p.element_size()) for p in params.values())
        grads = sum(p.numel() * max(p.element_size(), 4) for p in params.values())
        shard = sum(math.ceil(p.numel() / (expert_world if getattr(p, "expert_parallel", False) else dense_world))
                    for p in params.values())
        out.append(dict(params=weight, grads=grads, optimizer=(4 + 2 * moment) * shard, n_params=n_params,
                        n_dense=n_params - n_expert, n_expert=n_expert, stages=held))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parallel.dry_run", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="model/training YAML (e.g. configs/dsv3_671b.yaml)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks per pipeline stage (EP inside them)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (divides dp)")
    p.add_argument("--schedule", default=None, help="pipeline schedule (default: the config's parallel.pp_schedule)")
    p.add_argument("overrides", nargs="*", help="config overrides key.path=value (e.g. train.weights_dtype=bf16)")
    a = p.parse_intermixed_args(argv)
    try:
        if min(a.pp, a.dp, a.ep) < 1:
            raise UserError("--pp, --dp and --ep must be >= 1")
        cfg = load_config(a.config, a.overrides)
        rows = rank_bytes(cfg, a.pp, a.dp, a.ep, a.schedule or cfg.parallel.pp_schedule)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gib = 1024 ** 3
    print(f"{a.config}: PP {a.pp} x DP {a.dp} (EP {a.ep}), {a.pp * a.dp} GPUs; bytes per GPU of each pipeline rank")
    print(f"{'rank':>4} {'stages':>8} {'params (M)':>11} {'weights GiB':>12} {'grads GiB':>10} {'optim GiB':>10} {'total GiB':>10}")
    for r, row in enumerate(rows):
        tot = row["params"] + row["grads"] + row["optimizer"]
        print(f"{r:>4} {','.join(map(str, row['stages'])):>8} {row['n_params'] / 1e6:>11.1f} {row['params'] / gib:>12.2f} "
              f"{row['grads'] / gib:>10.2f} {row['optimizer'] / gib:>10.2f} {tot / gib:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
