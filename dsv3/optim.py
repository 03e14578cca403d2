"""AdamW (β1 0.9, β2 0.95, weight decay 0.1; report §4.2) on FP32 master weights, with the moments
optionally kept in BF16 (report §3.3: "we adopt the BF16 data format instead of FP32 to track the
first and second moments in the AdamW optimizer")."""
from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import TrainConfig


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t = int(state["step"].item())
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
        return None

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded moments to the parameter dtype; BF16 → FP32 → BF16 is exact
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """Weight decay on matrices only; norms (1-D) are not decayed, as Megatron-Core and torchtitan do."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 moment_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32)


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 gradient norm, clipped to max_norm (report: 1.0). Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if max_norm > 0 and math.isfinite(norm.item()):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return float(norm)
