"""``python -m dsv3.hf convert``: FP8 -> BF16 -> FP8 on a 9-shard checkpoint whose scales sit in other
shards, with the converting process's peak memory measured; and a real model through the converter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.hf import load_hf_checkpoint, save_hf_checkpoint
from triton_kernels.quant_ref import weight_dequant_ref, weight_quant_ref

N_SHARDS, PER_SHARD, ROWS, COLS = 9, 8, 1000, 1500  # 8 × 1.5 MB of E4M3 per shard, ragged 128-blocks
MB = 1 << 20

MEASURE = r"""
import json, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from dsv3.hf import main
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
    """Shard k holds its weights, a norm and a routing bias; their scales sit in shard k+1."""
    gen = torch.Generator().manual_seed(0)
    os.makedirs(path)
    shards = [{} for _ in range(N_SHARDS)]
    weight_map = {}
    for k in range(N_SHARDS):
        for j in range(PER_SHARD):
            name = f"model.layers.{k}.mlp.experts.{j}.gate_proj.weight"
            shards[k][name] = random_fp8((ROWS, COLS), gen)
            shards[(k + 1) % N_SHARDS][name + "_scale_inv"] = torch.rand(8, 12, generator=gen) * 1e-2 + 1e-4
        shards[k][f"model.layers.{k}.input_layernorm.weight"] = torch.randn(COLS, generator=gen).bfloat16()
        shards[k][f"model.layers.{k}.mlp.gate.e_score_correction_bias"] = torch.randn(64, generator=gen)
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{N_SHARDS:05d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return {"w": shards[3]["model.layers.3.mlp.experts.5.gate_proj.weight"],
            "s": shards[4]["model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv"],
            "bias": shards[2]["model.layers.2.mlp.gate.e_score_correction_bias"]}


def read(path: str, name: str) -> torch.Tensor:
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    with safe_open(os.path.join(path, index[name]), "pt") as f:
        return f.get_tensor(name)


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
    assert torch.equal(w_bf16, weight_dequant_ref(ref["w"], ref["s"], 128, torch.bfloat16))
    assert torch.equal(read(bf16, "model.layers.2.mlp.gate.e_score_correction_bias"), ref["bias"])
    assert "quantization_config" not in json.load(open(os.path.join(bf16, "config.json")))
    # bf16 -> fp8: the torch reference on the same tensor, E4M3 with float32 block scales
    w_fp8, s = weight_quant_ref(w_bf16.float(), 128)
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
    from dsv3.hf import main
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--to-bf16"]) == 0
    direct = load_hf_checkpoint(str(tmp_path / "fp8")).state_dict()
    converted = load_hf_checkpoint(str(tmp_path / "bf16")).state_dict()
    for k, v in direct.items():
        expect = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16).float()
        assert torch.equal(converted[k], expect), k
