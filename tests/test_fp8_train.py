"""FP8 training through the model's hooks: a 50-step debug run with fp8.enabled stays within 1% of
the BF16 run's loss after step 10, and the call counters show which GEMMs ran quantised."""
import os

import pytest
import torch

import triton_kernels
from dsv3.config import load_config
from dsv3.model.layers import Linear
from dsv3.model.transformer import Transformer
from dsv3.training.precision import apply_fp8
from dsv3.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
RUN = ["train.steps=50", "train.micro_batch_size=4", "train.global_batch=4", "data.seq_len=32", "train.sample_tokens=2",
       "train.eval_batches=1", "train.ckpt_every=0", f"data.cache_dir={CACHE}"]


def test_every_non_exempt_gemm_runs_fp8_and_exempt_ones_do_not():
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    counts = apply_fp8(model, cfg.fp8)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    exempt = [m for m in linears if m.fp8_exempt]
    # exempt: the output head and the MTP eh_proj (the gate is not a Linear: it runs in FP32)
    assert {id(m) for m in exempt} == {id(model.head)} | {id(m.eh_proj) for m in model.mtp}
    assert counts == {"fp8_linear": len(linears) - len(exempt), "exempt_linear": len(exempt),
                      "fp8_grouped": cfg.model.n_layers - cfg.model.n_dense_layers + cfg.model.mtp.depth}
    calls = {id(m): 0 for m in exempt}
    for m in exempt:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    triton_kernels.reset_counters()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    c = triton_kernels.counters
    n_fp8 = counts["fp8_linear"]
    assert c["fp8_linear.fprop"] == c["fp8_linear.dgrad"] == c["fp8_linear.wgrad"] == n_fp8
    # per MoE layer two grouped GEMMs: gate and up as one over [w1; w3] (fp8_gate_up), then w2
    assert c["fp8_grouped_mm.fprop"] == c["fp8_grouped_mm.wgrad"] == 2 * counts["fp8_grouped"]
    # exempt modules ran, but not through the FP8 counters; the head runs inside the fused head +
    # cross-entropy of dsv3/model/loss.py (no module call), so its gradient shows it ran
    assert calls.pop(id(model.head)) == 0 and model.head.weight.grad.abs().sum() > 0
    assert all(n == 1 for n in calls.values())


def test_fp8_loss_tracks_bf16(tmp_path):
    # BF16 autocast run (every GEMM in BF16) vs the report's recipe: FP8 GEMMs (torch fake-quant reference
    # on CPU) with BF16 for the rest. Peak lr 1e-3: at the debug config's 3e-3 this 4×32-token run has a
    # gradient spike near step 13 after which even FP32 and BF16 drift apart by 1.3%; at 1e-3 they agree
    # within 0.1%, so the comparison measures FP8's error rather than that instability.
    run = [*RUN, "train.lr=1e-3", "train.dtype=bf16"]
    bf16 = train(load_config(os.path.join(ROOT, "configs", "debug.yaml"), [*run, f"train.out_dir={tmp_path}/bf16"]))
    fp8 = train(load_config(os.path.join(ROOT, "configs", "debug.yaml"),
                            [*run, "fp8.enabled=true", f"train.out_dir={tmp_path}/fp8"]))
    assert len(bf16["losses"]) == len(fp8["losses"]) == 50
    for step, (a, b) in enumerate(zip(bf16["losses"], fp8["losses"]), start=1):
        if step > 10:
            assert abs(b - a) / a < 0.01, f"step {step}: fp8 {b} vs bf16 {a}"
