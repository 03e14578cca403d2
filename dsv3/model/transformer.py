"""The DeepSeek-V3 Transformer (report §2): embedding, ``n_dense_layers`` dense blocks then MoE
blocks, final RMSNorm, output head, and D Multi-Token-Prediction modules sharing the embedding and head.

    from dsv3.model.transformer import Transformer
    model = Transformer(cfg.model)
    logits = model(input_ids)                      # (B, T, vocab)
    out = model(input_ids, labels=labels)          # .loss .lm_loss .mtp_loss .balance_loss (.logits)

Model code is free of ranks and devices: parallel/ wraps a built model (ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from dsv3.model.block import Block
from dsv3.model.args import ModelConfig
from dsv3.model.experts import GroupedExperts
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.loss import OutputHead
from dsv3.model.mla import MLA, MLACache
from dsv3.model.moe import MoE, Gate
from dsv3.model.mtp import MTPModule, shifted
from dsv3.model.param_init import init_parameter_, tag_parameter
from dsv3.model.rope import rope_cos_sin


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # None when the loss took the fused head + cross-entropy (training)
    loss: torch.Tensor          # lm_loss + λ·mtp_loss (+ the balance loss's value; its gradient flows via the MoE layers)
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor      # mean over depths of L_k (before λ)
    balance_loss: torch.Tensor  # sum over MoE layers of α Σ f_i P_i


@torch.no_grad()
def fill_rope_(module: nn.Module) -> None:
    """(Re)computes ``module.rope_cos`` / ``rope_sin`` from ``module.cfg`` on their device."""
    cos, sin = rope_cos_sin(module.cfg.mla, module.cfg.max_seq_len, device=module.rope_cos.device)
    module.rope_cos.copy_(cos)
    module.rope_sin.copy_(sin)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: Optional[int] = None):
        """``seed``: the per-parameter init seed (default: the global generator's, ``torch.manual_seed``).
        Built under ``torch.device("meta")`` nothing is allocated; ``dsv3.model.param_init.materialize_`` then
        gives any part of it the values the whole model gets."""
        super().__init__()
        self.cfg = cfg
        self.init_seed = torch.initial_seed() if seed is None else seed
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm.autocast_output = True            # feeds the head only
        self.head = OutputHead(cfg.dim, cfg.vocab_size)
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.mtp.depth))
        cos, sin = rope_cos_sin(cfg.mla, cfg.max_seq_len, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.mtp_weight = cfg.mtp.lambda_start  # λ; the trainer switches it to λ2 by token count
        self._tag_parameters()
        self.reset_parameters()

    # ------------------------------------------------------------------------------ set-up
    def _tag_parameters(self) -> None:
        """Every weight ~ N(0, 0.006) (report §4.2), norms 1; routed experts seeded one by one."""
        std = self.cfg.init_std
        for mod_name, m in self.named_modules():
            for pn, p in m.named_parameters(recurse=False):
                name = f"{mod_name}.{pn}" if mod_name else pn
                if isinstance(m, GroupedExperts):
                    tag_parameter(p, name, "normal", std, experts=range(p.shape[0]))
                elif isinstance(m, RMSNorm):
                    tag_parameter(p, name, "ones")
                elif isinstance(m, (nn.Linear, nn.Embedding, Gate)):
                    tag_parameter(p, name, "normal", std)
                else:
                    raise TypeError(f"{name}: no initialisation rule for a {type(m).__name__} parameter")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from its tag and the init seed (``dsv3.model.param_init``), routing bias 0."""
        for p in self.parameters():
            if not p.is_meta:
                init_parameter_(p, self.init_seed)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

    @torch.no_grad()
    def init_buffers_(self) -> None:
        """The RoPE tables, after ``materialize_`` allocated them."""
        fill_rope_(self)

    def moe_layers(self) -> Iterator[MoE]:
        """Every MoE layer, main model first, then the MTP modules' (a fixed order)."""
        return (m for m in self.modules() if isinstance(m, MoE))

    def set_recompute(self, enabled: bool) -> None:
        """Report §3.2.3: recompute RMSNorm, MLA up-projections and SwiGLU in backward."""
        for m in self.modules():
            if isinstance(m, Block):
                m.recompute_norms = enabled
            if isinstance(m, (MLA, MLP, GroupedExperts)):
                m.recompute = enabled

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient scale of the balance loss (1/micro-batches when the LM loss is divided by their number)."""
        for moe in self.moe_layers():
            moe.aux_loss_scale = scale

    # ---------------------------------------------------------------- aux-loss-free balancing
    def expert_loads(self) -> list[torch.Tensor]:
        return [moe.tokens_per_expert.clone() for moe in self.moe_layers()]

    def reset_expert_loads(self) -> None:
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()

    def update_bias(self, loads: Optional[list[torch.Tensor]] = None, gamma: Optional[float] = None) -> None:
        """b ← b + γ·sign(mean − load) per layer; loads default to this model's own accumulated counts
        (distributed runs pass counts summed over ranks). Resets the accumulated counts."""
        loads = self.expert_loads() if loads is None else loads
        for moe, load in zip(self.moe_layers(), loads):
            moe.update_bias(load, gamma)
        self.reset_expert_loads()

    # ------------------------------------------------------------------------------ forward
    def rope(self, start_pos: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start_pos + seqlen > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + seqlen} positions exceeds model.max_seq_len={self.cfg.max_seq_len}")
        return self.rope_cos[start_pos:start_pos + seqlen], self.rope_sin[start_pos:start_pos + seqlen]

    def hidden(self, input_ids: torch.Tensor, caches: Optional[list[MLACache]] = None,
               start_pos: int = 0) -> torch.Tensor:
        """Final hidden states before the output norm: h^0 (B, T, dim)."""
        cos, sin = self.rope(start_pos, input_ids.shape[1])
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, caches[i] if caches is not None else None, start_pos)
        return h

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                caches: Optional[list[MLACache]] = None, start_pos: int = 0):
        for moe in self.moe_layers():
            moe.last_balance_loss = None
        h = self.hidden(input_ids, caches, start_pos)
        if labels is None:
            return self.head(self.norm(h))
        lm_loss, logits = self.lm_loss(h, labels), None
        mtp_loss = self.mtp_loss(h, input_ids, labels)
        balance = [m.last_balance_loss for m in self.moe_layers() if m.last_balance_loss is not None]
        balance_loss = torch.stack(balance).sum() if balance else lm_loss.new_zeros(())
        loss = lm_loss + self.mtp_weight * mtp_loss + balance_loss
        return ModelOutput(logits, loss, lm_loss.detach(), mtp_loss.detach(), balance_loss)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next-token targets (−100 ignored) from the final hidden states;
        through the head's ``loss_impl`` hook (fused and chunked when training: no logits are kept)."""
        return self.head.cross_entropy(self.norm(h), labels) / (labels != -100).sum()

    def mtp_loss(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over depths k = 1…D of L_k (report eq. 24–25); 0 when D = 0."""
        if len(self.mtp) == 0:
            return h.new_zeros((), dtype=torch.float32)
        cos, sin = self.rope(0, input_ids.shape[1])
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            h = module(h, self.embed(shifted(input_ids, k, 0)), cos, sin)
            losses.append(self.head.cross_entropy(module.norm(h), shifted(labels, k, -100)) / labels.numel())
        return torch.stack(losses).mean()

    def new_caches(self, batch: int, max_len: int) -> list[MLACache]:
        w = self.embed.weight
        return [MLACache(batch, max_len, self.cfg.mla, dtype=w.dtype, device=w.device) for _ in self.layers]
