"""DeepSeekMoE (report §2.1.2): shared experts plus fine-grained routed experts, the V3 router with
auxiliary-loss-free balancing, and the complementary sequence-wise balance loss.

Router per token (the official ``Gate``; each variant is an entry of dsv3/model/router.py's tables):
1. s = sigmoid(h·e_i) (V3) or softmax (V2), in FP32 (``scoring_func``);
2. selection uses s + b (``noaux_tc``; b = ``e_score_correction_bias``, a buffer, not trained);
3. group score = sum of the top-2 biased scores (noaux_tc) or the group max (V2), keep the best
   ``topk_group`` of ``n_group`` groups, mask the others with −inf;
4. top-k of the rest (ties go to the lower expert index) — steps 2–4 are the ``topk_method``;
5. gate weights = unbiased s of the chosen experts, normalised when ``norm_topk_prob``, × scale.
No token is ever dropped.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.args import MoEConfig
from dsv3.model.experts import GroupedExperts, local_dispatch
from dsv3.model.layers import MLP
from dsv3.model.router import bias_update, gate_dtype, scoring, topk_method


XFrom = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]


class _GateLinear(torch.autograd.Function):
    """x · Wᵀ with both cast to ``dtype`` (≥ FP32: the gate stays in high precision, report §3.3),
    keeping x and W in their own dtypes for the backward: a BF16 tensor widens to FP32 exactly, so the
    gradients equal those of autograd through F.linear(x.float(), W.float()), which would keep the FP32
    copies (twice the bytes of a BF16 x per token). With ``x_from = (fn, src)``, fn(src) reproducing x
    bit for bit (the block's ffn_norm and its input, which its recompute keeps anyway), src is kept and x
    recomputed in the backward (report §3.2.3; issue 20, memory): the same gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, x_from: Optional[XFrom]) -> torch.Tensor:
        ctx.fn, ctx.x_shape = (None, None) if x_from is None else (x_from[0], x.shape)
        ctx.save_for_backward(x if x_from is None else x_from[1], w)
        ctx.dtype = dtype
        return F.linear(x.to(dtype), w.to(dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        if ctx.fn is not None:
            with torch.no_grad():
                x = ctx.fn(x).reshape(ctx.x_shape)
        dx = g.mm(w.to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = x.to(ctx.dtype).t().mm(g).t().to(w.dtype) if ctx.needs_input_grad[1] else None   # as mm's backward
        return dx, dw, None, None


def gate_linear(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, x_from: Optional[XFrom] = None) -> torch.Tensor:
    """(N, dim) × (E, dim) → (N, E) logits in ``dtype`` (see _GateLinear)."""
    return _GateLinear.apply(x, w, dtype, x_from)


class Gate(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        # the variant's functions, looked up once: an unknown name fails here, at construction
        self.score_fn = scoring(cfg.scoring_func)
        self.method = topk_method(cfg.topk_method)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim))
        # per-expert routing bias b (aux-loss-free balancing); FP32, updated by update_bias only
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        """Steps 2–4 of the module docstring (the ``topk_method``): the (N, k) chosen experts."""
        return self.method.select(scores, self.e_score_correction_bias, self.cfg)

    def forward(self, x: torch.Tensor, x_from: Optional[XFrom] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, dim) → gate weights (N, k) fp32, expert indices (N, k), unbiased scores s (N, E).
        ``x_from``: (fn, src) with fn(src) = x, to recompute x in the backward instead of keeping it."""
        c = self.cfg
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = gate_linear(x, self.weight, gate_dtype(x), x_from)
        scores = self.score_fn(logits)
        with torch.no_grad():   # the selection yields indices only: no gradient, nothing kept for a backward
            indices = self._select(scores)
        weights = scores.gather(1, indices)
        # the official V3 gate normalises even a single choice; V2 only when top_k > 1
        if c.norm_topk_prob and (self.method.normalise_single or c.n_activated_experts > 1):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, indices, scores


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, alpha: float,
                 per_sequence: bool = True) -> torch.Tensor:
    """Complementary balance loss (report eq. 17–20): L = α Σ_i f_i P_i,
    f_i = N_r/(K_r·T) Σ_t 1[i ∈ topK(t)], P_i = (1/T) Σ_t s'_{i,t}, s' = s normalised over experts.
    Per sequence (T = its tokens) and averaged over sequences, or over the whole batch.
    scores: (B·T, E); indices: (B·T, k) — the experts actually selected (after bias and group limit)."""
    n_tok, n_exp = scores.shape
    k = indices.shape[1]
    groups = batch if per_sequence else 1
    per = n_tok // groups
    s_norm = scores / scores.sum(dim=-1, keepdim=True)
    P = s_norm.view(groups, per, n_exp).mean(dim=1)
    hits = torch.zeros(groups, n_exp, dtype=scores.dtype, device=scores.device)
    hits.scatter_add_(1, indices.reshape(groups, per * k), torch.ones(groups, per * k, dtype=scores.dtype, device=scores.device))
    f = hits * n_exp / (k * per)
    return alpha * (f * P).sum(dim=-1).mean()


def max_violation(tokens_per_expert: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean_load − 1 (Wang et al. 2024, eq. 6)."""
    mean = tokens_per_expert.float().mean()
    return float(tokens_per_expert.float().max() / mean - 1) if mean > 0 else 0.0


class AuxLossScaler(torch.autograd.Function):
    """Returns x unchanged; in backward also feeds d(aux)/d(aux) = scale into the aux loss's graph,
    so the balance loss trains the router without being threaded through every layer's return value
    (this works unchanged inside pipeline stages)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


Dispatcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, GroupedExperts], torch.Tensor]


class LocalRows:
    """What a local dispatch 'receives': the tokens themselves with their routing (N, dim), (N, k), (N, k).
    Also its own wait handle (nothing is in flight), so local and expert-parallel dispatch look alike."""

    def __init__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        self.x, self.indices, self.weights = x, indices, weights

    def wait(self) -> "LocalRows":
        return self


class _Ready:
    """A combine that has already happened (local dispatch): ``wait`` returns the (N, dim) output."""

    def __init__(self, y: torch.Tensor):
        self.y = y

    def wait(self) -> torch.Tensor:
        return self.y


class MoE(nn.Module):
    """y = Σ_shared FFN(x) + Σ_{i ∈ topK} g_i FFN_i(x) (report eq. 12), as four steps a pipeline can
    interleave with another micro-batch's work (report §3.2.1, Figure 4):

        weights, indices, scores = moe.route(flat)            # the gate
        recv = moe.dispatch(flat, indices, weights).wait()   # tokens to the ranks holding their experts
        y = moe.combine(moe.run_experts(recv), recv).wait()  # experts there, outputs back and summed
        y = moe.merge(y, moe.shared_experts(flat), (B, T, dim))   # + shared experts
        y = moe.attach_balance(y, moe.balance(scores, indices, B))  # the balance loss's gradient rides on y

    ``forward`` is exactly that composition. The ``dispatcher`` hook decides what the steps do: None
    (one process) or a plain callable ``(x, indices, weights, experts) -> y`` is local — dispatch and
    combine move nothing and the experts step runs the whole local dispatch; an expert-parallel
    dispatcher (parallel/all_to_all.py) has ``dispatch`` / ``run_experts`` / ``combine`` of its own, the
    first and last asynchronous all-to-alls."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(dim, cfg)
        self.bias_rule = bias_update(cfg.bias_update)   # Δ of update_bias (dsv3/model/router.py)
        self.experts = GroupedExperts(cfg.n_routed_experts, dim, cfg.moe_inter_dim, cfg.grouped_mm_impl)
        self.shared_experts = MLP(dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # the `dispatcher` hook: None = local; parallel/ installs the expert-parallel all-to-all
        self.dispatcher: Optional[Dispatcher] = None
        self.aux_loss_scale = 1.0
        # loads accumulated over the micro-batches of a step (training only); read by the trainer
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.last_balance_loss: Optional[torch.Tensor] = None

    def route(self, flat: torch.Tensor, x_from: Optional[XFrom] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate on (N, dim) tokens (``x_from``: see Gate.forward); in training also adds the step's
        per-expert loads."""
        weights, indices, scores = self.gate(flat, x_from)
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(indices.flatten(), minlength=self.cfg.n_routed_experts)
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        return weights, indices, scores

    def _split_dispatcher(self) -> bool:
        return hasattr(self.dispatcher, "dispatch")

    def dispatch(self, flat: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """Starts sending (N, dim) tokens to their experts; ``.wait()`` gives the received rows."""
        if self._split_dispatcher():
            return self.dispatcher.dispatch(flat, indices, weights)
        return LocalRows(flat, indices, weights)

    def run_experts(self, recv) -> torch.Tensor:
        """The routed experts on the received rows, gate-weighted and summed per row."""
        if self._split_dispatcher():
            return self.dispatcher.run_experts(recv, self.experts)
        return (self.dispatcher or local_dispatch)(recv.x, recv.indices, recv.weights, self.experts)

    def combine(self, y_rows: torch.Tensor, recv):
        """Starts returning the experts' rows to their tokens; ``.wait()`` gives the routed output (N, dim)."""
        if self._split_dispatcher():
            return self.dispatcher.combine(y_rows, recv)
        return _Ready(y_rows)

    def balance(self, scores: torch.Tensor, indices: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
        """The complementary balance loss of this call (training only, else None); kept in
        ``last_balance_loss`` for the step log."""
        if not (self.cfg.aux_loss_alpha > 0 and self.training and scores.shape[0] > 0):
            return None
        aux = balance_loss(scores, indices, batch, self.cfg.aux_loss_alpha, self.cfg.aux_loss_type == "sequence")
        self.last_balance_loss = aux.detach()
        return aux

    def merge(self, routed: torch.Tensor, shared: Optional[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """routed + shared (N, dim) → ``shape`` (B, T, dim)."""
        y = routed if shared is None else routed + shared
        return y.view(shape)

    def attach_balance(self, y: torch.Tensor, aux: Optional[torch.Tensor]) -> torch.Tensor:
        """y unchanged; its backward also trains the gate on the balance loss ``aux`` (``AuxLossScaler``)."""
        if aux is not None and torch.is_grad_enabled():
            y = AuxLossScaler.apply(y, aux, self.aux_loss_scale)
        return y

    def forward(self, x: torch.Tensor, x_from: Optional[XFrom] = None) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, indices, scores = self.route(flat, x_from)
        recv = self.dispatch(flat, indices, weights.to(flat.dtype)).wait()
        routed = self.combine(self.run_experts(recv), recv).wait()
        shared = self.shared_experts(flat) if self.shared_experts is not None else None
        y = self.merge(routed, shared, (B, T, D))
        return self.attach_balance(y, self.balance(scores, indices, B))

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, gamma: Optional[float] = None) -> None:
        """Aux-loss-free balancing (report §2.1.2): b_i ← b_i + γ·Δ_i after the optimizer step, with loads
        summed over the whole global batch by the caller; Δ is the ``bias_update`` rule of
        dsv3/model/router.py (the report's sign(mean − load_i), ``proportional`` (mean − load_i)/mean, or
        none). Only a ``topk_method`` that ranks s + b has a bias to update."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        if not self.gate.method.biased or gamma == 0:
            return
        delta = self.bias_rule(tokens_per_expert.to(torch.float32))
        if delta is None:
            return
        bias = self.gate.e_score_correction_bias
        bias += (gamma * delta).to(bias.device)
