"""The run's device facts (dsv3/training/runtime.py): the dtype ``train.dtype: auto`` picks, the MFU denominator on
fixed fake CPU descriptions and patched CUDA devices, and the start-up choices — no timing involved."""
import json
import os
import sys
import types

import pytest
import torch

from dsv3.training import runtime
from dsv3.training.runtime import CpuInfo, choose_dtype, cpu_peak_flops, peak_flops, with_weights_dtype

EPYC_AVX2 = CpuInfo(threads=2, flags=frozenset({"avx2", "fma", "sse4_2"}), ghz=2.45, name="AMD EPYC (AVX2)")
XEON_AMX = CpuInfo(threads=2, flags=frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}), ghz=2.1)
SKYLAKE = CpuInfo(threads=4, flags=frozenset({"avx2", "fma", "avx512f"}), ghz=3.0)


def test_auto_dtype_follows_native_bf16():
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu, EPYC_AVX2)[0] == "fp32"
    assert choose_dtype("auto", cpu, XEON_AMX)[0] == "bf16"
    assert choose_dtype("auto", cpu, SKYLAKE)[0] == "fp32"     # AVX-512 without BF16 instructions
    dtype, why = choose_dtype("bf16", cpu, EPYC_AVX2)           # forced: runs, with the warning in the line
    assert dtype == "bf16" and "warning" in why and "emulated" in why
    assert choose_dtype("fp32", cpu, XEON_AMX)[0] == "fp32"
    assert choose_dtype("auto", torch.device("cuda", 0))[0] == "bf16"
    assert choose_dtype("fp32", torch.device("cuda", 0))[0] == "fp32"


def test_cpu_peak_is_threads_times_flop_per_cycle_times_clock():
    # hand-computed: 2 threads × (2 FMA pipes × 8 FP32 lanes × 2 FLOP) × 2.45 GHz
    assert cpu_peak_flops(EPYC_AVX2, "fp32")[0] == pytest.approx(2 * 32 * 2.45e9, rel=1e-12)
    assert cpu_peak_flops(EPYC_AVX2, "bf16")[0] == pytest.approx(2 * 32 * 2.45e9, rel=1e-12)  # emulated: FP32 pipes
    assert cpu_peak_flops(SKYLAKE, "fp32")[0] == pytest.approx(4 * 64 * 3.0e9, rel=1e-12)
    assert cpu_peak_flops(XEON_AMX, "bf16")[0] == pytest.approx(2 * 1024 * 2.1e9, rel=1e-12)
    assert "AVX2" in cpu_peak_flops(EPYC_AVX2, "fp32")[1]


def test_cpu_peak_over_world_and_override(monkeypatch):
    monkeypatch.setattr(runtime, "detect_cpu", lambda: EPYC_AVX2)
    peak, name = peak_flops(torch.device("cpu"), "fp32", world=4)
    assert peak == pytest.approx(4 * 2 * 32 * 2.45e9, rel=1e-12) and "AVX2" in name
    peak, name = peak_flops(torch.device("cpu"), "fp32", world=2, peak_tflops=1.5)
    assert peak == pytest.approx(3.0e12, rel=1e-12) and "train.peak_tflops" in name


@pytest.mark.parametrize("device_name,bf16_tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H800", 989.4),
                                                     ("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0)])
def test_gpu_peak_from_the_table(monkeypatch, device_name, bf16_tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: device_name)
    peak, name = peak_flops(torch.device("cuda", 0), "bf16", world=8)
    assert peak == pytest.approx(8 * bf16_tflops * 1e12, rel=1e-12)   # datasheet dense BF16, 1979/2 = 989.4
    assert "dense BF16" in name
    tf32, _ = peak_flops(torch.device("cuda", 0), "fp32", world=1)
    assert tf32 == pytest.approx(bf16_tflops * 1e12 / 2, rel=1e-12)


def test_unknown_gpu_has_no_mfu_unless_told(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 4090")
    peak, name = peak_flops(torch.device("cuda", 0), "bf16", world=1)
    assert peak is None and name.startswith("n/a (NVIDIA GeForce RTX 4090")
    peak, _ = peak_flops(torch.device("cuda", 0), "bf16", world=1, peak_tflops=165.0)
    assert peak == pytest.approx(165e12)


def test_this_cpu_is_described():
    cpu = runtime.detect_cpu()
    assert cpu.threads == torch.get_num_threads() and cpu.ghz > 0
    assert cpu.isa in runtime.FP32_PER_CYCLE


# ---------------------------------------------------------------------- start-up, W&B, profiler
class _FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.logged: dict[int, dict] = {}
        self.finished = False

    def init(self, **kw):
        self.init_kw = kw
        return self

    def log(self, data, step):
        self.logged.setdefault(step, {}).update(data)

    def finish(self):
        self.finished = True


def test_wandb_gets_tensorboards_scalars_and_profiler_writes_trace(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsv3.config import load_config
    from dsv3.train import train
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "run")
    train(load_config(os.path.join(root, "configs", "debug.yaml"), [
        f"data.cache_dir={os.path.join(root, '.cache', 'dsv3')}", "data.seq_len=16", "train.steps=3", "train.micro_batch_size=2", "train.global_batch=2", "train.eval_every=0",
                   "train.eval_batches=1", "train.sample_tokens=1", f"train.out_dir={out}", "train.wandb=proj",
                   "train.profile_steps=[2,3]", "train.loss_curve=false"]))
    assert fake.finished and fake.init_kw["project"] == "proj"
    ea = EventAccumulator(os.path.join(out, "tensorboard"))
    ea.Reload()
    tb = {}
    for tag in ea.Tags()["scalars"]:
        for ev in ea.Scalars(tag):
            tb.setdefault(ev.step, {})[tag] = ev.value
    assert sorted(tb) == sorted(fake.logged) == [1, 2, 3]
    for step in tb:
        assert set(tb[step]) == set(fake.logged[step]), step
        for k, v in tb[step].items():   # TensorBoard stores float32
            assert v == pytest.approx(fake.logged[step][k], rel=1e-6, abs=1e-30), (step, k)
    trace = json.load(open(os.path.join(out, "profile", "trace_rank0.json")))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names
    assert os.path.getsize(os.path.join(out, "profile", "top_ops_rank0.txt")) > 0
    head = capsys.readouterr().out
    for label in ("device ", "dtype    fp32: train.dtype=fp32", "fp8      off", "layout   world 1: PP 1 x DP 1",
                  "run      " + out + " (fresh start)", "MFU      of "):
        assert label in head, label


def test_auto_weights_dtype_is_bf16_only_on_cuda_under_bf16_autocast(monkeypatch):
    """``train.weights_dtype: auto`` (issue 17 C): BF16 compute weights where the planner assumes them (CUDA,
    BF16 autocast), FP32 on every CPU — even one with native BF16 — and under FP32 autocast; set values stay."""
    from dsv3.config import load_config
    monkeypatch.setattr(runtime, "detect_cpu", lambda: XEON_AMX)   # native BF16: auto autocast is BF16 here
    cfg = lambda *o: load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "small_moe.yaml"),
                                 list(o))
    got = lambda c, dev: with_weights_dtype(c, torch.device(dev)).train.weights_dtype
    assert cfg().train.weights_dtype == "auto"
    assert got(cfg("train.dtype=auto"), "cuda") == "bf16"
    assert got(cfg("train.dtype=bf16"), "cuda") == "bf16"
    assert got(cfg("train.dtype=fp32"), "cuda") == "fp32"
    assert got(cfg("train.dtype=auto"), "cpu") == "fp32"
    assert got(cfg("train.dtype=bf16"), "cpu") == "fp32"
    assert got(cfg("train.dtype=fp32", "train.weights_dtype=bf16"), "cpu") == "bf16"
    assert got(cfg("train.dtype=bf16", "train.weights_dtype=fp32"), "cuda") == "fp32"
