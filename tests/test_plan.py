"""The planner's parameter and memory figures for dsv3_671b against hand calculations."""
import os

import pytest

from dsv3.config import load_config
from dsv3.plan import main, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hand_counts():
    d, L, V = 7168, 61, 129280
    attn = (d * 1536 + 1536 + 1536 * 128 * 192 + d * 576 + 512 + 512 * 128 * 256 + 128 * 128 * d)
    norms = 2 * d
    dense_ffn = 3 * d * 18432
    shared = 3 * d * 2048
    gate = 256 * d
    routed = 256 * 3 * d * 2048
    layer_dense = L * (attn + norms) + 3 * dense_ffn + 58 * (shared + gate)
    mtp_dense = 2 * d + 2 * d * d + attn + norms + shared + gate + d   # enorm, hnorm, eh_proj, block, norm
    return layer_dense, mtp_dense, routed, V * d


def test_dualpipe_671b_memory_by_hand():
    cfg = load_config(os.path.join(ROOT, "configs", "dsv3_671b.yaml"))
    p = plan(cfg, gpus=2048, gpu="h800", pp=16, ep=64, batch_sequences=15360)
    layer_dense, mtp_dense, routed, embed = hand_counts()
    # DualPipe: two stages of 61/16 layers each, plus embedding, head, MTP; experts / EP64
    dense = layer_dense / 16 * 2 + 2 * embed + mtp_dense
    expert = (58 * routed / 16 * 2 + routed) / 64
    assert p.params_per_gpu == pytest.approx(dense + expert, rel=1e-9)
    assert p.param_bytes == pytest.approx(2 * (dense + expert), rel=1e-9)       # BF16
    assert p.grad_bytes == pytest.approx(4 * (dense + expert), rel=1e-9)        # FP32
    # ZeRO-1: FP32 master + two BF16 moments = 8 bytes, dense over DP128, experts over expert-DP 2
    assert p.optimizer_bytes == pytest.approx(8 * dense / 128 + 8 * expert / 2, rel=1e-9)


def test_1f1b_has_one_copy_and_fp32_moments():
    cfg = load_config(os.path.join(ROOT, "configs", "dsv3_671b.yaml"),
                      ["parallel.pp_schedule=1f1b", "train.bf16_moments=false"])
    p = plan(cfg, gpus=2048, gpu="h800", pp=16, ep=64, batch_sequences=15360)
    layer_dense, mtp_dense, routed, embed = hand_counts()
    dense = layer_dense / 16 + 2 * embed + mtp_dense
    expert = (58 * routed / 16 + routed) / 64
    assert p.params_per_gpu == pytest.approx(dense + expert, rel=1e-9)
    assert p.optimizer_bytes == pytest.approx(12 * dense / 128 + 12 * expert / 2, rel=1e-9)


def test_cli_prints_report_comparison(capsys):
    assert main([os.path.join(ROOT, "configs", "dsv3_671b.yaml"), "--gpus", "2048", "--batch-sequences", "15360"]) == 0
    out = capsys.readouterr().out
    assert "report: 180K" in out and "report: 2.664M" in out
    assert main([os.path.join(ROOT, "configs", "dsv3_671b.yaml"), "--gpus", "2000"]) == 2
