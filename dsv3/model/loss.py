"""The language-model loss from hidden states: the output head, then cross-entropy (report §2.2, eq. 24–25
for the MTP depths).

``head_cross_entropy(head, h, targets)`` returns the SUM of the token cross-entropies over targets that
are not ``ignore_index`` (callers divide by the count they need: valid tokens for the main loss, B·T for
an MTP depth), log-softmax in at least FP32 (report §3.3). It is the reference of the
``OutputHead.loss_impl`` hook, whose default in training fuses the head with the cross-entropy in row
chunks so the (tokens × vocab) logits are never held whole (dsv3/model/fast/head_loss.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model import fast
from dsv3.model.layers import Linear


def head_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                       ignore_index: int = -100) -> torch.Tensor:
    """Sum over valid positions of CE(head(h), targets); h (..., dim), targets (...)."""
    logits = head(h.reshape(-1, h.shape[-1]))
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


class OutputHead(Linear):
    """The output head (kept in BF16/FP32: report §3.3) and its loss: ``cross_entropy(h, targets)`` is
    Σ CE(head(h), targets) through the ``loss_impl`` hook (head, h, targets, ignore_index) -> sum, whose
    default fuses the head with the cross-entropy when training (no logits kept)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, fp8_exempt=True)
        self.loss_impl = fast.auto("head_loss", head_cross_entropy)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        return self.loss_impl(self, h, targets, ignore_index)
