"""The router's variants as tables of functions (report §2.1.2; DeepSeek-V2 §2.1.2 for the softmax,
group-limited and greedy rules), so a new variant is one ``register_*`` call and no edit elsewhere.

Three tables, each keyed by the ``MoEConfig`` field that names an entry:

- ``scoring_func`` → a scoring function: logits (N, E) → affinities s (N, E), the unbiased scores the gate
  weights and the balance loss use (step 1 of dsv3/model/moe.py's docstring);
- ``topk_method`` → a ``TopkMethod``: its ``select(s, b, cfg)`` → (N, k) expert indices (steps 2–4) and the
  properties the rest of the code reads (whether it ranks s + b, whether it normalises a single choice, how
  many experts a group's score reads);
- ``bias_update`` → a rule: per-expert loads (E,) fp32 → Δ (E,) for b ← b + γ·Δ after each optimizer step,
  or None for no update.

``dsv3.model.moe.Gate`` and ``MoE.update_bias`` look their entries up here; ``dsv3.config`` validates the
names against ``names(field)``; ``dsv3.checkpoint.hf_config`` refuses to export the ones the Hugging Face
format cannot express. Every selection breaks ties towards the lower expert index (``stable_topk``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dsv3.model.args import MoEConfig

Scoring = Callable[[torch.Tensor], torch.Tensor]
Selector = Callable[[torch.Tensor, torch.Tensor, MoEConfig], torch.Tensor]
BiasUpdate = Callable[[torch.Tensor], Optional[torch.Tensor]]
GroupScore = Callable[[torch.Tensor], torch.Tensor]


def gate_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the gate's logits and scores are computed in: FP32 whatever the activations' dtype
    (report §3.3: the gating module stays in high precision), FP64 only for FP64 activations. The
    exception exists for the parity tests, which run the whole model in FP64 to compare it with plain
    references to ~1e-13; an FP32 gate inside would cap them at FP32 rounding (~1e-7)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; equal values go to the lower index. Their own
    storage: a kept index does not hold the whole sort's (…, n) indices alive."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


def group_limited(choice: torch.Tensor, cfg: MoEConfig, group_score: GroupScore) -> torch.Tensor:
    """Step 3 (node-limited routing, report §2.1.2): choice (N, E) viewed as (N, n_group, E / n_group)
    groups, each scored by ``group_score`` → (N, n_group); the best ``topk_group`` groups are kept and
    every expert of the others is masked with −inf. Returns (N, E)."""
    grouped = choice.view(choice.shape[0], cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # N may be 0
    group_scores = group_score(grouped)
    keep = stable_topk(group_scores, cfg.topk_group)
    dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
    return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)


def top2_sum(grouped: torch.Tensor) -> torch.Tensor:
    """V3's group score: the sum of a group's two highest biased scores (N, G, E/G) → (N, G)."""
    return grouped.topk(2, dim=-1).values.sum(dim=-1)


def group_max(grouped: torch.Tensor) -> torch.Tensor:
    """V2's group score: a group's highest score (N, G, E/G) → (N, G)."""
    return grouped.amax(dim=-1)


# ------------------------------------------------------------------------------- the built-in rules
def select_noaux_tc(scores: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """V3: rank s + b (b = ``e_score_correction_bias``, aux-loss-free balancing), groups by top-2 sum."""
    choice = scores + bias.to(scores.dtype)
    if cfg.n_group > 1:
        choice = group_limited(choice, cfg, top2_sum)
    return stable_topk(choice, cfg.n_activated_experts)


def select_group_limited_greedy(scores: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """V2: rank s itself (no bias), groups by their best expert."""
    choice = group_limited(scores, cfg, group_max) if cfg.n_group > 1 else scores
    return stable_topk(choice, cfg.n_activated_experts)


def select_greedy(scores: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """V2-Lite: the top-k of s over all experts (no bias, no group limit whatever ``n_group`` says)."""
    return stable_topk(scores, cfg.n_activated_experts)


def softmax_over_experts(logits: torch.Tensor) -> torch.Tensor:
    """V2's affinities: softmax over the E experts of each token."""
    return logits.softmax(dim=-1)


def bias_delta_sign(load: torch.Tensor) -> torch.Tensor:
    """The report's rule (§2.1.2): Δ_i = sign(mean − load_i)."""
    mean = load.mean()
    return torch.sign(mean - load)


def bias_delta_proportional(load: torch.Tensor) -> torch.Tensor:
    """An ablation: Δ_i = (mean − load_i) / mean, so a step moves b in proportion to the imbalance."""
    mean = load.mean()
    return (mean - load) / mean.clamp_min(1e-9)


def bias_delta_none(load: torch.Tensor) -> None:
    """No update: b stays where it was initialised or loaded."""
    return None


@dataclass(frozen=True)
class TopkMethod:
    """An expert-selection rule and what the rest of the code reads about it.

    select: (s (N, E) in the gate's dtype, b (E,) fp32, cfg) → (N, k) indices; runs under no_grad.
    biased: the rule ranks s + b, so b takes the aux-loss-free updates (``MoE.update_bias``).
    normalise_single: ``norm_topk_prob`` normalises even a single choice (the official V3 gate does);
        otherwise only when k > 1 (V2).
    group_score_experts: a group's score reads its top this-many experts, so with n_group > 1 every group
        needs at least that many (checked by dsv3.config's validate)."""
    select: Selector
    biased: bool = False
    normalise_single: bool = False
    group_score_experts: int = 1


# ------------------------------------------------------------------------------------- the tables
SCORING: dict[str, Scoring] = {}
TOPK_METHODS: dict[str, TopkMethod] = {}
BIAS_UPDATES: dict[str, BiasUpdate] = {}
_TABLES = {"scoring_func": (SCORING, "register_scoring"), "topk_method": (TOPK_METHODS, "register_topk_method"),
           "bias_update": (BIAS_UPDATES, "register_bias_update")}
FIELDS = tuple(_TABLES)   # the MoEConfig fields that name a table entry


class UnknownVariant(ValueError):
    """A router variant name no table holds; the message names the field, the name and the known ones."""


def _register(field: str, name: str, entry) -> str:
    table, _ = _TABLES[field]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field}: a router variant needs a non-empty name, got {name!r}")
    if name in table:
        raise ValueError(f"{field}: {name!r} is already registered; unregister it first")
    table[name] = entry
    return name


def register_scoring(name: str, fn: Scoring) -> str:
    """Adds ``scoring_func`` ``name``: fn(logits (N, E)) → scores (N, E), same dtype, differentiable
    (the gate weights are the scores of the chosen experts)."""
    if not callable(fn):
        raise ValueError(f"scoring_func {name!r}: expected a function, got {fn!r}")
    return _register("scoring_func", name, fn)


def register_topk_method(name: str, select: Selector, *, biased: bool = False, normalise_single: bool = False,
                         group_score_experts: int = 1) -> str:
    """Adds ``topk_method`` ``name`` (see ``TopkMethod`` for the arguments)."""
    if not callable(select):
        raise ValueError(f"topk_method {name!r}: expected a function, got {select!r}")
    if group_score_experts < 1:
        raise ValueError(f"topk_method {name!r}: group_score_experts must be >= 1, got {group_score_experts}")
    return _register("topk_method", name, TopkMethod(select, biased, normalise_single, group_score_experts))


def register_bias_update(name: str, fn: BiasUpdate) -> str:
    """Adds ``bias_update`` ``name``: fn(loads (E,) fp32) → Δ (E,) (b ← b + γ·Δ), or None for no update."""
    if not callable(fn):
        raise ValueError(f"bias_update {name!r}: expected a function, got {fn!r}")
    return _register("bias_update", name, fn)


def unregister(field: str, name: str) -> None:
    """Removes a registered variant (a test's teardown); an unknown one raises ``UnknownVariant``."""
    lookup(field, name)
    del _TABLES[field][0][name]


def names(field: str) -> tuple[str, ...]:
    """The registered names of ``field`` ("scoring_func", "topk_method" or "bias_update"), in
    registration order (the built-in ones first)."""
    return tuple(_TABLES[field][0])


def lookup(field: str, name: str):
    """The entry registered as ``name`` for ``field``; ``UnknownVariant`` naming the known ones if none."""
    table, register = _TABLES[field]
    if name not in table:
        raise UnknownVariant(f"{field}: unknown router variant {name!r} (known: {', '.join(map(repr, table))}; "
                             f"add one with dsv3.model.router.{register})")
    return table[name]


def scoring(name: str) -> Scoring:
    return lookup("scoring_func", name)


def topk_method(name: str) -> TopkMethod:
    return lookup("topk_method", name)


def bias_update(name: str) -> BiasUpdate:
    return lookup("bias_update", name)


register_scoring("sigmoid", torch.sigmoid)   # V3
register_scoring("softmax", softmax_over_experts)   # V2
register_topk_method("noaux_tc", select_noaux_tc, biased=True, normalise_single=True, group_score_experts=2)
register_topk_method("group_limited_greedy", select_group_limited_greedy)
register_topk_method("greedy", select_greedy)
register_bias_update("sign", bias_delta_sign)
register_bias_update("proportional", bias_delta_proportional)
register_bias_update("none", bias_delta_none)
