"""Hugging Face checkpoints: logits parity with transformers' DeepseekV3/V2 both ways, bit-exact BF16
round trip with the MTP layer, FP8 export within E4M3 rounding, and one clear error per bad checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import triton_kernels._triton_compat  # noqa: F401,E402 - before transformers imports triton: the kernel tests need its interpreter
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM)

from dsv3.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeScaling
from dsv3.errors import CheckpointError
from dsv3.checkpoint.hf import iter_hf_weights, load_hf_checkpoint, main, save_hf_checkpoint
from dsv3.checkpoint.hf_weights import hf_slots
from dsv3.model.transformer import Transformer
from dsv3.model.mtp import shifted

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}
SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=3,
             first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
             max_position_embeddings=64, rope_parameters=YARN)


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.15) -> None:
    """Weights large enough that routing and attention matter; norms away from 1; routing bias != 0."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.normal_(1.0, 0.2)
        else:
            p.normal_(0.0, std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1)


def hf_v3(rope_interleave: bool = True) -> DeepseekV3ForCausalLM:
    cfg = DeepseekV3Config(**SHAPE, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5, rope_interleave=rope_interleave)
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize(model)
    return model


def hf_v2_lite() -> DeepseekV2ForCausalLM:
    cfg = DeepseekV2Config(**SHAPE, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                           norm_topk_prob=False, routed_scaling_factor=1.0)
    model = DeepseekV2ForCausalLM(cfg).eval()
    randomize(model)
    return model


def fuse_experts(src: str, dst: str) -> None:
    """Rewrite a per-expert checkpoint in transformers 5's fused layout, in two shards with an index."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if ".mlp.experts." not in name:
            out[name] = t
            continue
        prefix, rest = name.split(".mlp.experts.")
        j = int(rest.split(".")[0])
        if j == 0:
            E = sum(1 for n in tensors if n.startswith(prefix + ".mlp.experts.") and n.endswith("gate_proj.weight"))
            get = lambda k, proj: tensors[f"{prefix}.mlp.experts.{k}.{proj}.weight"]
            out[prefix + ".mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([get(k, "gate_proj"), get(k, "up_proj")]) for k in range(E)])
            out[prefix + ".mlp.experts.down_proj"] = torch.stack([get(k, "down_proj") for k in range(E)])
    os.makedirs(dst)
    names = sorted(out)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: out[n].contiguous() for n in part}, os.path.join(dst, file), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}, f)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def max_logit_diff(hf_model, ours, ids) -> float:
    with torch.no_grad():
        return (hf_model(ids).logits - ours(ids)).abs().max().item()


IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout,interleave", [("per_expert", True), ("fused", True), ("per_expert", False)])
def test_import_v3_matches_transformers(tmp_path, layout, interleave):
    hf = hf_v3(interleave)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf"
    if layout == "fused":
        fuse_experts(str(tmp_path / "hf"), str(tmp_path / "fused"))
        path = tmp_path / "fused"
    ours = load_hf_checkpoint(str(path))
    c = ours.cfg
    assert (c.moe.n_group, c.moe.topk_group, c.moe.routed_scaling_factor, c.moe.scoring_func, c.moe.topk_method,
            c.n_dense_layers, c.mla.q_lora_rank) == (4, 2, 2.5, "sigmoid", "noaux_tc", 1, 24)
    assert c.mla.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                                             mscale_all_dim=0.707)
    bias = hf.model.layers[2].mlp.gate.e_score_correction_bias
    assert torch.equal(ours.layers[2].ffn.gate.e_score_correction_bias, bias) and bias.abs().min() > 0
    assert max_logit_diff(hf, ours, IDS) < 1e-4


def test_import_v2_lite_matches_transformers(tmp_path):
    hf = hf_v2_lite()
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(str(tmp_path))
    c = ours.cfg
    assert (c.moe.scoring_func, c.moe.topk_method, c.moe.norm_topk_prob, c.mla.q_lora_rank,
            c.moe.n_shared_experts, c.mtp.depth) == ("softmax", "greedy", False, None, 2, 0)
    # buffers the loader fills itself (it allocates parameters uninitialised) equal the constructor's
    fresh = dict(Transformer(c).named_buffers())
    assert all(torch.equal(b, fresh[n]) for n, b in ours.named_buffers()) and len(fresh) >= 3
    assert max_logit_diff(hf, ours, IDS) < 1e-4


def ours_cfg(v3: bool = True, mtp: int = 1) -> ModelConfig:
    moe = (MoEConfig(n_routed_experts=8, n_shared_experts=1, moe_inter_dim=16, n_activated_experts=3, n_group=4,
                     topk_group=2, routed_scaling_factor=2.5) if v3 else
           MoEConfig(n_routed_experts=8, n_shared_experts=2, moe_inter_dim=16, n_activated_experts=3, n_group=4,
                     topk_group=2, scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False))
    return ModelConfig(vocab_size=96, dim=32, n_layers=3, n_dense_layers=1, inter_dim=48, max_seq_len=64,
                       mla=MLAConfig(n_heads=2, q_lora_rank=24 if v3 else None, kv_lora_rank=16, qk_nope_head_dim=8,
                                     qk_rope_head_dim=8, v_head_dim=12,
                                     rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16)),
                       moe=moe, mtp=MTPConfig(depth=mtp))


def our_model(v3: bool = True, mtp: int = 1) -> Transformer:
    model = Transformer(ours_cfg(v3, mtp)).eval()
    randomize(model)
    return model


@pytest.mark.parametrize("v3", [True, False])
def test_export_loads_in_transformers(tmp_path, v3):
    ours = our_model(v3)
    shards = save_hf_checkpoint(ours, str(tmp_path), dtype=torch.float32, max_shard_bytes=100_000)
    assert len(shards) >= 3 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    cls = DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM
    hf = cls.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert max_logit_diff(hf, ours, IDS) < 1e-4


def mtp_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = model.hidden(ids)
        cos, sin = model.rope(0, ids.shape[1])
        h = model.mtp[0](h, model.embed(shifted(ids, 1, 0)), cos, sin)
        return model.head(model.mtp[0].norm(h))


def test_bf16_round_trip_is_bit_exact_with_mtp(tmp_path):
    ours = our_model(mtp=1)
    for p in ours.parameters():  # as load_hf_checkpoint casts: parameters only, buffers stay float32
        p.data = p.data.to(torch.bfloat16)
    save_hf_checkpoint(ours, str(tmp_path), dtype=torch.bfloat16, max_shard_bytes=100_000)
    back = load_hf_checkpoint(str(tmp_path), dtype=torch.bfloat16)
    assert back.cfg == ours.cfg
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b) and any(k.startswith("mtp.0.block.ffn.experts") for k in a)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # the MTP layer is stored as layer 3 with its own copies of the embedding and head
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    with safe_open(str(tmp_path / index["model.layers.3.shared_head.head.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.3.shared_head.head.weight"), a["head.weight"])
    assert {"model.layers.3.embed_tokens.weight", "model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
            "model.layers.3.hnorm.weight", "model.layers.3.shared_head.norm.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias"} <= set(index)
    assert torch.equal(mtp_logits(back, IDS), mtp_logits(ours, IDS))


def test_fp8_export_quantises_the_released_set(tmp_path):
    ours = our_model(mtp=1)
    save_hf_checkpoint(ours, str(tmp_path), dtype=torch.bfloat16, fp8=True)
    config = json.load(open(tmp_path / "config.json"))
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = {n: f.get_tensor(n) for n in f.keys()}
    fp8 = {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    assert {n + "_scale_inv" for n in fp8} == {n for n in stored if n.endswith("_scale_inv")}
    modules = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {s.hf for s in hf_slots(ours.cfg) if s.hf.split(".")[-2] in modules}
    assert fp8 == expected
    # 4 layers (3 + MTP) × 5 attention + 1 dense × 3 + 3 MoE layers × (8 routed + 1 shared) × 3
    assert len(fp8) == 4 * 5 + 3 + 3 * 9 * 3
    for keep in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.3.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert stored[keep].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    back = load_hf_checkpoint(str(tmp_path))
    state, orig = back.state_dict(), ours.state_dict()
    for s in hf_slots(ours.cfg):
        if s.copy:
            continue
        w0 = orig[s.ours] if s.expert is None else orig[s.ours][s.expert]
        w1 = state[s.ours] if s.expert is None else state[s.ours][s.expert]
        if s.hf in fp8:
            scale = stored[s.hf + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
            scale = scale[: w0.shape[0], : w0.shape[1]]
            # E4M3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal step 2^-9 of the block scale
            bound = torch.maximum(w0.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
            assert ((w1 - w0).abs() <= bound).all(), s.hf
            assert (w1 - w0).abs().max() > 0
        elif not s.hf.endswith("e_score_correction_bias"):
            assert torch.equal(w1, w0.to(torch.bfloat16).float()), s.hf
        else:
            assert torch.equal(w1, w0), s.hf


def test_keep_fp8_hands_over_weights_and_scales(tmp_path):
    ours = our_model(mtp=0)
    save_hf_checkpoint(ours, str(tmp_path), fp8=True)
    kept = {(k, e): (t, s) for k, e, t, s in iter_hf_weights(str(tmp_path), dequantize=False)}
    deq = {(k, e): t for k, e, t, _ in iter_hf_weights(str(tmp_path), dequantize=True)}
    w_fp8, scale = kept[("layers.1.ffn.experts.w1", 5)]
    assert w_fp8.dtype == torch.float8_e4m3fn and scale.shape == (1, 1)
    # one 128×128 block (16×32 weight): the E4M3 values times its one scale, in fp32
    assert torch.equal(w_fp8.float() * scale.float(), deq[("layers.1.ffn.experts.w1", 5)])
    assert sum(s is not None for _, s in kept.values()) == 3 * 5 + 3 + 2 * 9 * 3


# ------------------------------------------------------------------------------------ bad checkpoints
@pytest.fixture
def sharded(tmp_path):
    save_hf_checkpoint(our_model(mtp=0), str(tmp_path / "ck"), max_shard_bytes=60_000)
    return tmp_path / "ck"


def _index(path):
    return json.load(open(path / "model.safetensors.index.json"))


def _expect_error(path, fragment, capsys):
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(str(path))
    assert fragment in str(err.value)
    assert main(["convert", str(path), str(path) + "_out"]) == 2
    assert fragment in capsys.readouterr().err


def test_missing_shard(sharded, capsys):
    file = _index(sharded)["weight_map"]["lm_head.weight"]
    os.remove(sharded / file)
    _expect_error(sharded, file, capsys)


def test_truncated_shard(sharded, capsys):
    file = _index(sharded)["weight_map"]["model.norm.weight"]
    size = os.path.getsize(sharded / file)
    with open(sharded / file, "r+b") as f:
        f.truncate(size - 100)
    _expect_error(sharded, f"{file} is truncated", capsys)


def _rewrite(path, name, new_name, tensor):
    index = _index(path)
    file = index["weight_map"].pop(name)
    tensors = load_file(str(path / file))
    del tensors[name]
    tensors[new_name] = tensor
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    index["weight_map"][new_name] = file
    json.dump(index, open(path / "model.safetensors.index.json", "w"))


def test_shape_mismatch(sharded):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(sharded, name, name, torch.zeros(17, 32, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'.*\[17, 32\].*\[16, 32\]"):
        load_hf_checkpoint(str(sharded))


def test_unknown_and_missing_tensor(sharded):
    name = "model.layers.2.self_attn.o_proj.weight"
    _rewrite(sharded, name, "model.layers.2.self_attn.o_proj.lora.weight", torch.zeros(32, 24, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"unknown tensor 'model\.layers\.2\.self_attn\.o_proj\.lora\.weight'"):
        load_hf_checkpoint(str(sharded))
    _rewrite(sharded, "model.layers.2.self_attn.o_proj.lora.weight", "model.layers.2.self_attn.o_proj.weight",
             torch.zeros(32, 24, dtype=torch.bfloat16))
    _rewrite(sharded, "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
             torch.zeros(32, 16, dtype=torch.bfloat16))
    index = _index(sharded)
    index["weight_map"].pop("model.layers.1.mlp.shared_experts.up_proj.weight")
    json.dump(index, open(sharded / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.shared_experts\.up_proj\.weight' is missing"):
        load_hf_checkpoint(str(sharded))


# ------------------------------------------------------------------------ released config.json files
V3_CONFIG = {  # deepseek-ai/DeepSeek-V3 config.json (auto_map left out)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                    "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
V2_LITE_CONFIG = {  # deepseek-ai/DeepSeek-V2-Lite config.json (auto_map left out)
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}


def test_released_configs_map_to_the_published_sizes():
    """Report §2 / Table 1 and the released configs: 671.03B total / 37.55B activated / MTP 11.6B
    (13.5B stored); V2-Lite 15.71B / 2.66B."""
    from dsv3.checkpoint.hf_config import config_from_hf, config_to_hf
    from dsv3.model.params import count_params
    v3 = config_from_hf(V3_CONFIG)
    m = v3.moe
    assert (m.n_group, m.topk_group, m.routed_scaling_factor, m.scoring_func, m.topk_method, m.norm_topk_prob,
            v3.n_dense_layers, v3.mtp.depth, v3.mla.q_lora_rank) == (8, 4, 2.5, "sigmoid", "noaux_tc", True, 3, 1, 1536)
    assert v3.mla.rope_scaling == RopeScaling(factor=40.0, original_max_position_embeddings=4096)
    c = count_params(v3)
    assert (round(c.total / 1e9, 2), round(c.activated / 1e9, 2), round(c.mtp / 1e9, 1),
            round(c.mtp_stored / 1e9, 1)) == (671.03, 37.55, 11.6, 13.5)
    lite = config_from_hf(V2_LITE_CONFIG)
    assert (lite.mla.q_lora_rank, lite.moe.scoring_func, lite.moe.n_shared_experts, lite.mtp.depth,
            lite.mla.rope_scaling.mscale_all_dim) == (None, "softmax", 2, 0, 0.707)
    c = count_params(lite)
    assert (round(c.total / 1e9, 2), round(c.activated / 1e9, 2)) == (15.71, 2.66)
    for cfg in (v3, lite):  # what we write reads back to the same config
        assert config_from_hf(config_to_hf(cfg)) == cfg
