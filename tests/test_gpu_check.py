"""launch/gpu_check.sh --dry-run (issue 17 G): the one-shot GPU check's parts at tiny sizes on the CPU.

The report is parsed and its numbers re-checked here: every Triton kernel found by an AST scan of
triton_kernels/ has a passing check; the FP8 run's per-step losses are recomputed against the torch
reference's (1e-3 relative) and differ from BF16's (FP8 really on); the ZeRO-1 path's losses and
gradient norms against one process; the GEMM benchmark's error is E4M3 noise (1e-3 < err < 5e-2, as
tests/test_fp8_gemm.py). A part killed at its timeout is reported as TIMEOUT and leaves no process.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TITLES = ["0. Environment", "1. Triton kernels against their torch references",
          "2. FP8 GEMM benchmark (benchmarks/bench_fp8_gemm.py)",
          "3. Training configs/small_moe.yaml: BF16, FP8, FP8 against the torch reference",
          "4. parallelize() (ZeRO-1) on a process group of world size 1",
          "5. Host syncs per step and the attention kernel", "Summary"]


def _run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, DSV3_PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _table(body: str, first_header: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header starts with ``first_header``."""
    lines = body.splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith(f"| {first_header} |"))
    rows = []
    for s in lines[start + 2:]:
        if not s.startswith("|"):
            break
        rows.append([c.strip() for c in s.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.md"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out}"
    return _sections(out.read_text()), out


def test_sections_in_order_and_summary(dry_run):
    sections, out = dry_run
    assert list(sections) == TITLES
    summary = {r[0]: r[1] for r in _table(sections["Summary"], "part")}
    assert summary == {"0": "INFO", "1": "PASS", "2": "PASS", "3": "PASS", "4": "PASS", "5": "INFO"}, summary
    log = out.with_suffix(".log").read_text()
    assert all(f"===== run_{name}.log" in log for name in ("bf16", "fp8", "fp8_ref", "local", "zero1"))


def _jit_kernels() -> set[str]:
    """@triton.jit functions named *_kernel in triton_kernels/, by the AST (the check scans the text)."""
    names = set()
    for path in (REPO / "triton_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_triton_kernel_matches_its_reference(dry_run):
    body = dry_run[0][TITLES[1]]
    rows = _table(body, "check")
    assert rows and all(r[-1] == "PASS" for r in rows), [r for r in rows if r[-1] != "PASS"]
    covered = {k.strip() for r in rows for k in r[1].split(",") if k.strip().endswith("_kernel")}
    kernels = _jit_kernels()
    assert len(kernels) >= 11 and covered == kernels, (kernels - covered, covered - kernels)
    for r in rows:   # quantisers: bit-exact, every element
        if r[3].startswith("0 differ"):
            counts = re.findall(r"(\d+)/(\d+) differ", r[2])
            assert counts and all(int(n) == 0 and int(total) > 0 for n, total in counts), r


def test_fp8_training_losses_match_the_torch_reference(dry_run):
    body = dry_run[0][TITLES[3]]
    steps = _table(body, "step")
    assert [int(r[0]) for r in steps] == [1, 2]
    for _, bf16, fp8, ref, _ in steps:
        assert abs(float(fp8) - float(ref)) / abs(float(ref)) <= 1e-3
    # FP8 really ran: its losses are not BF16's (same seed, same batches)
    assert any(float(fp8) != float(bf16) for _, bf16, fp8, _, _ in steps)
    runs = _table(body, "run")
    assert [(r[0], r[2], r[3]) for r in runs] == [("bf16", "0", "2"), ("fp8", "0", "2"), ("fp8_ref", "0", "2")]


def test_zero1_world_one_equals_one_process(dry_run):
    rows = _table(dry_run[0][TITLES[4]], "step")
    assert [int(r[0]) for r in rows] == [1, 2]
    for _, loss, loss_z, _, norm, norm_z, _ in rows:
        assert abs(float(loss_z) - float(loss)) <= 1e-3 * abs(float(loss))
        assert abs(float(norm_z) - float(norm)) <= 1e-3 * abs(float(norm))


def test_gemm_benchmark_error_is_e4m3_noise(dry_run):
    body = dry_run[0][TITLES[2]]
    errs = [float(s.split("|")[-1].split()[0]) for s in body.splitlines()
            if re.match(r"^\s+\d+\s+\d+\s+\d+", s) and "|" in s]
    assert len(errs) == 2  # the dense and the grouped smoke shapes
    assert all(1e-3 < e < 0.05 for e in errs), errs


def test_a_part_past_its_timeout_is_killed_and_reported(tmp_path):
    out = tmp_path / "report.md"
    proc = _run("--dry-run", "--parts", "3", "--timeout", "3=2", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    sections = _sections(out.read_text())
    assert list(sections) == [TITLES[3], "Summary"]
    assert "**TIMEOUT**: killed after 2 s" in sections[TITLES[3]]
    (row,) = _table(sections["Summary"], "part")
    assert row[:2] == ["3", "TIMEOUT"] and 2 <= float(row[2]) < 30
    work = re.search(r"work folder (\S+)", out.read_text()).group(1)
    assert not os.path.exists(work)
    leftovers = subprocess.run(["pgrep", "-f", work], capture_output=True, text=True).stdout.split()
    assert leftovers == []   # the part and the training run it had started were killed


def test_bad_arguments_exit_2_with_one_line():
    proc = _run("--parts", "one", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--parts 'one'" in proc.stderr
