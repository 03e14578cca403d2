"""Strict config loading: unknown keys, wrong types, base includes, CLI overrides, CLI exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, config_path
from dsv3.config import Config, ConfigError, load_config, replace


def test_defaults_and_671b_values():
    cfg = load_config(config_path("dsv3_671b.yaml"))
    m = cfg.model
    assert (m.n_layers, m.n_dense_layers, m.dim, m.inter_dim, m.vocab_size) == (61, 3, 7168, 18432, 129280)
    assert (m.mla.n_heads, m.mla.q_lora_rank, m.mla.kv_lora_rank) == (128, 1536, 512)
    assert (m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim) == (128, 64, 128)
    assert (m.moe.n_routed_experts, m.moe.n_shared_experts, m.moe.moe_inter_dim) == (256, 1, 2048)
    assert (m.moe.n_activated_experts, m.moe.n_group, m.moe.topk_group) == (8, 8, 4)
    assert m.moe.routed_scaling_factor == 2.5 and m.norm_eps == 1e-6 and m.mtp.depth == 1
    assert isinstance(load_config(None), Config)


def test_unknown_key_names_its_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  moe:\n    n_expert: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "model.moe.n_expert" in str(e.value)


def test_wrong_type_override_names_path_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config(config_path("debug.yaml"), ["model.moe.n_activated_experts=eight"])
    assert str(e.value) == "model.moe.n_activated_experts: expected int, got 'eight'"
    with pytest.raises(ConfigError, match=r"model\.dim: expected int, got 1\.5"):
        load_config(None, ["model.dim=1.5"])
    with pytest.raises(ConfigError, match=r"model\.moe\.scoring_func: expected one of 'sigmoid', 'softmax'"):
        load_config(None, ["model.moe.scoring_func=tanh"])
    with pytest.raises(ConfigError, match=r"model\.moe\.norm_topk_prob: expected bool"):
        load_config(None, ["model.moe.norm_topk_prob=3"])


def test_wrong_type_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  mla:\n    n_heads: many\n")
    with pytest.raises(ConfigError, match=r"^model\.mla\.n_heads: expected int, got 'many'$"):
        load_config(str(p))


def test_base_include_with_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  dim: 64\n  n_layers: 3\n  moe:\n    n_routed_experts: 8\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  n_layers: 5\n  moe:\n    n_activated_experts: 2\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["model.moe.n_group=2", "train.lr=1e-4"])
    assert (cfg.model.dim, cfg.model.n_layers) == (64, 5)                   # base kept, child overrides
    assert (cfg.model.moe.n_routed_experts, cfg.model.moe.n_activated_experts) == (8, 2)  # deep merge
    assert cfg.model.moe.n_group == 2 and cfg.train.lr == 1e-4               # CLI on top, "1e-4" → float
    small = load_config(config_path("small_moe.yaml"))                       # the shipped include
    assert (small.model.dim, small.model.moe.routed_scaling_factor) == (256, 2.5)


def test_override_types_and_replace():
    cfg = load_config(None, ["model.mla.q_lora_rank=null", "model.moe.aux_loss_alpha=0", "train.dtype=bf16"])
    assert cfg.model.mla.q_lora_rank is None and cfg.model.moe.aux_loss_alpha == 0.0
    assert isinstance(cfg.model.moe.aux_loss_alpha, float) and cfg.train.dtype == "bf16"
    assert replace(cfg, ["model.dim=96"]).model.dim == 96
    with pytest.raises(ConfigError, match="model.nope"):
        replace(cfg, ["model.nope=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["model.dim"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="n_activated_experts must be <= n_routed_experts"):
        load_config(None, ["model.moe.n_activated_experts=32"])
    with pytest.raises(ConfigError, match="divisible by n_group"):
        load_config(None, ["model.moe.n_group=3"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv3.tools.show_config", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_exit_code_and_one_line_message():
    r = _cli(config_path("debug.yaml"), "model.moe.n_activated_experts=eight")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.moe.n_activated_experts: expected int, got 'eight'" in lines[0]
    r = _cli(config_path("nope.yaml"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = _cli(config_path("dsv3_671b.yaml"))
    assert r.returncode == 0 and "total params: 671.03B" in r.stdout


@pytest.mark.parametrize("name", ["debug.yaml", "small_moe.yaml", "deepseek_v2_lite.yaml", "dsv3_671b.yaml",
                                  "dsv3_671b_128k.yaml"])
def test_shipped_configs_pass_validation(name):
    assert isinstance(load_config(config_path(name)), Config)


def test_duplicate_keys_refused_merge_keys_allowed(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  lr: 0.001\n  steps: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 4: key 'lr' is given twice \(first on line 2\); keep one$"):
        load_config(str(p))
    # a YAML merge (<<) followed by an explicit key is an override, not a duplicate
    ok = tmp_path / "merge.yaml"
    ok.write_text("x: &d {lr: 0.5, steps: 7}\ntrain:\n  <<: *d\n  lr: 0.25\n")
    from dsv3.config import _read_yaml
    assert _read_yaml(str(ok))["train"] == {"lr": 0.25, "steps": 7}


def test_every_float_must_be_finite_and_sizes_positive():
    with pytest.raises(ConfigError, match=r"^train\.lr_segments\[1\]\.lr must be a finite number, got nan$"):
        load_config(None, ["train.lr_segments=[{kind: constant, tokens: 5, lr: 0.1}, "
                           "{kind: cosine, tokens: 5, lr: .nan}]"])
    with pytest.raises(ConfigError, match=r"^model\.moe\.n_group must be >= 1, got 0$"):
        load_config(None, ["model.moe.n_group=0"])
    # 0 where 0 means off stays valid
    cfg = load_config(None, ["model.moe.n_shared_experts=0", "model.mtp.depth=0", "train.grad_clip=0",
                             "train.steps=0", "model.n_dense_layers=0", "train.time_limit_s=0"])
    assert (cfg.model.moe.n_shared_experts, cfg.train.grad_clip, cfg.train.steps) == (0, 0.0, 0)


def test_report_global_batch_and_long_context_phases():
    """The report's batch (§4.2: 15,360 sequences, ramped from 3,072 over 469B tokens) and its two
    context-extension phases (§4.3: 1,000 steps each at LR 7.3e-6, 32K × 1,920 then 128K × 480, YaRN 40)."""
    r = _cli(config_path("dsv3_671b.yaml"))
    assert r.returncode == 0 and "  global_batch: 15360\n" in r.stdout
    t = load_config(config_path("dsv3_671b.yaml")).train
    assert (t.global_batch, t.batch_ramp.start_sequences, t.batch_ramp.tokens) == (15360, 3072, 469_000_000_000)
    for name, seq, batch, source in (("dsv3_671b_32k.yaml", 32768, 1920, "runs/dsv3_671b"),
                                     ("dsv3_671b_128k.yaml", 131072, 480, "runs/dsv3_671b_32k")):
        c = load_config(config_path(name))
        assert (c.data.seq_len, c.train.global_batch, c.train.steps, c.train.lr, c.train.warmup_steps) == \
            (seq, batch, 1000, 7.3e-6, 0), name
        assert c.train.lr_segments == [] and c.train.batch_ramp is None and c.train.init_from == source
        assert c.model.mla.rope_scaling.factor == 40.0 and c.model.max_seq_len >= seq


def test_batch_split_and_ramp_rounding_rule():
    """dsv3/data/batch.py: micro-batches per replica = batch / (dp · micro_batch_size); under the ramp the batch
    is rounded down to a multiple of dp · micro_batch_size, never below the schedule's fewest chunks,
    even under DualPipe. Hand-computed on the report's layout (PP16 × DP128, micro-batch 1)."""
    from dsv3.data.batch import check_layout, micro_batches_at
    from dsv3.errors import UserError
    t = load_config(config_path("dsv3_671b.yaml")).train
    assert check_layout(t, 128, 16, "dualpipe") == 120                       # 15360 / 128
    ramp = t.batch_ramp.tokens
    assert micro_batches_at(t, 0, 128, 16, "dualpipe") == 32                 # 3072 / 128 = 24 < 2·16
    assert micro_batches_at(t, ramp // 2, 128, 16, "dualpipe") == 72         # 9216 / 128
    # 3072 + 12288·f = 128·73.5 → 73 chunks, odd: DualPipe takes 72; 1F1B keeps 73
    f_tokens = int(ramp * (128 * 73.5 - 3072) / 12288)
    assert micro_batches_at(t, f_tokens, 128, 16, "dualpipe") == 72
    assert micro_batches_at(t, f_tokens, 128, 16, "1f1b") == 73
    assert micro_batches_at(t, ramp, 128, 16, "dualpipe") == 120
    assert micro_batches_at(t, 0, 128) == 24                                 # no pipeline: 3072 / 128
    with pytest.raises(UserError, match=r"train.global_batch=15360 does not split over dp=7"):
        check_layout(t, 7)
    with pytest.raises(UserError, match=r"gives 15 micro-batches .* needs an even number of >= 32"):
        check_layout(t, 1024, 16, "dualpipe")
