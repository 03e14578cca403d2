"""Load-balance instruments: what the trainer logs every step per MoE layer, the per-domain expert
loads recorded at evaluation, and the run summaries and 2σ comparisons the ablation report uses.

Quantities (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE", §4.1; DeepSeek-V3
report §4.5.2–4.5.3, Figure 9):
- MaxVio = max_i load_i / mean_load − 1 (``dsv3.model.moe.max_violation``). *Batch* MaxVio uses one step's
  loads (summed over micro-batches and ranks); *accumulated* MaxVio the loads summed over all steps of
  this process (``maxvio_accum``); ``val_maxvio`` the loads over the validation batches at eval time
  (Wang et al.'s MaxVio_global, measured on held-out data with the biases fixed).
- groups reached per token: how many of the ``n_group`` expert groups hold a token's top-k experts
  (with one group per node, the nodes a token is sent to; node-limited routing keeps it ≤ topk_group).

Every statistic is detached and read through forward hooks on the routers, so the model is unchanged.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Optional

import torch

from dsv3.model.moe import max_violation

# metrics.jsonl fields written per step by BalanceMonitor.step_fields (README "Load balancing")
STEP_FIELDS = ("tokens_per_expert", "maxvio_accum", "maxvio_accum_mean", "maxvio_accum_max", "bias",
               "bias_drift", "bias_mean", "bias_spread", "balance_loss_layers", "groups_per_token",
               "groups_per_token_mean")


def groups_histogram(indices: torch.Tensor, n_group: int, n_experts: int) -> torch.Tensor:
    """indices: (N, k) expert ids → (n_group + 1,) int64: entry g counts the tokens whose k experts lie
    in exactly g distinct groups (entry 0 is always 0 for k ≥ 1)."""
    per_group = n_experts // n_group
    hit = torch.zeros(indices.shape[0], n_group, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, indices // per_group, True)
    return torch.bincount(hit.sum(dim=1), minlength=n_group + 1)   # on the router's device: no host sync


def mean_of_histogram(counts: Iterable[float]) -> float:
    counts = list(counts)
    total = sum(counts)
    return sum(g * c for g, c in enumerate(counts)) / total if total else 0.0


class BalanceMonitor:
    """Per-step load-balance fields for every MoE layer of ``model`` (main model first, then MTP).

    The trainer calls ``after_forward`` after each micro-batch, all-reduces ``histograms`` with the
    expert loads, and calls ``step_fields(loads)`` after the bias update. During evaluation, setting
    ``domains`` to the batch's per-sequence tags makes the routers' choices count per domain;
    ``take_domain_loads`` returns and clears them."""

    def __init__(self, model: torch.nn.Module):
        self.moes = list(model.moe_layers())
        # on the routers' device: a micro-batch adds to them without a host sync; read once per step
        self.histograms = [torch.zeros(m.cfg.n_group + 1, dtype=torch.int64, device=m.gate.weight.device)
                           for m in self.moes]
        self.balance_sums = [0.0 for _ in self.moes]
        self.accum_loads: Optional[list[torch.Tensor]] = None
        self.prev_bias = [self._bias(m) for m in self.moes]
        self.domains: Optional[list[str]] = None
        self.domain_loads: dict[str, list[torch.Tensor]] = {}
        self._hooks = [m.gate.register_forward_hook(self._hook(i)) for i, m in enumerate(self.moes)]

    @staticmethod
    def _bias(moe) -> torch.Tensor:
        return moe.gate.e_score_correction_bias.detach().float().cpu().clone()

    def _hook(self, layer: int):
        def on_gate(gate, inputs, output):
            indices = output[1].detach()
            cfg = gate.cfg
            if gate.training:
                self.histograms[layer] += groups_histogram(indices, max(cfg.n_group, 1), cfg.n_routed_experts)
            elif self.domains is not None:
                self._count_domains(layer, indices, cfg.n_routed_experts)
        return on_gate

    def _count_domains(self, layer: int, indices: torch.Tensor, n_experts: int) -> None:
        n_seq = len(self.domains)
        per_seq = indices.reshape(n_seq, -1).cpu()            # rows are (B·T) in sequence-major order
        for b, domain in enumerate(self.domains):
            loads = self.domain_loads.setdefault(domain, [torch.zeros(m.cfg.n_routed_experts, dtype=torch.int64)
                                                          for m in self.moes])
            loads[layer] += torch.bincount(per_seq[b], minlength=n_experts)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --------------------------------------------------------------------------------- training
    def after_forward(self, n_micro: int) -> None:
        """Add this micro-batch's per-layer balance loss (α Σ f_i P_i), averaged over micro-batches."""
        for i, m in enumerate(self.moes):
            if m.last_balance_loss is not None:   # a device tensor until the step's fields are read
                self.balance_sums[i] = self.balance_sums[i] + m.last_balance_loss.detach().double() / n_micro

    def step_fields(self, loads: list[torch.Tensor]) -> dict:
        """The step's fields (STEP_FIELDS); resets the per-step accumulators. ``loads`` are the
        step's tokens per expert per layer, already summed over micro-batches and ranks."""
        fields = self.fields(loads, [self._bias(m) for m in self.moes], self.histograms, self.balance_sums)
        for h in self.histograms:
            h.zero_()
        self.balance_sums = [0.0 for _ in self.moes]
        return fields

    def fields(self, loads: list[torch.Tensor], bias: list[torch.Tensor], histograms: list[torch.Tensor],
               balance_sums: list[float]) -> dict:
        """The fields from every layer's values (where a pipeline spreads the layers over ranks, the caller
        gathers them first: parallel/pipeline_eval.py); keeps the running MaxVio and the previous bias."""
        loads = [l.detach().float().cpu() for l in loads]
        if self.accum_loads is None:
            self.accum_loads = [torch.zeros_like(l) for l in loads]
        for acc, l in zip(self.accum_loads, loads):
            acc += l
        accum = [max_violation(a) for a in self.accum_loads]
        if len(self.prev_bias) != len(bias):
            self.prev_bias = [b.clone() for b in bias]
        drift = [float((b - p).norm()) for b, p in zip(bias, self.prev_bias)]
        self.prev_bias = bias
        hist = [[int(x) for x in h.tolist()] for h in histograms]
        total = [sum(h) for h in hist]
        fields = dict(
            tokens_per_expert=[[int(round(x)) for x in l.tolist()] for l in loads],
            maxvio_accum=accum, maxvio_accum_mean=sum(accum) / max(len(accum), 1),
            maxvio_accum_max=max(accum, default=0.0),
            bias=[[float(f"{x:.8g}") for x in b.tolist()] for b in bias], bias_drift=drift,
            bias_mean=[float(b.mean()) for b in bias],
            bias_spread=[float(b.std(unbiased=False)) for b in bias],
            balance_loss_layers=[float(b) for b in balance_sums],
            groups_per_token=hist,
            groups_per_token_mean=(sum(mean_of_histogram(h) * t for h, t in zip(hist, total)) / sum(total)
                                   if sum(total) else 0.0))
        return fields

    # --------------------------------------------------------------------------------- evaluation
    def take_domain_loads(self, domain_loads: Optional[dict] = None) -> dict:
        """{domain: [[tokens per expert] per layer]} recorded since the last call (or the given, gathered
        ones); also ``val_maxvio`` per layer over all domains together."""
        if domain_loads is not None:
            self.domain_loads = domain_loads
        loads = {d: [l.tolist() for l in per_layer] for d, per_layer in sorted(self.domain_loads.items())}
        total = None
        for per_layer in self.domain_loads.values():
            total = [l.clone() for l in per_layer] if total is None else [t + l for t, l in zip(total, per_layer)]
        self.domain_loads = {}
        self.domains = None
        out: dict = dict(domain_loads=loads)
        if total is not None:
            vio = [max_violation(t) for t in total]
            out.update(val_maxvio=vio, val_maxvio_mean=sum(vio) / len(vio))
        return out


# ------------------------------------------------------------------------------- run summaries
def read_metrics(path: str) -> tuple[dict[int, dict], list[dict]]:
    """(the last training record of every step, the eval records in order) of a metrics.jsonl; a
    resumed run re-logs the steps after its checkpoint, the later line wins."""
    steps: dict[int, dict] = {}
    evals: list[dict] = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps[r["step"]] = r
            elif "val_loss" in r:
                evals.append(r)
    return steps, evals


def last_fraction(n: int, fraction: float = 0.1) -> int:
    """How many final steps make up the last ``fraction`` of n (at least one)."""
    return max(1, math.ceil(n * fraction))


def summarize_run(path: str, fraction: float = 0.1) -> dict:
    """One run's table entries: final validation loss, MaxVio (mean over layers, and the worst layer)
    averaged over the last 10% of steps, median tokens/s over steps."""
    steps, evals = read_metrics(path)
    if not steps or not evals:
        raise ValueError(f"{path}: no finished run (needs step records and a final val_loss)")
    order = [steps[s] for s in sorted(steps)]
    tail = order[-last_fraction(len(order), fraction):]
    tps = sorted(r["tokens_per_s"] for r in order)
    median = tps[len(tps) // 2] if len(tps) % 2 else 0.5 * (tps[len(tps) // 2 - 1] + tps[len(tps) // 2])
    return dict(val_loss=evals[-1]["val_loss"], steps=len(order),
                maxvio_mean=sum(r["maxvio_mean"] for r in tail) / len(tail),
                maxvio_max=sum(r["maxvio_max"] for r in tail) / len(tail),
                tokens_per_s=median)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; nan for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def compare(a: list[float], b: list[float], k: float = 2.0, paired: bool = False) -> tuple[float, float, bool]:
    """Δ = mean(a) − mean(b) and whether |Δ| > k·σ_Δ. Unpaired: σ_Δ = √(s_a²/n_a + s_b²/n_b), the standard
    error of the difference of the seed means. Paired (a[i], b[i] share seed i, so the same
    initialisation and data order): σ_Δ = s_d/√n of the per-seed differences d_i = a_i − b_i, which
    removes the seed-to-seed spread both share. Fewer than 2 seeds: σ_Δ is nan, never resolved."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, float("nan"), False
    if paired:
        if len(a) != len(b):
            raise ValueError("a paired comparison needs one value per seed on both sides")
        md, sd = mean_std([x - y for x, y in zip(a, b)])
        sigma = sd / math.sqrt(len(a))
        return md, sigma, abs(md) > k * sigma
    sigma = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return ma - mb, sigma, abs(ma - mb) > k * sigma
