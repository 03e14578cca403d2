"""A 3-variant, 4-step, 1-seed ablation on the debug config: the report's table against numbers
recomputed here from the runs' metrics.jsonl, every plot a valid PNG, the per-step balance fields
against their definitions, the same data order across variants, finished runs skipped and an
unfinished run redone bitwise, and the TensorBoard tags."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re

import pytest
import torch

from dsv3.tools import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
STEPS, K, TOKENS_PER_STEP = 4, 4, 2 * 32        # debug: top-4; micro_batch 2 × seq_len 32
TINY = ["data.seq_len=32", "train.micro_batch_size=2", "train.global_batch=2", "train.eval_batches=2", "train.warmup_steps=2",
        "train.sample_tokens=2", f"data.cache_dir={CACHE}"]
VARIANTS = """
variants:
  - name: no_balance
    overrides: [model.moe.bias_update=none, model.moe.aux_loss_alpha=0]
  - name: aux_seq
    overrides: {model.moe.bias_update: none, model.moe.aux_loss_alpha: 0.01, model.moe.aux_loss_type: sequence}
  - name: alf_sign
    overrides: [model.moe.bias_update=sign, model.moe.bias_update_speed=0.01, model.moe.aux_loss_alpha=0]
"""
NAMES = ["no_balance", "aux_seq", "alf_sign"]


def run_ablate(args: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = ablate.main(args)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def abl(tmp_path_factory):
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("abl"))
    variants = os.path.join(out, "variants.yaml")
    with open(variants, "w") as f:
        f.write(VARIANTS)
    args = ["--config", os.path.join(ROOT, "configs", "debug.yaml"), "--variants", variants,
            "--steps", str(STEPS), "--seeds", "1", "--out", out, *TINY]
    rc, log = run_ablate(args)
    assert rc == 0, log
    return out, args, log


def records(out: str, name: str) -> tuple[list[dict], list[dict]]:
    steps, evals = {}, []
    with open(os.path.join(out, "runs", name, "seed0", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps[r["step"]] = r
            else:
                evals.append(r)
    return [steps[s] for s in sorted(steps)], evals


def table_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in NAMES:
            rows[cells[0]] = cells
    return rows


def mean_of(cell: str) -> float:
    return float(re.match(r"^(-?[0-9.]+) ± n/a$", cell).group(1))


def test_report_table_matches_metrics(abl):
    out, _, log = abl
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    rows = table_rows(report)
    assert list(rows) == NAMES
    for name in NAMES:
        steps, evals = records(out, name)
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        tail = steps[-math.ceil(0.1 * STEPS):]                          # last 10% of 4 steps = step 4
        tps = sorted(r["tokens_per_s"] for r in steps)
        want = [evals[-1]["val_loss"], sum(r["maxvio_mean"] for r in tail) / len(tail),
                sum(r["maxvio_max"] for r in tail) / len(tail), (tps[1] + tps[2]) / 2]
        cells = rows[name]
        assert cells[1] == "1"
        for cell, value, digits in zip(cells[2:6], want, (4, 3, 3, 0)):
            assert abs(mean_of(cell) - value) <= 0.5 * 10 ** -digits + 1e-12, (name, cell, value)
    # one seed: no σ, so no difference may be called one
    assert report.count("not resolved at this scale (fewer than 2 seeds") == 4
    assert "beyond 2σ" not in report


def test_every_plot_is_a_valid_png(abl):
    import matplotlib.image
    out = abl[0]
    files = ["maxvio.png", "val_loss.png", "load_best.png", "load_worst.png", "bias.png"] + \
            [f"domain_loads_{n}.png" for n in NAMES]
    assert sorted(files) == sorted(f for f in os.listdir(out) if f.endswith(".png"))
    for name in files:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        img = matplotlib.image.imread(os.path.join(out, name))
        assert img.ndim == 3 and img.shape[0] >= 150 and img.shape[1] >= 400, (name, img.shape)
        assert img[..., :3].std() > 0.01, name                           # not a blank canvas


def test_step_fields_match_their_definitions(abl):
    out = abl[0]
    for name in NAMES:
        steps, evals = records(out, name)
        accum = None
        prev_bias = torch.zeros(4, 16)                                    # 3 MoE layers + the MTP module's
        for r in steps:
            loads = torch.tensor(r["tokens_per_expert"], dtype=torch.float64)
            assert loads.shape == (4, 16) and loads.sum(1).tolist() == [TOKENS_PER_STEP * K] * 4
            vio = (loads.max(1).values / loads.mean(1) - 1).tolist()
            assert r["maxvio"] == pytest.approx(vio) and r["maxvio_max"] == pytest.approx(max(vio))
            accum = loads if accum is None else accum + loads
            assert r["maxvio_accum"] == pytest.approx((accum.max(1).values / accum.mean(1) - 1).tolist())
            hist = torch.tensor(r["groups_per_token"])
            assert hist.sum(1).tolist() == [TOKENS_PER_STEP] * 4 and hist[:, 3:].sum() == 0  # topk_group = 2
            bias = torch.tensor(r["bias"], dtype=torch.float64)
            if name == "alf_sign":                                        # b += γ·sign(mean − load)
                want = prev_bias + 0.01 * torch.sign(loads.mean(1, keepdim=True) - loads)
                assert torch.allclose(bias, want, atol=1e-6)
            else:
                assert bias.abs().max() == 0
            assert r["bias_drift"] == pytest.approx((bias - prev_bias).norm(dim=1).tolist(), abs=1e-6)
            prev_bias = bias
            assert sum(r["balance_loss_layers"]) == pytest.approx(r["balance_loss"], rel=1e-5)
            assert (r["balance_loss"] > 0) == (name == "aux_seq")
        final = evals[-1]
        eval_tokens = 2 * 2 * 32                                          # eval_batches × micro_batch × seq_len
        per_layer = torch.tensor([loads for loads in final["domain_loads"].values()]).sum(0)
        assert per_layer.sum(1).tolist() == [eval_tokens * K] * 4
        assert final["val_maxvio"] == pytest.approx((per_layer.max(1).values / per_layer.float().mean(1) - 1).tolist())


def test_same_data_order_across_variants(abl):
    # step 1 sees the same init and batch in every variant (bias 0, the aux loss only changes gradients)
    first = [records(abl[0], n)[0][0] for n in NAMES]
    assert len({r["lm_loss"] for r in first}) == 1
    assert len({json.dumps(r["tokens_per_expert"]) for r in first}) == 1


def test_finished_runs_skipped_unfinished_redone_bitwise(abl):
    out, args, _ = abl
    before = records(out, "aux_seq")
    os.remove(os.path.join(out, "runs", "aux_seq", "seed0", "result.json"))    # as if killed mid-run
    rc, log = run_ablate(args)
    assert rc == 0, log
    assert log.count("finished earlier, skipped") == 2 and "[2/3] aux_seq seed 0: training" in log
    after = records(out, "aux_seq")
    assert [r["loss"] for r in after[0]] == [r["loss"] for r in before[0]]
    assert after[1][-1]["val_loss"] == before[1][-1]["val_loss"]
    rc, log = run_ablate(["--report", out])
    assert rc == 0 and os.path.isfile(os.path.join(out, "report.md"))


def test_tensorboard_has_per_layer_balance_tags(abl):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(abl[0], "runs", "alf_sign", "seed0", "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("maxvio_mean", "maxvio_max", "maxvio/layer0", "maxvio_accum/layer3", "bias_drift/layer1",
                "groups_per_token_mean"):
        assert tag in tags["scalars"], tag
    hist = acc.Histograms("groups_per_token/layer0")
    assert len(hist) == STEPS and hist[0].histogram_value.num == TOKENS_PER_STEP
    assert "bias/layer2" in tags["histograms"]


def test_bad_variants_file_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "v.yaml"
    path.write_text("variants:\n  - name: x\n    overides: [model.moe.aux_loss_alpha=0]\n")
    assert ablate.main(["--config", os.path.join(ROOT, "configs", "debug.yaml"), "--variants", str(path),
                        "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert "unknown key 'overides'" in capsys.readouterr().err
    path.write_text("variants:\n  - name: x\n    overrides: [model.moe.aux_loss_type=global]\n")
    assert ablate.main(["--config", os.path.join(ROOT, "configs", "debug.yaml"), "--variants", str(path),
                        "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert "variant 'x': model.moe.aux_loss_type" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "runs")


def test_full_matrix_is_valid_and_group_limit_off_resolves_n_group():
    spec = dict(config=os.path.join(ROOT, "configs", "small_moe.yaml"), steps=10, seeds=1, out="/tmp/unused",
                overrides=[])
    ablate.check_variants(spec, ablate.FULL_MATRIX)
    assert [v.name for v in ablate.DEFAULT_MATRIX] == ["no_balance", "aux_seq", "aux_batch", "alf_sign",
                                                       "alf_sign_seq", "alf_prop"]
    nogroup = next(v for v in ablate.FULL_MATRIX if "GROUP_LIMIT_OFF" in v.overrides)
    cfg = ablate.load_config(spec["config"], ablate.run_overrides(spec, nogroup, 0))
    assert (cfg.model.moe.n_group, cfg.model.moe.topk_group) == (4, 4)
    assert cfg.model.moe.bias_update == "sign" and cfg.train.seed == 0
