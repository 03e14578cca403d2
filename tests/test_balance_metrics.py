"""Load-balance instruments: groups-reached histogram vs a per-token loop, per-domain expert loads vs
routing each sequence alone, per-step fields vs hand computation, run summaries and the 2σ rule on
hand-made numbers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_cfg
from dsv3.training.balance_metrics import BalanceMonitor, compare, groups_histogram, mean_std, summarize_run
from dsv3.config import MoEConfig
from dsv3.model.transformer import Transformer
from dsv3.model.moe import Gate


def loop_histogram(indices: torch.Tensor, n_group: int, n_experts: int) -> list[int]:
    hist = [0] * (n_group + 1)
    for row in indices.tolist():
        hist[len({e // (n_experts // n_group) for e in row})] += 1
    return hist


@pytest.mark.parametrize("topk_group", [2, 4])
def test_groups_histogram_matches_loop_and_respects_group_limit(topk_group):
    cfg = MoEConfig(n_routed_experts=32, n_activated_experts=6, n_group=4, topk_group=topk_group)
    gate = Gate(24, cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    _, idx, _ = gate(torch.randn(500, 24))
    hist = groups_histogram(idx, 4, 32)
    assert hist.tolist() == loop_histogram(idx, 4, 32)
    assert hist.sum() == 500
    if topk_group == 2:     # node-limited routing: no token reaches more than 2 groups, 6 > 4 experts per group
        assert hist[3:].sum() == 0 and hist[1] == 0 and hist[2] == 500
    else:                   # unlimited: 6 experts of 32 in random places reach 3 or 4 groups for most tokens
        assert hist[3] + hist[4] > 400


def test_domain_loads_equal_routing_each_sequence_alone():
    cfg = tiny_cfg()
    model = Transformer(cfg.model).eval()
    for moe in model.moe_layers():
        torch.nn.init.normal_(moe.gate.weight, std=0.3)
    monitor = BalanceMonitor(model)
    x = torch.randint(0, cfg.model.vocab_size, (3, 16))
    domains = ["email", "xml", "email"]
    (moe,) = list(model.moe_layers())
    captured = []
    h = moe.gate.register_forward_hook(lambda m, i, o: captured.append(o[1].clone()))
    with torch.no_grad():
        monitor.domains = domains
        model(x)
    h.remove()
    got = monitor.take_domain_loads()
    per_seq = captured[0].view(3, 16 * cfg.model.moe.n_activated_experts)
    want_email = torch.bincount(per_seq[[0, 2]].flatten(), minlength=8)
    want_xml = torch.bincount(per_seq[1], minlength=8)
    assert got["domain_loads"]["email"] == [want_email.tolist()]
    assert got["domain_loads"]["xml"] == [want_xml.tolist()]
    total = (want_email + want_xml).float()
    assert got["val_maxvio"] == [pytest.approx(float(total.max() / total.mean() - 1))]
    # nothing is counted without tags, and eval forwards leave the training histogram alone
    with torch.no_grad():
        model(x)
    assert monitor.take_domain_loads() == {"domain_loads": {}}
    assert monitor.histograms[0].sum() == 0


def test_step_fields_by_hand():
    cfg = tiny_cfg("model.moe.aux_loss_alpha=0.01", "model.moe.bias_update_speed=0.5")
    model = Transformer(cfg.model).train()
    monitor = BalanceMonitor(model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    fields, bal = [], 0.0
    for step in range(2):
        for _ in range(2):                                   # two micro-batches
            out = model(x, labels=x)
            monitor.after_forward(2)
        bal = float(out.balance_loss) if step == 0 else bal
        loads = model.expert_loads()
        if step == 1:
            loads = [torch.tensor([10., 0, 0, 0, 0, 0, 0, 6])]   # a load the sign rule moves by ±γ
        model.update_bias(loads)
        fields.append(monitor.step_fields(loads))
    f0, f1 = fields
    assert sum(f0["tokens_per_expert"][0]) == 2 * 2 * 16 * 2             # micro × B × T × k
    assert f0["balance_loss_layers"][0] == pytest.approx(bal, rel=1e-6)
    assert sum(f0["groups_per_token"][0]) == 2 * 2 * 16
    assert f0["groups_per_token"][0][3:] == [0, 0]                      # topk_group = 2
    acc = torch.tensor(f0["tokens_per_expert"][0], dtype=torch.float) + torch.tensor([10., 0, 0, 0, 0, 0, 0, 6])
    assert f1["maxvio_accum"][0] == pytest.approx(float(acc.max() / acc.mean() - 1))
    delta = torch.tensor(f1["bias"][0]) - torch.tensor(f0["bias"][0])
    assert delta.tolist() == pytest.approx([-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5])   # mean load 2
    assert f1["bias_drift"][0] == pytest.approx(0.5 * math.sqrt(8))
    assert f1["bias_spread"][0] == pytest.approx(float(torch.tensor(f1["bias"][0]).std(unbiased=False)))


def test_summary_and_two_sigma_rule(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for s in range(1, 21):
            f.write(json.dumps(dict(step=s, loss=1.0, maxvio_mean=s / 10, maxvio_max=s / 5, tokens_per_s=100 + s)) + "\n")
        f.write(json.dumps(dict(step=20, loss=1.0, maxvio_mean=9.0, maxvio_max=9.0, tokens_per_s=0)) + "\n")  # resumed
        f.write(json.dumps(dict(step=20, val_loss=3.25)) + "\n")
    s = summarize_run(str(path))
    # last 10% of 20 steps = steps 19 and 20 (the re-logged line of step 20 wins)
    assert s["maxvio_mean"] == pytest.approx((1.9 + 9.0) / 2)
    assert s["maxvio_max"] == pytest.approx((3.8 + 9.0) / 2)
    assert s["val_loss"] == 3.25 and s["steps"] == 20
    assert s["tokens_per_s"] == pytest.approx(109.5)          # median of 0, 101..119
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    delta, sigma, resolved = compare([1.0, 1.2, 1.1], [2.0, 2.1, 1.9])
    assert delta == pytest.approx(-0.9) and sigma == pytest.approx(math.sqrt(0.02 / 3)) and resolved
    delta, sigma, resolved = compare([2.253, 2.251, 2.255], [2.258, 2.250, 2.266])
    assert delta == pytest.approx(-0.005) and not resolved     # Table 5's 0.005 gap, with this spread
    assert not compare([1.0], [5.0])[2] and math.isnan(compare([1.0], [5.0])[1])


def test_paired_comparison_removes_the_shared_seed_spread():
    a, b = [5.60, 5.40, 6.00], [5.65, 5.46, 6.04]   # seed spread 0.3, per-seed differences −0.05 ± 0.01
    assert not compare(a, b)[2]
    delta, sigma, resolved = compare(a, b, paired=True)
    assert delta == pytest.approx(-0.05) and sigma == pytest.approx(0.01 / math.sqrt(3)) and resolved
