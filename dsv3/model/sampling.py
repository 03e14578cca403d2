"""Autoregressive decoding with the compressed MLA cache (c_KV + k_rope per token and layer, DeepSeek-V2
§2.1.4): one prefill over the prompt, then one token per step through the absorbed attention path.

    from dsv3.model.sampling import generate
    new_ids = generate(model, tokenizer, prompt_ids, max_new_tokens=32)            # greedy
    new_ids = generate(model, None, prompt_ids, 32, temperature=0.8, top_p=0.95, seed=1)

``decode`` is the loop over any ``next_logits(ids, start_pos)``: ``generate`` runs it on one model,
``parallel.pipeline_eval.pipeline_generate`` through a pipeline's stages; the command line is
``python -m dsv3.tools.generate``. Torch only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> int:
    """One token id from logits (V,): argmax when temperature <= 0 (the lowest id on ties), else a
    draw from softmax(logits / temperature) restricted to the nucleus — the fewest most likely
    tokens whose probabilities sum to at least top_p — and renormalised (Holtzman et al. 2019)."""
    logits = logits.detach().float().cpu()
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        keep = mass_before < top_p          # the first token is always kept
        kept = torch.zeros_like(probs)
        kept[order[keep]] = sorted_p[keep]
        probs = kept / kept.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def limits(cfg, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], int, Optional[int]]:
    """(prompt, positions the decode may fill, eos id or None) for a model config ``cfg``."""
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise ValueError("generate needs at least one prompt token")
    max_len = min(cfg.max_seq_len, len(prompt) + max(0, max_new_tokens))
    if len(prompt) > max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than model.max_seq_len={cfg.max_seq_len}")
    return prompt, max_len, getattr(tokenizer, "eos_id", None) if tokenizer is not None else None


def decode(next_logits, prompt: list[int], max_len: int, eos_id: Optional[int], temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0) -> list[int]:
    """The decoding loop over ``next_logits(ids, start_pos)`` — the logits (V,) after the model has read
    ``ids`` at positions start_pos… (its caches remember them): once with the prompt, then once per new
    token. ``generate`` runs it on one model; ``parallel.pipeline_eval.pipeline_generate`` on a pipeline."""
    generator = torch.Generator().manual_seed(seed)
    logits = next_logits(prompt, 0)
    pos, out = len(prompt), []
    while pos < max_len:
        token = sample_next(logits, temperature, top_p, generator)
        out.append(token)
        if token == eos_id or pos + 1 >= max_len:
            break
        logits = next_logits([token], pos)
        pos += 1
    return out


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[int]:
    """The new token ids (without the prompt). Stops at the tokenizer's ``eos_id`` when a tokenizer
    is given, and at ``model.cfg.max_seq_len`` positions. The model's train/eval mode is restored."""
    prompt, max_len, eos_id = limits(model.cfg, tokenizer, prompt_ids, max_new_tokens)
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches(1, max_len)
        return decode(lambda ids, pos: model(torch.tensor([ids], device=device), caches=caches, start_pos=pos)[0, -1],
                      prompt, max_len, eos_id, temperature, top_p, seed)
    finally:
        model.train(was_training)
