"""Load-balancing ablation: a matrix of variants × seeds from the same data order, then a report.

    python -m dsv3.tools.ablate --config configs/small_moe.yaml --steps 400 --seeds 3 --out runs/ablate
    python -m dsv3.tools.ablate --config configs/debug.yaml --variants my_variants.yaml --steps 60 --seeds 2 \
        --out runs/abl data.seq_len=64 train.micro_batch_size=8
    python -m dsv3.tools.ablate --report runs/ablate          # regenerate DIR/report.md and the plots

Seed k sets ``train.seed`` (initialisation and the sampler's order) for every variant, so variants of
one seed see the same batches in the same order. Each run trains in ``DIR/runs/<variant>/seed<k>/``
and is finished when its ``result.json`` exists: a second call skips finished runs and restarts
unfinished ones from scratch. The compared settings (Wang et al. 2024; DeepSeek-V3 §4.5.2–4.5.3):
``model.moe.bias_update`` (sign | proportional | none), ``bias_update_speed`` (γ), ``aux_loss_alpha``
(α), ``aux_loss_type`` (sequence | batch), ``topk_group`` (= ``n_group`` turns the group limit off).

A variants file is YAML: ``variants:`` a list of ``{name: NAME, overrides: [a.b=value, ...]}`` (a
mapping ``{a.b: value}`` works too); the pseudo-override ``GROUP_LIMIT_OFF`` sets ``topk_group`` to the
resolved config's ``n_group``. Extra ``key=value`` arguments apply to every run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import yaml

from dsv3.config import ConfigError, load_config
from dsv3.errors import UserError

# α and γ of the two rules; the report's recipe is γ = 0.001 with a sequence-wise α = 0.0001
ALPHA, GAMMA, ALPHA_COMPLEMENT = 1e-3, 1e-3, 1e-4
NO_BIAS = "model.moe.bias_update=none"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    note: str = ""


def _v(name: str, note: str, *overrides: str) -> Variant:
    return Variant(name, tuple(overrides), note)


DEFAULT_MATRIX = [
    _v("no_balance", "no bias update, no balance loss", NO_BIAS, "model.moe.aux_loss_alpha=0"),
    _v("aux_seq", f"sequence-wise auxiliary loss α={ALPHA:g}", NO_BIAS, f"model.moe.aux_loss_alpha={ALPHA:g}",
       "model.moe.aux_loss_type=sequence"),
    _v("aux_batch", f"batch-wise auxiliary loss α={ALPHA:g}", NO_BIAS, f"model.moe.aux_loss_alpha={ALPHA:g}",
       "model.moe.aux_loss_type=batch"),
    _v("alf_sign", f"aux-loss-free, sign update γ={GAMMA:g}", "model.moe.bias_update=sign",
       f"model.moe.bias_update_speed={GAMMA:g}", "model.moe.aux_loss_alpha=0"),
    _v("alf_sign_seq", f"DeepSeek-V3 recipe: sign update γ={GAMMA:g} + sequence-wise α={ALPHA_COMPLEMENT:g}",
       "model.moe.bias_update=sign", f"model.moe.bias_update_speed={GAMMA:g}",
       f"model.moe.aux_loss_alpha={ALPHA_COMPLEMENT:g}", "model.moe.aux_loss_type=sequence"),
    _v("alf_prop", f"aux-loss-free, proportional update γ={GAMMA:g}", "model.moe.bias_update=proportional",
       f"model.moe.bias_update_speed={GAMMA:g}", "model.moe.aux_loss_alpha=0"),
]

# the sweeps on top of the default six: α, γ, proportional + sequence loss, group limit off
FULL_MATRIX = DEFAULT_MATRIX + [
    _v("aux_seq_a1e-4", "sequence-wise α=1e-4", NO_BIAS, "model.moe.aux_loss_alpha=0.0001", "model.moe.aux_loss_type=sequence"),
    _v("aux_seq_a1e-2", "sequence-wise α=1e-2", NO_BIAS, "model.moe.aux_loss_alpha=0.01", "model.moe.aux_loss_type=sequence"),
    _v("alf_sign_g1e-4", "sign update γ=1e-4", "model.moe.bias_update=sign", "model.moe.bias_update_speed=0.0001",
       "model.moe.aux_loss_alpha=0"),
    _v("alf_sign_g1e-2", "sign update γ=1e-2", "model.moe.bias_update=sign", "model.moe.bias_update_speed=0.01",
       "model.moe.aux_loss_alpha=0"),
    _v("alf_prop_seq", f"proportional γ={GAMMA:g} + sequence-wise α={ALPHA_COMPLEMENT:g}",
       "model.moe.bias_update=proportional", f"model.moe.bias_update_speed={GAMMA:g}",
       f"model.moe.aux_loss_alpha={ALPHA_COMPLEMENT:g}", "model.moe.aux_loss_type=sequence"),
    _v("alf_sign_seq_nogroup", "the V3 recipe without the group limit (topk_group = n_group)",
       "model.moe.bias_update=sign", f"model.moe.bias_update_speed={GAMMA:g}",
       f"model.moe.aux_loss_alpha={ALPHA_COMPLEMENT:g}", "model.moe.aux_loss_type=sequence", "GROUP_LIMIT_OFF"),
]
MATRICES = {"default": DEFAULT_MATRIX, "full": FULL_MATRIX}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def load_variants(path: str) -> list[Variant]:
    """Variants from a YAML file; every mistake is a UserError naming the entry."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read the variants file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    items = data.get("variants") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected 'variants:' with a list of {{name, overrides}} entries")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: variants[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise UserError(f"{where}: expected a mapping with 'name' and 'overrides'")
        extra = sorted(set(item) - {"name", "overrides", "note"})
        if extra:
            raise UserError(f"{where}: unknown key '{extra[0]}' (valid: name, overrides, note)")
        ov = item.get("overrides") or []
        if isinstance(ov, dict):
            ov = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in ov.items()]
        ok = isinstance(ov, list) and all(isinstance(o, str) and ("=" in o or o == "GROUP_LIMIT_OFF") for o in ov)
        if not ok:
            raise UserError(f"{where}: overrides must be a list of 'a.b.c=value' strings or a mapping")
        out.append(Variant(str(item["name"]), tuple(ov), str(item.get("note", ""))))
    return out


# -------------------------------------------------------------------------------- the plan
def run_dir(out: str, variant: str, seed: int) -> str:
    return os.path.join(out, "runs", variant, f"seed{seed}")


def run_overrides(spec: dict, variant: Variant, seed: int) -> list[str]:
    """Ablation defaults ← common overrides ← the variant's ← this run's seed, steps and folder."""
    steps = spec["steps"]
    defaults = [f"train.eval_every={max(1, math.ceil(steps / 5))}", f"train.log_every={max(1, steps // 10)}",
                "train.sample_tokens=8", "train.ckpt_every=0"]
    ov = defaults + list(spec["overrides"]) + [o for o in variant.overrides if o != "GROUP_LIMIT_OFF"]
    if "GROUP_LIMIT_OFF" in variant.overrides:   # topk_group = n_group, whatever n_group the config has
        n_group = load_config(spec["config"], ov).model.moe.n_group
        ov.append(f"model.moe.topk_group={n_group}")
    return ov + [f"train.seed={seed}", f"train.steps={steps}", "train.resume=none",
                 f"train.out_dir={run_dir(spec['out'], variant.name, seed)}"]


def check_variants(spec: dict, variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    for v in variants:
        if not _NAME.match(v.name):
            raise UserError(f"variant name {v.name!r}: use letters, digits and _ . + - (it names a folder)")
        if names.count(v.name) > 1:
            raise UserError(f"variant name {v.name!r} appears twice; names must be unique")
        try:
            load_config(spec["config"], run_overrides(spec, v, 0))
        except ConfigError as e:
            raise UserError(f"variant {v.name!r}: {e}") from None


def write_json(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_spec(out: str) -> tuple[dict, list[Variant]]:
    path = os.path.join(out, "ablation.json")
    if not os.path.isfile(path):
        raise UserError(f"{out} holds no ablation (no ablation.json); run python -m dsv3.tools.ablate --out {out} first")
    with open(path) as f:
        spec = json.load(f)
    return spec, [Variant(v["name"], tuple(v["overrides"]), v.get("note", "")) for v in spec["variants"]]


def settings(overrides: list[str]) -> list[str]:
    """What defines a run (its folder left out, so an ablation folder can be moved)."""
    return [o for o in overrides if not o.startswith("train.out_dir=")]


def is_finished(out: str, variant: Variant, seed: int, overrides: list[str]) -> bool:
    path = os.path.join(run_dir(out, variant.name, seed), "result.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        done = json.load(f)
    if done.get("overrides") != settings(overrides):
        raise UserError(f"{os.path.dirname(path)} was run with other settings ({done.get('overrides')}); "
                        f"use another --out or delete that folder")
    return True


def run_matrix(spec: dict, variants: list[Variant], keep_checkpoints: bool = False, echo=print) -> list[dict]:
    """Train every (variant, seed) not finished yet; returns one entry per run."""
    from dsv3.train import train
    plan = [(v, s) for s in range(spec["seeds"]) for v in variants]   # seed-major: all variants of seed 0 first
    done_times: list[float] = []
    results = []
    for i, (v, seed) in enumerate(plan, start=1):
        overrides = run_overrides(spec, v, seed)
        tag = f"[{i}/{len(plan)}] {v.name} seed {seed}"
        folder = run_dir(spec["out"], v.name, seed)
        if is_finished(spec["out"], v, seed, overrides):
            echo(f"{tag}: finished earlier, skipped")
            results.append(dict(variant=v.name, seed=seed, skipped=True))
            continue
        shutil.rmtree(folder, ignore_errors=True)     # an unfinished run restarts from scratch
        os.makedirs(folder)
        echo(f"{tag}: training ({' '.join(settings(overrides))})")
        t0 = time.perf_counter()
        out = train(load_config(spec["config"], overrides))
        elapsed = time.perf_counter() - t0
        done_times.append(elapsed)
        if not keep_checkpoints:
            for name in os.listdir(folder):
                if name.startswith("ckpt_"):
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        write_json(os.path.join(folder, "result.json"),
                   dict(variant=v.name, seed=seed, overrides=settings(overrides), val_loss=out.get("val_loss"),
                        seconds=elapsed))
        left = len(plan) - i
        eta = left * sum(done_times) / len(done_times)
        echo(f"{tag}: done in {elapsed:.0f}s, validation loss {out.get('val_loss', float('nan')):.4f} | "
             f"{left} runs left, about {eta / 60:.1f} min")
        results.append(dict(variant=v.name, seed=seed, skipped=False, seconds=elapsed))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3.tools.ablate", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="base config YAML (e.g. configs/small_moe.yaml)")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..S-1 per variant")
    p.add_argument("--out", help="ablation folder")
    p.add_argument("--variants", help="YAML file of variants (default: the built-in matrix)")
    p.add_argument("--matrix", choices=sorted(MATRICES), default="default",
                   help="built-in matrix: default (6 variants) or full (+ α, γ sweeps, group limit off)")
    p.add_argument("--baseline", help="variant the others are compared with (default: the first)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--report", metavar="DIR", help="only regenerate DIR/report.md and the plots")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides applied to every run")
    args = p.parse_args(argv)
    from dsv3.tools.ablate_report import write_report
    try:
        if args.report:
            spec, variants = load_spec(args.report)
            print(f"wrote {write_report(args.report, spec, variants)}")
            return 0
        if not (args.config and args.steps and args.out):
            raise UserError("pass --config CONFIG.yaml --steps N --out DIR (or --report DIR)")
        if args.steps < 1 or args.seeds < 1:
            raise UserError("--steps and --seeds must be >= 1")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise UserError(f"'{bad[0]}' is not an override; use key.path=value (e.g. data.seq_len=64)")
        variants = load_variants(args.variants) if args.variants else MATRICES[args.matrix]
        spec = dict(config=os.path.abspath(args.config), steps=args.steps, seeds=args.seeds,
                    out=os.path.abspath(args.out), overrides=list(args.overrides),
                    baseline=args.baseline or variants[0].name,
                    variants=[dict(name=v.name, overrides=list(v.overrides), note=v.note) for v in variants])
        if spec["baseline"] not in [v.name for v in variants]:
            raise UserError(f"--baseline {args.baseline}: no such variant ({', '.join(v.name for v in variants)})")
        check_variants(spec, variants)
        os.makedirs(spec["out"], exist_ok=True)
        write_json(os.path.join(spec["out"], "ablation.json"), spec)
        run_matrix(spec, variants, args.keep_checkpoints)
        print(f"wrote {write_report(spec['out'], spec, variants)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
