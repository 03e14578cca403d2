"""Every bad input of issue 15 through ``dsv3.train.main`` in-process: exit 2, one stderr line naming what
to change, no traceback, nothing written. Config values fail at load, before any data preparation;
data cases use a tiny corpus and cache in tmp_path."""
from __future__ import annotations

import json
import os

import pytest

from dsv3 import train as train_mod
from dsv3.config import load_config
from dsv3.data.dataset import open_index, prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
TINY = ["train.steps=2", "train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32", "train.sample_tokens=2",
        "train.eval_batches=1", "model.vocab_size=300", "data.tokenizer_sample_mb=0.1"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# (overrides, a substring of the one error line). Each would otherwise crash later (ZeroDivisionError,
# a shape error, a KeyError in a schedule) or train silently on a wrong setting.
CONFIG_CASES = [
    (["model.moe.n_group=0"], "model.moe.n_group must be >= 1, got 0"),
    (["train.profile_steps=[3,1]"], "train.profile_steps must be [a, b] with 1 <= a <= b <= train.steps=2"),
    (["train.profile_steps=[1,5]"], "train.profile_steps must be [a, b]"),
    (["train.peak_tflops=0"], "train.peak_tflops must be > 0"),
    (["model.dim=0"], "model.dim must be >= 1"),
    (["model.mla.n_heads=0"], "model.mla.n_heads must be >= 1"),
    (["model.moe.n_shared_experts=-1"], "model.moe.n_shared_experts must be >= 0"),
    (["model.vocab_size=0"], "model.vocab_size must be >= 1"),
    (["model.n_layers=0"], "model.n_layers must be >= 1"),
    (["model.mla.q_lora_rank=0"], "model.mla.q_lora_rank must be >= 1"),
    (["model.mla.qk_rope_head_dim=7"], "qk_rope_head_dim must be even"),
    (["model.moe.n_activated_experts=0"], "model.moe.n_activated_experts must be >= 1"),
    (["model.moe.n_group=16", "model.moe.topk_group=16"], "1 expert per group"),
    (["model.moe.n_group=3"], "divisible by n_group"),
    (["model.moe.topk_group=5"], "topk_group must be in [1, n_group]"),
    (["model.n_dense_layers=-1"], "model.n_dense_layers must be >= 0"),
    (["model.n_dense_layers=5"], "n_dense_layers must be in [0, n_layers]"),
    (["model.mtp.depth=-1"], "model.mtp.depth must be >= 0"),
    (["model.mtp.lambda_start=nan"], "model.mtp.lambda_start must be a finite number"),
    (["model.moe.bias_update_speed=-0.001"], "model.moe.bias_update_speed must be >= 0"),
    (["model.moe.aux_loss_alpha=-1"], "model.moe.aux_loss_alpha must be >= 0"),
    (["model.moe.routed_scaling_factor=0"], "model.moe.routed_scaling_factor must be > 0"),
    (["model.norm_eps=0"], "model.norm_eps must be > 0"),
    (["model.mla.rope_theta=1"], "model.mla.rope_theta must be > 1"),
    (["model.mla.rope_scaling={factor: 0}"], "model.mla.rope_scaling.factor must be > 0"),
    (["model.mla.rope_scaling={factor: .inf}"], "model.mla.rope_scaling.factor must be a finite number"),
    (["fp8.block=64"], "fp8.block=64"),
    (["parallel.pp=0"], "parallel.pp must be >= 1"),
    (["parallel.ep=0"], "parallel.ep must be >= 1"),
    (["parallel.ep=3"], "parallel.ep=3 does not divide model.moe.n_routed_experts=16"),
    (["parallel.num_chunks=4"], "parallel.num_chunks was removed: pipeline micro-batches are train.global_batch"),
    (["parallel.timeout_s=0"], "parallel.timeout_s must be > 0"),
    (["parallel.pp=8"], "model.n_layers=4"),
    (["parallel.pp=3", "parallel.pp_schedule=dualpipe"], "needs an even parallel.pp"),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.global_batch=2", "train.micro_batch_size=1"],
     "dualpipe with pp=2 needs an even number of >= 4"),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.global_batch=5", "train.micro_batch_size=1"],
     "needs an even number of >= 4"),
    (["train.global_batch=5"], "train.global_batch=5 does not split over train.micro_batch_size=2"),
    (["parallel.zero1=false", "parallel.ep=2"], "parallel.zero1=false works only with plain data parallelism"),
    (["model.linear_impl=fp8"], "model.linear_impl was removed: fp8.enabled=true"),
    (["train.lr=-1"], "train.lr must be >= 0"),
    (["train.lr=nan"], "train.lr must be a finite number, got nan"),
    (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
    (["train.steps=-1"], "train.steps must be >= 0"),
    (["train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    (["train.grad_clip=nan"], "train.grad_clip must be a finite number"),
    (["train.beta1=1"], "train.beta1 must be in [0, 1)"),
    (["train.beta2=-0.5"], "train.beta2 must be in [0, 1)"),
    (["train.eps=0"], "train.eps must be > 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["train.grad_accum=2"], "train.grad_accum was removed: set train.global_batch"),
    (["train.global_batch=0"], "train.global_batch must be >= 1"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    (["train.max_skipped_steps=0"], "train.max_skipped_steps must be >= 1"),
    (["train.lock_stale_s=0"], "train.lock_stale_s must be > 0"),
    (["train.time_limit_s=-1"], "train.time_limit_s must be >= 0"),
    (["train.ckpt_every=-1"], "train.ckpt_every must be >= 0"),
    (["train.eval_every=-1"], "train.eval_every must be >= 0"),
    (["train.keep_last=-1"], "train.keep_last must be >= 0"),
    (["train.log_every=0"], "train.log_every must be >= 1"),
    (["train.eval_batches=0"], "train.eval_batches must be >= 1"),
    (["train.seed=-1"], "train.seed must be >= 0"),
    (["train.sample_prompt="], "train.sample_prompt is empty"),
    (["train.lr_segments=[{kind: cosine, tokens: 100, lr: -1e-4}]"], "train.lr_segments[0]"),
    (["train.lr_segments=[{kind: constant, tokens: -5, lr: 1e-4}]"], "train.lr_segments[0]"),
    (["train.batch_ramp={start_sequences: -1, tokens: 100}"], "train.batch_ramp.start_sequences must be >= 0"),
    (["train.batch_ramp={start_sequences: 4, tokens: -100}"], "train.batch_ramp.tokens must be >= 0"),
    (["data.val_fraction=0"], "data.val_fraction must be in (0, 1)"),
    (["data.fim_rate=1.5"], "data.fim_rate must be in [0, 1]"),
    (["data.seq_len=0"], "data.seq_len must be >= 1"),
    (["data.seq_len=2048"], "data.seq_len must be <= model.max_seq_len"),
    (["data.tokenizer_sample_mb=0"], "data.tokenizer_sample_mb must be > 0"),
    (["train.out_dir="], "train.out_dir is empty"),
    (["data.path="], "data.path is empty"),
    (["data.cache_dir="], "data.cache_dir is empty"),
    (["data.tokenizer="], "data.tokenizer is empty"),
    (["model={dim: 64, dim: 96}"], "key 'dim' is given twice"),
]


def run_main(capsys, args):
    code = train_mod.main(args)
    return code, capsys.readouterr().err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("overrides, needle", CONFIG_CASES, ids=[" ".join(o) for o, _ in CONFIG_CASES])
def test_bad_config_value(capsys, tmp_path, overrides, needle):
    out = tmp_path / "run"
    code, err = run_main(capsys, [DEBUG, *TINY, f"train.out_dir={out}", f"data.cache_dir={tmp_path}/cache",
                                  *overrides])
    assert_clean_error(code, err, needle)
    assert not out.exists() and not (tmp_path / "cache").exists()   # refused at load: nothing written


YAML_CASES = [  # (file bytes, substring); each file is passed as the config path (values: CONFIG_CASES)
    (b"train:\n  lr: 0.001\n  steps: 3\n  lr: 0.1\n", "line 4: key 'lr' is given twice (first on line 2)"),
    (b"model:\n  dim: 64\nmodel:\n  dim: 96\n", "key 'model' is given twice"),
    (b"train:\n  sample_prompt: caf\xe9\n", "is not UTF-8 text"),
    (b"train: [1, 2\n", "not valid YAML: line 2"),
    (b"base: 5\n", "'base' must name a YAML file"),
    (b"base: nope.yaml\n", "base config file not found"),
    (b"- 1\n- 2\n", "expected a mapping at the top level"),
]


@pytest.mark.parametrize("text, needle", YAML_CASES, ids=[n for _, n in YAML_CASES])
def test_bad_yaml_file(capsys, tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    code, err = run_main(capsys, [str(path), f"train.out_dir={tmp_path}/run"])
    assert_clean_error(code, err, needle, str(path))   # the line names the file
    assert not (tmp_path / "run").exists()


def test_yaml_path_is_a_folder_or_unreadable(capsys, tmp_path):
    code, err = run_main(capsys, [str(tmp_path), f"train.out_dir={tmp_path}/run"])
    assert_clean_error(code, err, f"{tmp_path} is a folder")
    if not IS_ROOT:  # root reads a mode-000 file
        path = tmp_path / "locked.yaml"
        path.write_text("train:\n  steps: 1\n")
        path.chmod(0)
        code, err = run_main(capsys, [str(path)])
        assert_clean_error(code, err, "cannot read config file", str(path))


# --------------------------------------------------------------------------------------------- data
def make_corpus(root):
    root.mkdir()
    for i in range(40):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    return root


def data_args(tmp_path, corpus, *extra):
    return [DEBUG, *TINY, f"data.path={corpus}", f"data.cache_dir={tmp_path}/cache",
            f"train.out_dir={tmp_path}/run", *extra]


def test_broken_symlink_in_corpus(capsys, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    os.symlink(tmp_path / "gone.txt", corpus / "linked.txt")
    code, err = run_main(capsys, data_args(tmp_path, corpus))
    assert_clean_error(code, err, f"{corpus}/linked.txt is a broken symbolic link")


def test_non_utf8_file_in_corpus(capsys, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    code, err = run_main(capsys, data_args(tmp_path, corpus))
    assert_clean_error(code, err, f"{corpus}/latin1.txt is not UTF-8")


@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_unwritable_cache_dir(capsys, tmp_path, how):
    corpus = make_corpus(tmp_path / "corpus")
    if how == "read_only":
        if IS_ROOT:
            pytest.skip("root writes into a read-only folder")
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o555)
    else:
        (tmp_path / "file").write_text("x")
        cache = tmp_path / "file" / "cache"
    code, err = run_main(capsys, data_args(tmp_path, corpus, f"data.cache_dir={cache}"))
    assert_clean_error(code, err, f"cannot write to data.cache_dir {cache}", "data.cache_dir to a writable folder")
    assert not [p for p in tmp_path.rglob("*.tmp*")]   # no temp file left behind


@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_unwritable_out_dir(capsys, tmp_path, how):
    corpus = make_corpus(tmp_path / "corpus")
    if how == "read_only":
        if IS_ROOT:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    code, err = run_main(capsys, data_args(tmp_path, corpus, f"train.out_dir={out}"))
    assert_clean_error(code, err, str(out), "train.out_dir")


@pytest.fixture
def packed(tmp_path):
    """A tiny corpus packed into tmp_path/cache; returns (train args, pack folder)."""
    corpus = make_corpus(tmp_path / "corpus")
    args = data_args(tmp_path, corpus)
    cfg = load_config(DEBUG, args[1:])
    pack_dir = prepare_data(cfg.data, cfg.model.vocab_size).pack_dir
    open_index(pack_dir)     # intact: accepted
    return args, pack_dir


def _rewrite(path, change):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(change(data))


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "bytes, its index says"),
    ("edit", "does not match the sha256 in its index"),
    ("index_field", "lacks fields"),
    ("index_json", "is not JSON"),
])
def test_damaged_packed_data(capsys, packed, damage, needle):
    args, pack_dir = packed
    train_bin, index = os.path.join(pack_dir, "train.bin"), os.path.join(pack_dir, "index.json")
    if damage == "truncate":
        _rewrite(train_bin, lambda b: b[: len(b) // 3])
    elif damage == "edit":
        _rewrite(train_bin, lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])
    elif damage == "index_field":
        meta = json.load(open(index))
        del meta["shards"]["train"]["sha256"]
        json.dump(meta, open(index, "w"))
    else:
        _rewrite(index, lambda b: b[: len(b) // 2])
    before = sorted(os.listdir(pack_dir))
    code, err = run_main(capsys, args)
    assert_clean_error(code, err, f"the packed data in {pack_dir} is damaged", needle, "delete that folder")
    assert sorted(os.listdir(pack_dir)) == before   # left for inspection, not removed
