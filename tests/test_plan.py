"""dsv3.tools.plan: the trainer's stage cut, per-rank state bytes against a meta-device model, activation bytes
against what autograd saves, a worked example by hand, published table lookups, and the CLI's labels/exits."""
import math
import os

import pytest
import torch

from dsv3.config import load_config
from dsv3.tools.hardware import GPUS, get_gpu, gpu_from_device_name
from dsv3.tools.plan import main, plan
from dsv3.tools.plan_factors import Ctx, gemm_tflops
from dsv3.tools.plan_memory import ActDtypes, block_params, layer_activation_bytes, rank_state_bytes
from parallel.stage_cut import stage_bounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG, V3, LITE = (os.path.join(ROOT, "configs", f) for f in ("debug.yaml", "dsv3_671b.yaml", "deepseek_v2_lite.yaml"))


def test_stage_cut_61_on_16():
    b = stage_bounds(61, 16)
    assert [b[s + 1] - b[s] for s in range(16)] == [4] * 13 + [3] * 3      # earlier stages take the remainder
    assert b[0] == 0 and b[-1] == 61 and b[1] > 3                           # the 3 dense layers on stage 0


@pytest.mark.parametrize("path", [DEBUG, V3])
def test_block_params_match_meta_model(path):
    from dsv3.model.transformer import Transformer
    m = load_config(path).model
    with torch.device("meta"):
        model = Transformer(m)
    for i in sorted({0, m.n_dense_layers - 1, m.n_dense_layers, m.n_layers - 1}):
        layer = model.layers[i]
        assert sum(n for _, n, _ in block_params(m, i)) == sum(p.numel() for p in layer.parameters())
        experts = sum(p.numel() for n, p in layer.named_parameters() if ".experts." in n)
        assert sum(n for _, n, x in block_params(m, i) if x) == experts


def test_rank_state_bytes_against_meta_model_1f1b():
    """PP2 1F1B, DP4, EP2 on debug: each rank's tensors listed from the meta model (rank 1 holds its own
    embedding copy for MTP), experts / EP, ZeRO shards ⌈n/W⌉ per tensor (dense W=4, expert W=2)."""
    from dsv3.model.transformer import Transformer
    cfg = load_config(DEBUG, ["parallel.pp_schedule=1f1b"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    named = dict(model.named_parameters())
    ranks = [[n for n in named if n.startswith(("embed.", "layers.0.", "layers.1."))],
             [n for n in named if n.startswith(("embed.", "layers.2.", "layers.3.", "norm.", "head.", "mtp."))]]
    got = rank_state_bytes(cfg, pp=2, dp=4, ep=2, schedule="1f1b")
    for r, names in enumerate(ranks):
        local = {n: named[n].numel() // (2 if ".experts." in n else 1) for n in names}
        shard = sum(math.ceil(v / (2 if ".experts." in n else 4)) for n, v in local.items())
        n_params = sum(local.values())
        assert got[r]["params"] == 2 * n_params and got[r]["grads"] == 4 * n_params
        assert got[r]["optimizer"] == (4 + 2 * 4) * shard                      # FP32 master + two FP32 moments


def test_dualpipe_rank0_holds_first_and_last_stage_once():
    cfg = load_config(V3)
    got = rank_state_bytes(cfg, pp=16, dp=128, ep=64, schedule="dualpipe")
    assert got[0]["stages"] == [0, 15] and got[7]["stages"] == [7, 8]
    d, V = 7168, 129280
    # rank 0 holds the embedding once although stages 0 and 15 both use it; the head once
    assert got[0]["n_dense"] - got[15]["n_dense"] == 0 and got[0]["n_dense"] > 2 * V * d


@pytest.mark.parametrize("overrides", [[], ["fp8.enabled=true", "train.dtype=bf16"]], ids=["fp32", "fp8"])
def test_activation_bytes_match_autograd_saved_tensors(overrides):
    """Per token per layer, recompute on, debug model on CPU (FP32; FP8 under BF16 autocast, the 671B
    precision): bytes of every distinct storage autograd saves (parameters and buffers excluded: the FP8
    GEMMs keep the parameters themselves and re-quantise them) against the formula, within 10% (issue 20)."""
    from dsv3.model.transformer import Transformer
    from dsv3.training.precision import apply_fp8
    torch.manual_seed(0)
    cfg = load_config(DEBUG, overrides)
    model = Transformer(cfg.model)
    model.set_recompute(True)
    if cfg.fp8.enabled:
        apply_fp8(model, cfg.fp8)
    B, T = 2, 32
    cos, sin = model.rope(0, T)
    # parameters and buffers (the RoPE table, whose slices RoPE and MLA's checkpoint keep) are model state
    params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *model.buffers())}
    dt = ActDtypes.for_training(cfg, device="cpu")
    for i in (0, 1):                                   # dense, MoE
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            return t
        x = torch.randn(B, T, cfg.model.dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.dtype == "bf16"):
            model.layers[i](x, cos, sin)
        measured = sum(seen.values()) / (B * T)
        assert measured == pytest.approx(layer_activation_bytes(cfg.model, i, dt), rel=0.10)


def test_deepgemm_lookup_returns_the_published_rows():
    ctx = Ctx(load_config(V3), get_gpu("h800"), 16, 128, 64, 1, 15360, 0.04)
    assert gemm_tflops(ctx, 4096, 7168, 16384, True) == 1358          # wo, DeepGEMM README
    assert gemm_tflops(ctx, 4096, 2112, 7168, True) == 1058           # wq_a + wkv_a
    assert gemm_tflops(ctx, 8192, 4096, 7168, True, groups=4) == 1297  # experts w1+w3 at EP64
    assert gemm_tflops(ctx, 4096, 7168, 16384, False) == pytest.approx(1358 / 2, rel=1e-3)   # BF16: peak ratio


def test_worked_example_debug_one_gpu():
    """Debug config on one H800, every factor by hand. M = 16 sequences × 128 = 2048 tokens, one micro-batch."""
    cfg = load_config(DEBUG, ["train.recompute=true"])
    p = plan(cfg, 1, "h800", 1, 1, 1)
    bf16 = 989.4e12
    M = 2048
    attn_layer = [(112, 128), (192, 64), (256, 32), (128, 128)]          # wq_a+wkv_a, wq_b, wkv_b, wo: (N, K)
    dense = attn_layer + [(768, 128), (128, 384)]
    moe = attn_layer + [(128, 128), (128, 64)]                              # shared expert w1+w3, w2
    routed = 2 * (16 * 512) * (128 * 128 + 128 * 64)                        # 16 experts × 512 rows: w1+w3, w2
    gate = 2 * M * 16 * 128
    heads = 2 * M * (2 * 2048 * 128 + 128 * 256)                            # head, MTP head, eh_proj
    gemm = sum(2 * M * n * k for n, k in dense) + 4 * (sum(2 * M * n * k for n, k in moe) + routed)  # 3 MoE + MTP
    attn = 2 * M * 64 * 4 * (48 + 32) * 5                                   # causal: 64 keys on average, 5 blocks
    ideal = 3 * (gemm + heads + attn) / bf16 + 3 * 4 * gate / (bf16 / 2)    # gate in FP32 (TF32)
    assert p.ideal["total"] == pytest.approx(ideal, rel=1e-9)
    delta = {k: d for k, _, _, d in p.factors}
    assert delta["attn"] == pytest.approx(3 * attn * (1 / 580e12 - 1 / bf16), rel=1e-9)
    # recompute re-runs wq_b (M 2048, N 192, K 64), wkv_b (N 256, K 32) → DeepGEMM row M=128, nearest
    # (N, K) = (7168, 2048) for both: 510 TFLOPS FP8, BF16 half; and the attention core's forward at 580
    up = 2 * M * (192 * 64 + 256 * 32) / (510e12 * 989.4 / 1978.9)
    assert delta["recompute"] == pytest.approx(5 * up + attn / 580e12, rel=1e-9)
    for k in ("sms", "imbalance", "a2a", "p2p"):                            # one GPU: none of these apply
        assert delta[k] == 0
    n = p.state["n_params"]                                                  # optimizer: FP32 moments, W = 1
    assert delta["zero"] == pytest.approx((n * (14 + 16) + 4 * n) / 3000e9, rel=1e-9)
    # memory-bound bytes per token (BF16 = 2 bytes; no FP8): per block RMSNorm 7·(128+128+32+64)·2, RoPE
    # 4·(4+1)·16·2, residual adds 12·128·2; dense SwiGLU 11·384·2; per MoE block (3 + MTP) SwiGLU
    # 11·(4·64+64)·2, router 12·16·4, permute 2·4·128·2 + 2·9·128·2; cross-entropy 2·2048·12;
    # plus the FP32 main-grad read + write, 8 bytes per parameter; all at FlashMLA's 3000 GB/s
    per_token = 5 * (4928 + 640 + 3072) + 8448 + 4 * (7040 + 768 + 6656) + 49152
    assert delta["membound"] == pytest.approx((per_token * M + 8 * n) / 3000e9, rel=1e-9)
    assert delta["gemm"] > 0


def test_hardware_table():
    assert get_gpu("h100") is GPUS["h100_sxm"] and GPUS["h800"].fp8_dense_tflops == pytest.approx(2 * GPUS["h800"].bf16_dense_tflops, rel=1e-4)
    assert gpu_from_device_name("NVIDIA H100 80GB HBM3").key == "h100_sxm"
    assert gpu_from_device_name("NVIDIA H100 PCIe").key == "h100_pcie"
    assert gpu_from_device_name("NVIDIA B200").key == "b200" and gpu_from_device_name("NVIDIA A100-SXM4-80GB") is None
    with pytest.raises(KeyError, match="h100_sxm"):
        get_gpu("a100")


def test_cli_labels_and_report_comparison(capsys):
    rc = main([V3, "--gpus", "2048", "--gpu", "h800"])
    out, err = capsys.readouterr()
    for label in ("ideal", "expected", "of BF16 dense peak", "of FP8 dense peak", "HFU", "tokens/s/GPU",
                  "model TFLOPS/GPU", "memory per GPU", "reserve", "by MaxVio"):
        assert label in out
    assert "180K GPU-hours per trillion" in out and "2.664M" in out
    # the report's layout fits 80 GB with the reserve (issue 20's Done-when): exit 0, nothing on stderr
    assert rc == 0 and err == "" and "fits in 79.6 GiB" in out


def test_not_fit_and_bad_input_exit_2(capsys):
    assert main([V3, "--gpus", "256", "--gpu", "h100", "--ep", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memory" in err and "--pp" in err and "--ep" in err and "--gpu" in err
    for argv in (["--gpus", "0"], ["--gpus", "8", "--gpu", "a100"], ["--gpus", "7", "--search"]):
        assert main([DEBUG] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1


def test_no_report_comparison_for_other_configs(capsys):
    main([LITE, "--gpus", "8", "--gpu", "h100", "--pp", "1", "--ep", "8", "--batch-sequences", "64"])
    out = capsys.readouterr().out
    assert "ideal" in out and "DeepSeek-V3 report (H800)" not in out and "180K" not in out and "2.664M" not in out


def test_search_lists_fitting_layouts_cheapest_first():
    from dsv3.tools.plan import search
    cfg = load_config(DEBUG)
    found = search(cfg, 8, "h800", 0.04, None, global_batch=64, micro_batch=2)
    hours = [p.rates(p.expected)["gpu_hours_per_t"] for p in found]
    assert hours == sorted(hours) and all(p.fits for p in found)
    # every (pp, ep) the trainer can run on 8 GPUs: pp ∈ {1, 2, 4} (4 layers), ep | dp and ep | 16 experts
    assert {p.layout for p in found} == {(1, 8, 1), (1, 8, 2), (1, 8, 4), (1, 8, 8), (2, 4, 1), (2, 4, 2),
                                         (2, 4, 4), (4, 2, 1), (4, 2, 2)}
