"""``python -m dsv3.checkpoint.hf convert``: FP8 -> BF16 -> FP8 on a complete 9-shard checkpoint whose scales sit in other
shards, with the converting process's peak memory measured; and a real model through the converter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint

N_SHARDS, EXPERTS, INTER, HIDDEN = 9, 8, 600, 900  # layer k in shard k: 24 × 0.54 MB of E4M3, ragged 128-blocks
MB = 1 << 20

MEASURE = r"""
import json, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from dsv3.checkpoint.hf import main
import torch._dynamo  # imported by the first meta-device model (config checks): ~150 MB of code, not data
out = []
for args in json.loads(sys.argv[1]):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    rc = main(args)
    out.append({"rc": rc, "base": base, "peak": status("VmHWM:")})
print(json.dumps(out))
"""


def random_fp8(shape, gen) -> torch.Tensor:
    bits = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    bits[(bits & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in E4M3
    return bits.view(torch.float8_e4m3fn)


def write_fp8_checkpoint(path: str) -> dict:
    """A complete DeepSeek-V3 checkpoint (N_SHARDS MoE layers, no MTP): shard k holds layer k (its experts
    in E4M3, the rest in BF16, its routing bias in float32); the expert weights' scales sit in shard k+1."""
    gen = torch.Generator().manual_seed(0)
    os.makedirs(path)
    shards = [{} for _ in range(N_SHARDS)]
    weight_map = {}
    bf16 = lambda *shape: torch.randn(shape, generator=gen).bfloat16()  # noqa: E731
    for k in range(N_SHARDS):
        p = f"model.layers.{k}."
        for name, shape in [("input_layernorm", (HIDDEN,)), ("post_attention_layernorm", (HIDDEN,)),
                            ("self_attn.q_proj", (16, HIDDEN)), ("self_attn.kv_a_proj_with_mqa", (24, HIDDEN)),
                            ("self_attn.kv_a_layernorm", (16,)), ("self_attn.kv_b_proj", (16, 16)),
                            ("self_attn.o_proj", (HIDDEN, 8)), ("mlp.gate", (EXPERTS, HIDDEN))]:
            shards[k][p + name + ".weight"] = bf16(*shape)
        shards[k][p + "mlp.gate.e_score_correction_bias"] = torch.randn(EXPERTS, generator=gen)
        for j in range(EXPERTS):
            for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)), ("down_proj", (HIDDEN, INTER))):
                name = f"{p}mlp.experts.{j}.{proj}.weight"
                shards[k][name] = random_fp8(shape, gen)
                scale_shape = tuple(-(-n // 128) for n in shape)
                shards[(k + 1) % N_SHARDS][name + "_scale_inv"] = torch.rand(scale_shape, generator=gen) * 1e-2 + 1e-4
    shards[0]["model.embed_tokens.weight"] = bf16(64, HIDDEN)
    shards[-1]["model.norm.weight"] = bf16(HIDDEN)
    shards[-1]["lm_head.weight"] = bf16(64, HIDDEN)
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{N_SHARDS:05d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "vocab_size": 64, "hidden_size": HIDDEN, "intermediate_size": 16, "moe_intermediate_size": INTER,
              "num_hidden_layers": N_SHARDS, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0,
              "num_attention_heads": 1, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
              "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": EXPERTS, "num_experts_per_tok": 2,
              "n_group": 1, "topk_group": 1, "n_shared_experts": 0, "max_position_embeddings": 64,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return {"w": shards[3]["model.layers.3.mlp.experts.5.gate_proj.weight"],
            "s": shards[4]["model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv"],
            "bias": shards[2]["model.layers.2.mlp.gate.e_score_correction_bias"]}


def weight_map(path: str) -> dict[str, str]:
    """tensor name -> file, from the index or, for a one-file checkpoint, from model.safetensors itself."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return json.load(open(index))["weight_map"]
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {n: "model.safetensors" for n in f.keys()}


def read(path: str, name: str) -> torch.Tensor:
    with safe_open(os.path.join(path, weight_map(path)[name]), "pt") as f:
        return f.get_tensor(name)


def dequant_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The released format's rule, written out: every 128×128 block of E4M3 values times its scale (fp32)."""
    N, K = w_fp8.shape
    full = scale_inv.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    return w_fp8.float() * full


def quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Report §3.3.1 for weights, written out: per 128×128 block scale = max(amax, 1e-4) / 448 (fp32) and
    E4M3 = round-to-nearest(w / scale); ragged edge blocks take the amax of the elements they hold."""
    N, K = w.shape
    scale = torch.empty(-(-N // 128), -(-K // 128))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[128 * i:128 * i + 128, 128 * j:128 * j + 128].abs().max().clamp(min=1e-4) / 448.0
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    return (w / full).to(torch.float8_e4m3fn), scale


def largest_shard(path: str) -> int:
    return max(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def test_convert_streams_shard_by_shard(tmp_path):
    src, bf16, fp8 = str(tmp_path / "fp8"), str(tmp_path / "bf16"), str(tmp_path / "fp8_again")
    ref = write_fp8_checkpoint(src)
    total_in = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) >= 8
    runs = [["convert", src, bf16, "--to-bf16", "--max-shard-size", "30MB"],
            ["convert", bf16, fp8, "--to-fp8", "--max-shard-size", "15MB"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    for stat, src_dir in zip(stats, (src, bf16)):
        assert stat["rc"] == 0
        limit = 2 * largest_shard(src_dir) + 64 * MB
        # the whole input (or output) would not fit under the limit: the test can tell streaming apart
        assert stat["peak"] - stat["base"] <= limit, (stat, limit)
    assert total_in > 2 * largest_shard(src) + 64 * MB
    # fp8 -> bf16: w = w_fp8 · scale_inv per 128×128 block, read across shards
    w_bf16 = read(bf16, "model.layers.3.mlp.experts.5.gate_proj.weight")
    assert torch.equal(w_bf16, dequant_blocks(ref["w"], ref["s"]).bfloat16())
    assert torch.equal(read(bf16, "model.layers.2.mlp.gate.e_score_correction_bias"), ref["bias"])
    assert "quantization_config" not in json.load(open(os.path.join(bf16, "config.json")))
    # bf16 -> fp8: E4M3 with float32 block scales by the report's rule
    w_fp8, s = quant_blocks(w_bf16.float())
    assert torch.equal(read(fp8, "model.layers.3.mlp.experts.5.gate_proj.weight").view(torch.uint8), w_fp8.view(torch.uint8))
    assert torch.equal(read(fp8, "model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv"), s)
    assert read(fp8, "model.layers.3.input_layernorm.weight").dtype == torch.bfloat16
    assert json.load(open(os.path.join(fp8, "config.json")))["quantization_config"]["weight_block_size"] == [128, 128]


def move_to_other_shard(path: str, name: str) -> None:
    from safetensors.torch import load_file
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    old = index["weight_map"][name]
    new = next(f for f in sorted(set(index["weight_map"].values())) if f != old)
    a, b = load_file(os.path.join(path, old)), load_file(os.path.join(path, new))
    b[name] = a.pop(name)
    save_file(a, os.path.join(path, old), metadata={"format": "pt"})
    save_file(b, os.path.join(path, new), metadata={"format": "pt"})
    index["weight_map"][name] = new
    json.dump(index, open(index_path, "w"))


def test_convert_real_model_fp8_to_bf16(tmp_path):
    from test_hf import our_model
    save_hf_checkpoint(our_model(mtp=1), str(tmp_path / "fp8"), fp8=True, max_shard_bytes=40_000)
    move_to_other_shard(str(tmp_path / "fp8"), "model.layers.1.self_attn.kv_b_proj.weight_scale_inv")
    from dsv3.checkpoint.hf import main
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--to-bf16"]) == 0
    # every stored tensor against the raw FP8 checkpoint, read by name (not through the loader): quantised
    # weights are E4M3 × their block scale (the scale may sit in another shard) rounded once to BF16,
    # everything else is copied unchanged, and no scale is left
    src, out = weight_map(str(tmp_path / "fp8")), weight_map(str(tmp_path / "bf16"))
    assert set(out) == {n for n in src if not n.endswith("_scale_inv")}
    n_fp8 = 0
    for name in out:
        raw, got = read(str(tmp_path / "fp8"), name), read(str(tmp_path / "bf16"), name)
        if raw.dtype == torch.float8_e4m3fn:
            raw, n_fp8 = dequant_blocks(raw, read(str(tmp_path / "fp8"), name + "_scale_inv")).bfloat16(), n_fp8 + 1
        assert got.dtype == raw.dtype and torch.equal(got, raw), name
    assert n_fp8 == sum(n.endswith("_scale_inv") for n in src) > 0
    assert load_hf_checkpoint(str(tmp_path / "bf16")).cfg.mtp.depth == 1
