"""benchmarks/fp8_loss_gap.py (issue 19 item 4): the paired statistics against a hand computation, and
``--quick`` end to end in a subprocess — the JSON it writes, the FP8 recipe applied (its one-process
emulation of the FP8 all-to-alls called), the resume (a second invocation trains nothing) and a bad
results file refused with exit 2."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from fp8_gap_runs import paired_gap, seeds_to_resolve, smoothed  # noqa: E402

SCRIPT = os.path.join(REPO, "benchmarks", "fp8_loss_gap.py")


def test_paired_two_sigma_by_hand():
    # per-seed gaps 0.02/2 = 1%, 0/4 = 0, 0.05/5 = 1%: mean 2/300; deviations 1/300, -2/300, 1/300,
    # sum of squares 6/300², sd = sqrt(3/300²) = √3/300, σ = sd/√3 = 1/300, 2σ = 2/300
    g = paired_gap([2.0, 4.0, 5.0], [2.02, 4.0, 5.05])
    assert g["gaps"] == pytest.approx([0.01, 0.0, 0.01], abs=1e-15)
    assert g["mean"] == pytest.approx(2 / 300, rel=1e-12)
    assert g["sd"] == pytest.approx(math.sqrt(3) / 300, rel=1e-12)
    assert g["two_sigma"] == pytest.approx(2 / 300, rel=1e-12)
    # 2σ ≤ 0.25% needs n ≥ (2·sd / 0.0025)² = (2√3/0.75)² = 21.33 → 22 seeds
    assert seeds_to_resolve(g["sd"]) == 22


def test_tenths_gap_by_hand():
    from fp8_loss_gap import tenths_gap
    # 20 steps: tenths of 2 steps; FP8 10% behind on the first 4 steps, 5% on steps 5-6 (1.05 vs 1), level after
    base, fp8 = [1.0] * 20, [1.1] * 4 + [1.05] * 2 + [1.0] * 14
    assert tenths_gap(base, fp8) == pytest.approx([0.1, 0.1, 0.05] + [0.0] * 7, abs=1e-12)
    assert len(tenths_gap([2.0] * 3, [2.2] * 3)) == 10       # fewer steps than tenths: every tenth has one


def test_smoothed_is_mean_of_last_tenth():
    assert smoothed([float(i) for i in range(20)]) == (18 + 19) / 2
    assert smoothed([3.0, 1.0]) == 1.0      # fewer than 10 steps: the last one


def _quick(out: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, "--quick", "--out", out, *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_quick_writes_json_and_resumes(tmp_path):
    out = str(tmp_path / "gap")
    p = _quick(out)
    assert p.returncode == 0, p.stderr
    assert "runs: 2 to run, 0 already" in p.stdout
    path = os.path.join(out, "results.json")
    with open(path) as f:
        first = f.read()
    data = json.loads(first)
    assert data["settings"]["steps"] == 3 and data["settings"]["baseline"] in ("bf16", "fp32")
    runs = data["runs"]
    assert sorted(runs) == ["debug/base/seed0", "debug/fp8/seed0"]
    base, fp8 = runs["debug/base/seed0"], runs["debug/fp8/seed0"]
    for r in (base, fp8):
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
        assert r["smoothed"] == r["losses"][-1]          # 3 steps: the last 10% is the last step
    assert base["recipe"] is None
    rec = fp8["recipe"]
    assert rec["cache_wo_e5m6"] and rec["cache_swiglu_fp8"] and rec["dispatch"] and rec["grad_dispatch"]
    # debug.yaml: 3 MoE layers + the MTP module's; 3 training forwards each at least
    assert rec["dispatch_calls"] >= 3 * 4 and rec["grad_dispatch_calls"] >= 3 * 4
    # same seed, same data: step 1's loss differs only by FP8 rounding (E4M3: 2^-4 relative per element)
    rel = abs(fp8["losses"][0] - base["losses"][0]) / base["losses"][0]
    assert 0 < rel < 2 ** -4
    # the paired gap printed is the one computed from the JSON
    gap = (fp8["smoothed"] - base["smoothed"]) / base["smoothed"]
    assert f"gap {100 * gap:+.3f}%" in p.stdout

    again = _quick(out)
    assert again.returncode == 0, again.stderr
    assert "runs: 0 to run, 2 already" in again.stdout
    with open(path) as f:
        assert f.read() == first

    # --classes: the FP8 recipe with one GEMM class in high precision, same seed, beside the pair already there
    hp = _quick(out, "--classes", "experts.wgrad")
    assert hp.returncode == 0, hp.stderr
    assert "runs: 0 to run, 2 already" in hp.stdout and "class runs: 1 to run" in hp.stdout
    with open(path) as f:
        run = json.load(f)["runs"]["debug/hp-experts.wgrad/seed0"]
    assert run["recipe"]["high_precision"] == ["experts.wgrad"] and len(run["losses"]) == 3
    gap = (run["smoothed"] - base["smoothed"]) / base["smoothed"]
    change = (run["smoothed"] - fp8["smoothed"]) / fp8["smoothed"]
    assert any(line.split() == ["experts.wgrad", "1", f"{100 * gap:+.3f}%", f"{100 * change:+.3f}%"]
               for line in hp.stdout.splitlines()), hp.stdout


def test_bad_class_name_exit_2(tmp_path):
    from fp8_loss_gap import class_names
    assert class_names(["experts"]) == {"experts": ["experts.fprop", "experts.dgrad", "experts.wgrad"]}
    assert class_names(["wgrad"]) == {"wgrad": ["attention.wgrad", "dense.wgrad", "experts.wgrad"]}
    assert len(class_names([])) == 9
    p = _quick(str(tmp_path / "x"), "--classes", "head.fprop")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--classes head.fprop" in p.stderr


def test_bad_results_file_exit_2(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "results.json").write_text("not json")
    p = _quick(str(out))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp8_loss_gap:") and "results.json" in lines[0]
