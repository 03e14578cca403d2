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
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype_of(p))
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype_of(p))
            if self._fusable(params):
                self._fused_step(group, params)
            else:
                for p in params:
                    self._step_one(group, p)
        return None

    def moment_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s moments: BF16 when asked for; otherwise FP32, or the parameters' dtype when wider (fp64 reference runs)."""
        if self.moment_dtype == torch.bfloat16:
            return torch.bfloat16
        return torch.promote_types(self.moment_dtype, p.dtype)

    def _fusable(self, params) -> bool:
        """torch's fused AdamW kernel (one pass over p, g, m, v; CPU and CUDA) applies when the moments
        share the parameters' dtype and everything sits on one device; BF16 moments under FP32 masters
        take the per-tensor path."""
        if not params or not hasattr(torch, "_fused_adamw_"):
            return False
        dev, dt = params[0].device, params[0].dtype
        return (dev.type in ("cpu", "cuda") and dt in (torch.float32, torch.float64) and self.moment_dtype == torch.float32
                and all(p.device == dev and p.dtype == dt and p.grad.dtype == dt and not p.grad.is_sparse for p in params))

    def _fused_step(self, group, params) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for s in states:   # the fused kernel reads the step count on the parameters' device
            s["step"] = s["step"].to(params[0].device)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        moments = [[s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]]
        torch._fused_adamw_(params, [p.grad for p in params], moments[0], moments[1], [], steps,
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=False)

    def _step_one(self, group, p) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        state["step"] += 1
        t = int(state["step"].item())
        g = p.grad.to(torch.promote_types(p.dtype, torch.float32))
        m = state["exp_avg"].to(g.dtype).lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"].to(g.dtype).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded moments to the parameter dtype; BF16 → FP32 → BF16 is exact
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype_of(state[key]))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """Weight decay on matrices only; norms (1-D) are not decayed, as Megatron-Core and torchtitan do."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 moment_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32)


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The one gradient-clipping rule of every layout (report: clip to 1.0): the factor the gradients are
    multiplied by, given the global norm (a Python float, from squares summed in fp64). A non-finite norm
    gives 1.0: that step is skipped by the divergence guard, nothing to scale."""
    if max_norm > 0 and math.isfinite(norm):
        return min(max_norm / (norm + 1e-6), 1.0)
    return 1.0


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 gradient norm, clipped to max_norm (report: 1.0). Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # squares summed in fp64 and the coefficient a Python float, as parallel/zero.py does on its shards:
    # with the norm in FP32 the coefficients of the two differ by ~1e-7, which later steps amplify
    norm = math.sqrt(float(sum(g.double().square().sum() for g in grads)))
    coef = clip_coefficient(norm, max_norm)
    if coef != 1.0:
        for g in grads:
            g.mul_(coef)
    return norm
