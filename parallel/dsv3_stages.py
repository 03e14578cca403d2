"""A dsv3 ``Transformer`` cut into pipeline stages for any schedule (report §3.2.1).

    stages = dsv3_stages(model, layout("dualpipe", N).num_model_stages)
    pipe = Pipeline(model, stages, "dualpipe", C, act_shape=(B, T, dim), act_dtype=torch.float32)
    losses = pipe.step(dsv3_microbatches(batch, C))     # each: lm_loss + λ·mtp_loss, as Transformer.forward
    pipe.sync_grads()
    update_bias_pipelined(pipe, sum_loads=lambda loads: ...)   # loads over the DualPipe copies, then ranks

The first stage embeds ``mb["tokens"]``; the last applies the final norm and head (next-token CE on
``mb["labels"]``) and runs the D MTP modules with the embedding and head it shares with the main model
(report §2.2), so with DualPipe a rank holding the first stage of one direction and the last of the other
keeps a single embedding tensor for both. Every stage runs the very ops of ``Transformer.forward``, so
a pipelined micro-batch's loss is bitwise the single-process ``out.lm_loss + λ·out.mtp_loss``. The
balance loss needs no threading: each MoE layer attaches its gradient through ``AuxLossScaler``; its
value (and the LM / MTP parts) are summed per stage copy for the step log (``take_loss_parts``).

A stage's forward is a chain of pieces (``DSV3Stage.begin_forward``) so that the overlapped executor
(``parallel.overlap_pipeline.OverlapPipeline``, which ``parallelize()`` picks for DualPipe / DualPipeV
with expert parallelism) can cut each MoE Block at its all-to-alls; ``forward`` runs the same pieces whole.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from dsv3.model.transformer import Transformer
from dsv3.model.moe import MoE
from parallel.overlap import Piece, params_of
from parallel.stage_cut import stage_bounds


class DSV3Stage(nn.Module):
    """Layers [lo, hi) of ``model``; submodules and buffers are the model's own objects, so ``Pipeline``
    names every tensor by the single-process model's names.

    A forward is a chain of pieces (``begin_forward``): the embedding (first stage), one piece per
    Block, the head with the MTP modules (last stage). ``forward`` runs them in order; the overlapped
    executor (parallel/overlap.py) runs the same pieces, splitting a MoE Block at its all-to-alls."""

    rope = Transformer.rope            # the same slicing of the same buffers
    lm_loss = Transformer.lm_loss      # the same fused head + cross-entropy (needs norm, head)
    mtp_loss = Transformer.mtp_loss    # the same MTP ops (needs embed, head, mtp, cfg, rope)
    init_buffers_ = Transformer.init_buffers_   # RoPE tables after meta-device materialisation

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, first, last
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.embed = model.embed if first or (last and len(model.mtp) > 0) else None
        if last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.mtp_weight = model.mtp_weight
        self.loss_parts = dict(lm_loss=0.0, mtp_loss=0.0, balance_loss=0.0)
        self.balance_by_moe: dict[int, torch.Tensor] = {}

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def begin_forward(self, mb: dict) -> list[Piece]:
        """Starts a forward of micro-batch ``mb`` (tokens (B, T), labels (B, T)): clears the MoE layers'
        balance record and returns the pieces, each ``fn(x) -> y`` on (B, T, dim) hidden states (the
        embedding's x is None; the head's y is the scalar loss lm + λ·mtp)."""
        ids = mb["tokens"]
        cos, sin = self.rope(0, ids.shape[1])
        for moe in self.moe_layers():
            moe.last_balance_loss = None
        pieces = []
        if self.first:
            pieces.append(Piece("embed", lambda x: self.embed(ids), params_of(self.embed)))
        for layer in self.layers:
            pieces.append(Piece(f"layer{layer.layer_id}", lambda x, layer=layer: layer(x, cos, sin, None, 0),
                                params_of(layer), block=layer, rope=(cos, sin)))
        if self.last:
            pieces.append(Piece("head", lambda h: self._head(h, ids, mb["labels"]),
                                params_of(self.norm, self.head, self.mtp, self.embed)))
        return pieces

    def _head(self, h: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lm_loss = self.lm_loss(h, labels)
        mtp_loss = self.mtp_loss(h, ids, labels)
        self.loss_parts["lm_loss"] = self.loss_parts["lm_loss"] + lm_loss.detach().double()   # no host sync:
        self.loss_parts["mtp_loss"] = self.loss_parts["mtp_loss"] + mtp_loss.detach().double()   # read once a step
        return lm_loss + self.mtp_weight * mtp_loss

    def end_forward(self) -> None:
        """Adds this forward's balance losses to the step's record (``take_loss_parts``), in all and per
        MoE layer (``balance_by_moe``, keyed by the layer object's id, for the balance fields)."""
        values = {id(m): m.last_balance_loss.detach().double() for m in self.moe_layers()
                  if m.last_balance_loss is not None}   # device tensors: the step reads them once
        self.loss_parts["balance_loss"] = self.loss_parts["balance_loss"] + sum(values.values())
        for k, v in values.items():
            self.balance_by_moe[k] = self.balance_by_moe.get(k, 0.0) + v

    def forward(self, x: Optional[torch.Tensor], mb: dict) -> torch.Tensor:
        """x: (B, T, dim) from the previous stage (None on the first); mb: tokens (B, T), labels (B, T).
        Returns the hidden states (B, T, dim), or on the last stage the scalar loss."""
        for piece in self.begin_forward(mb):
            x = piece.fn(x)
        self.end_forward()
        return x


def dsv3_stages(model: Transformer, num_stages: int) -> list[DSV3Stage]:
    """The layers split as evenly as possible, earlier stages taking the remainder (the last stage also
    carries the head and the MTP modules)."""
    b = stage_bounds(len(model.layers), num_stages)
    return [DSV3Stage(model, b[s], b[s + 1], s == 0, s == num_stages - 1) for s in range(num_stages)]


def dsv3_microbatches(batch: torch.Tensor, num: int) -> list[dict]:
    """(B·num, T+1) token rows → ``num`` micro-batches of inputs and next-token labels, B rows each."""
    if batch.shape[0] % num:
        raise ValueError(f"a batch of {batch.shape[0]} sequences does not split into {num} micro-batches")
    return [{"tokens": b[:, :-1], "labels": b[:, 1:]} for b in batch.chunk(num)]


def stage_modules(pipe) -> list[DSV3Stage]:
    """This rank's stage copies (both DualPipe directions)."""
    return list(pipe.stage_module.values())


def set_mtp_weight(pipe, weight: float) -> None:
    for s in stage_modules(pipe):
        s.mtp_weight = weight


def set_aux_loss_scale(pipe, scale: float) -> None:
    for s in stage_modules(pipe):
        for moe in s.moe_layers():
            moe.aux_loss_scale = scale


def take_loss_parts(pipe) -> dict[str, float | torch.Tensor]:
    """LM, MTP and balance loss summed over this rank's stage copies and the micro-batches since the
    last call (each micro-batch's LM/MTP parts appear once, on its last stage); resets them. A part is
    a 0-d fp64 device tensor where a micro-batch added to it (no host sync per micro-batch), else 0.0."""
    out = dict(lm_loss=0.0, mtp_loss=0.0, balance_loss=0.0)
    for s in stage_modules(pipe):
        for k in out:
            out[k] += s.loss_parts[k]
            s.loss_parts[k] = 0.0
    return out


def moe_by_name(pipe) -> dict[str, MoE]:
    """Model-level MoE prefix (e.g. ``layers.2.ffn``) → this rank's copy of that MoE layer."""
    name_of = {id(t): n for n, t in pipe.buffers.items()}
    out = {}
    for s in stage_modules(pipe):
        for moe in s.moe_layers():
            out[name_of[id(moe.tokens_per_expert)].rsplit(".", 1)[0]] = moe
    return out


def update_bias_pipelined(pipe, sum_loads: Optional[Callable[[list[torch.Tensor]], None]] = None,
                          gamma: Optional[float] = None) -> dict[str, torch.Tensor]:
    """Aux-loss-free bias update on this rank's MoE copies: loads summed over the copies of each stage
    (DualPipe's two directions see different micro-batches), then by ``sum_loads`` (in place; e.g. an
    all-reduce over the data-parallel ranks of this stage), then b ← b + γ·sign(mean − load).
    Returns the summed loads by MoE name; resets the counts."""
    moes = moe_by_name(pipe)
    names = sorted(moes)
    pipe.sum_buffers([f"{n}.tokens_per_expert" for n in names])
    loads = [moes[n].tokens_per_expert.clone() for n in names]
    if sum_loads is not None and loads:
        sum_loads(loads)
    for n, load in zip(names, loads):
        moes[n].update_bias(load, gamma)
        moes[n].tokens_per_expert.zero_()
    return dict(zip(names, loads))
