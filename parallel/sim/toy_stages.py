"""A small language model cut into pipeline stages: the generic stand-in tests/test_pipeline.py runs
every schedule on (report §3.2.1). It has what makes placement interesting in DeepSeek-V3: an input
embedding on the first stage, an output head and an MTP-like extra loss on the last, the MTP reusing
the embedding and the head (report §2.2). The stage forwards run the very ops of ``ToyLM.forward``, so a pipelined
loss can be compared bitwise with the single-process one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, dim)
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, n_layers: int = 8, mtp_weight: float = 0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(ResidualMLP(dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.mtp_proj = nn.Linear(2 * dim, dim)      # M_1 [Emb(t_{i+1}); h_i], then the shared head
        self.mtp_block = ResidualMLP(dim)
        self.mtp_weight = mtp_weight

    def loss(self, h: torch.Tensor, mb: dict) -> torch.Tensor:
        """Next-token CE plus λ × the depth-1 MTP CE; ``mb``: tokens (B, T), targets (B, T), mtp_targets (B, T)."""
        V = self.head.out_features
        lm = F.cross_entropy(self.head(self.norm(h)).reshape(-1, V), mb["targets"].reshape(-1))
        h1 = self.mtp_block(self.mtp_proj(torch.cat([self.embed(mb["targets"]), h], dim=-1)))
        mtp = F.cross_entropy(self.head(self.norm(h1)).reshape(-1, V), mb["mtp_targets"].reshape(-1))
        return lm + self.mtp_weight * mtp

    def forward(self, mb: dict) -> torch.Tensor:
        h = self.embed(mb["tokens"])
        for layer in self.layers:
            h = layer(h)
        return self.loss(h, mb)


class ToyStage(nn.Module):
    """Layers [lo, hi) of a ToyLM; the first stage embeds, the last computes the loss. Submodules are the
    model's own objects, so ``Pipeline`` can name every parameter and see the tied embedding."""

    def __init__(self, model: ToyLM, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.embed = model.embed if first or last else None
        if last:
            self.norm, self.head, self.mtp_proj, self.mtp_block = model.norm, model.head, model.mtp_proj, model.mtp_block
            self.mtp_weight = model.mtp_weight

    def forward(self, x: Optional[torch.Tensor], mb: dict) -> torch.Tensor:
        if self.first:
            x = self.embed(mb["tokens"])
        for layer in self.layers:
            x = layer(x)
        return ToyLM.loss(self, x, mb) if self.last else x


def toy_stages(model: ToyLM, num_stages: int) -> list[ToyStage]:
    """Splits the layers as evenly as possible, earlier stages taking the remainder."""
    n = len(model.layers)
    if num_stages > n:
        raise ValueError(f"{num_stages} stages need at least as many layers, the model has {n}")
    bounds = [sum(n // num_stages + (i < n % num_stages) for i in range(s)) for s in range(num_stages + 1)]
    return [ToyStage(model, bounds[s], bounds[s + 1], s == 0, s == num_stages - 1) for s in range(num_stages)]


def toy_microbatches(num: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        t = torch.randint(vocab, (batch, seq + 2), generator=g)
        out.append({"tokens": t[:, :seq], "targets": t[:, 1:seq + 1], "mtp_targets": t[:, 2:seq + 2]})
    return out
