"""Bad input gets one clear message (no traceback) and exit code 2, and loses nothing:
config keys and types, data paths, empty and too-small corpora, truncated and corrupted checkpoints."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dsv3 import train as train_mod
from dsv3.checkpoint.store import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
TINY = ["train.steps=2", "train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32", "train.sample_tokens=2",
        "train.eval_batches=1", f"data.cache_dir={CACHE}"]


def run_main(capsys, args):
    code = train_mod.main(["configs/debug.yaml", *args])
    err = capsys.readouterr().err
    return code, err


def assert_clean_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_key_and_wrong_type(capsys, tmp_path):
    code, err = run_main(capsys, ["model.moe.n_routed_expert=16"])
    assert_clean_error(code, err, "model.moe.n_routed_expert")
    code, err = run_main(capsys, ["model.moe.n_activated_experts=eight"])
    assert_clean_error(code, err, "model.moe.n_activated_experts", "expected int", "'eight'")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT}/configs/debug.yaml\ntrain:\n  lr: fast\n")
    code = train_mod.main([str(bad)])
    assert_clean_error(code, capsys.readouterr().err, "train.lr", "expected float")


def test_not_an_override(capsys):
    code, err = run_main(capsys, ["steps50"])
    assert_clean_error(code, err, "key.path=value")


def test_missing_data_path(capsys, tmp_path):
    code, err = run_main(capsys, [*TINY, f"data.path={tmp_path}/nope", f"train.out_dir={tmp_path}/run"])
    assert_clean_error(code, err, f"{tmp_path}/nope")


def test_empty_corpus(capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "image.png").write_bytes(b"\x89PNG")
    code, err = run_main(capsys, [*TINY, f"data.path={corpus}", f"train.out_dir={tmp_path}/run"])
    assert_clean_error(code, err, "data.path")


def test_corpus_too_small(capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"doc{i}.txt").write_text(f"tiny document {i}.\n")
    code, err = run_main(capsys, [*TINY, f"data.path={corpus}", "data.seq_len=512", "model.vocab_size=300",
                                  "data.tokenizer_sample_mb=0.1", f"train.out_dir={tmp_path}/run"])
    assert_clean_error(code, err, "seq_len")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train_mod.main(["configs/debug.yaml", *TINY, "train.ckpt_every=1", f"train.out_dir={out}"]) == 0
    return out


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint(capsys, tmp_path, trained_run, damage):
    out = str(tmp_path / "run")
    shutil.copytree(trained_run, out)
    ckpt = latest_checkpoint(out)
    victim = os.path.join(ckpt, "model.safetensors" if damage == "truncate" else "optimizer.pt")
    data = open(victim, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
    with open(victim, "wb") as f:
        f.write(data)
    before = {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)}
    previous = sorted(os.listdir(out))
    code, err = run_main(capsys, [*TINY, "train.steps=3", "train.resume=auto", f"train.out_dir={out}"])
    assert_clean_error(code, err, victim)
    # nothing was overwritten or removed: the damaged one stays for inspection, the older one is intact
    assert sorted(os.listdir(out)) == previous
    assert {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)} == before


def test_exit_code_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsv3.train", "configs/debug.yaml", "train.nope=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "train.nope" in proc.stderr
