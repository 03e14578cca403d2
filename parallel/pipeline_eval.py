"""What the training loop records where a pipeline spreads the layers over ranks (pp > 1): the balance
fields of every MoE layer, gathered from the ranks that hold it, and evaluation (validation loss,
domain loads, ``val_maxvio``) by a forward-only pass through the stages, and the end-of-run sample
(``pipeline_generate``: greedy or sampled decoding with the MLA cache through the same stages).

Each layer's values are summed over all ranks (its holders fill them, the others give zeros) with the
number of holders beside them: DualPipe keeps two copies of a stage, and every data-parallel replica one
more. Histograms add up (each token crosses one copy), biases are divided by the count (the copies are
equal), balance losses by the data-parallel size (a replica's mean, as without a pipeline).

The forward-only pass runs each model stage on the lowest rank that holds it, micro-batch by micro-batch,
handing the hidden states on with blocking send / recv in one fixed order (no tags: NCCL ignores them).
Every data-parallel replica evaluates the same batches, so the expert all-to-all of a MoE stage finds
all its peers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from dsv3.model.mla import MLACache
from dsv3.model.sampling import decode, limits
from dsv3.training.balance_metrics import BalanceMonitor
from parallel.dsv3_stages import moe_by_name, stage_modules


class _Held:
    """The MoE layers this rank holds (one copy each), in the model's order: what BalanceMonitor hooks."""

    def __init__(self, pipe, names: list[str]):
        held = moe_by_name(pipe)
        self.names = [n for n in names if n in held]
        self.moes = [held[n] for n in self.names]

    def moe_layers(self):
        return self.moes


class PipelineBalance:
    """The BalanceMonitor interface of the training loop (``histograms``, ``after_forward``,
    ``step_fields``, ``take_domain_loads``, ``domains``) over a pipeline."""

    def __init__(self, parallel_model):
        self.parallel_model, self.pipe, self.names = parallel_model, parallel_model.pipe, parallel_model.moe_names
        self.held = _Held(self.pipe, self.names)
        self.local = BalanceMonitor(self.held)       # hooks on this rank's copies
        self.globl = BalanceMonitor(_Held(self.pipe, []))   # running MaxVio and previous bias of all layers
        moe_cfg = parallel_model.cfg.model.moe
        self.E, self.G = moe_cfg.n_routed_experts, max(moe_cfg.n_group, 1) + 1
        self.histograms: list = []    # summed in step_fields, not by the loop
        self.globl.prev_bias = self._biases()   # so the first step's drift is its own move

    def after_forward(self, n_micro: int) -> None:
        pass   # the stages record their balance losses (DSV3Stage.balance_by_moe)

    def _gather(self, per_layer: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        """(layers, width + 1): each layer's row summed over ranks, the holder count in the last column."""
        out = torch.zeros(len(self.names), width + 1, dtype=torch.float64)
        for i, n in enumerate(self.names):
            if n in per_layer:
                out[i, :width], out[i, width] = per_layer[n].double(), 1.0
        return _all_reduce_on(out, self.pipe.device)

    def _biases(self) -> list[torch.Tensor]:
        g = self._gather({n: m.gate.e_score_correction_bias.detach().double().cpu().reshape(-1)
                          for n, m in zip(self.held.names, self.held.moes)}, self.E)
        return [(row[:self.E] / row[self.E].clamp_min(1.0)).float() for row in g]

    def step_fields(self, loads: list[torch.Tensor]) -> dict:
        balance = {}
        for s in stage_modules(self.pipe):
            by_id = s.balance_by_moe
            for n, m in zip(self.held.names, self.held.moes):
                if id(m) in by_id:
                    balance[n] = balance.get(n, 0.0) + by_id[id(m)]
            s.balance_by_moe = {}
        n_micro = self.pipe.num_chunks
        rows = {n: torch.cat([m.gate.e_score_correction_bias.detach().double().cpu().reshape(-1),
                              h.double().cpu(), torch.as_tensor(balance.get(n, 0.0), dtype=torch.float64).cpu().reshape(1) / n_micro])
                for n, m, h in zip(self.held.names, self.held.moes, self.local.histograms)}
        g = self._gather(rows, self.E + self.G + 1)
        count = g[:, -1:].clamp_min(1.0)
        bias = [(row[:self.E] / c).float() for row, c in zip(g, count)]
        hist = [row[self.E:self.E + self.G].round().long() for row in g]
        bal = [float(row[self.E + self.G]) / self.parallel_model.dp for row in g]
        for h in self.local.histograms:
            h.zero_()
        return self.globl.fields(loads, bias, hist, bal)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data, cfg, autocast) -> float:
        """Mean LM loss over the validation batches (every rank returns it); domain loads are counted
        by the holders' routers for ``take_domain_loads``."""
        pipe = self.pipe
        S, me, owner, peer = _owners(pipe)
        mbs = cfg.train.micro_batch_size
        tags = data.val_batch_domains(mbs, cfg.train.eval_batches)
        stages = pipe.stage_module
        for m in stages.values():
            m.eval()
        total = torch.zeros(2, dtype=torch.float64)   # Σ lm_loss · rows, rows
        try:
            for i, batch in enumerate(data.val_batches(mbs, cfg.train.eval_batches)):
                batch = batch.to(pipe.device)
                mb = {"tokens": batch[:, :-1], "labels": batch[:, 1:]}
                x: Optional[torch.Tensor] = None
                self.local.domains = tags[i]
                for s in range(S):
                    if owner[s] != me:
                        continue
                    if s > 0 and owner[s - 1] != me:
                        x = torch.empty(batch.shape[0], batch.shape[1] - 1, cfg.model.dim, dtype=pipe.act_dtype,
                                        device=pipe.device)
                        dist.recv(x, src=peer[owner[s - 1]], group=pipe.group)
                    stages[s].loss_parts["lm_loss"] = 0.0
                    with autocast():
                        y = stages[s](x, mb)
                    if s == S - 1:
                        if self.parallel_model.dp_index == 0:   # one replica's sum: the others are the same
                            lm = float(stages[s].loss_parts["lm_loss"])
                            total += torch.tensor([lm * batch.shape[0], batch.shape[0]], dtype=torch.float64)
                    elif owner[s + 1] != me:
                        dist.send(y.to(pipe.act_dtype).contiguous(), dst=peer[owner[s + 1]], group=pipe.group)
                    x = y
        finally:
            for m in stages.values():
                m.train()
                m.loss_parts = dict(lm_loss=0.0, mtp_loss=0.0, balance_loss=0.0)
                m.balance_by_moe = {}
        total = _all_reduce_on(total, pipe.device)   # from the last stage's owner of replica 0
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def take_domain_loads(self) -> dict:
        """Domain loads of every layer, gathered from the ranks that ran it (one copy per replica)."""
        mine = self.local.domain_loads
        self.local.domain_loads, self.local.domains = {}, None
        # every rank evaluated the same batches: the domain set is the same wherever a hook fired; ranks
        # that hold no MoE layer (or ran none of its copies) learn it from the others
        names = _agree_domains(sorted(mine), self.pipe.device)
        per_layer = {}
        for n_i, n in enumerate(self.held.names):
            per_layer[n] = torch.stack([mine[d][n_i] if d in mine else torch.zeros(self.E, dtype=torch.int64)
                                        for d in names]).reshape(-1) if names else torch.zeros(0)
        g = self._gather(per_layer, len(names) * self.E)
        out = {}
        for j, d in enumerate(names):
            out[d] = [(row[j * self.E:(j + 1) * self.E] / self.parallel_model.dp).round().long() for row in g]
        return self.globl.take_domain_loads(out)


def _owners(pipe) -> tuple[int, int, list[int], list[int]]:
    """(model stages, this pipeline rank, the lowest pipeline rank holding each stage, global rank of each
    pipeline rank): the forward-only passes run each stage on its owner."""
    lay = pipe.layout
    S = lay.num_model_stages
    owner = [min(r for r in range(pipe.num_ranks) if s in lay.model_stages_of(r)) for s in range(S)]
    return S, pipe.rank, owner, [dist.get_global_rank(pipe.group, r) for r in range(pipe.num_ranks)]


@torch.no_grad()
def pipeline_generate(parallel_model, tokenizer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0) -> list[int]:
    """``dsv3.model.sampling.generate`` through the pipeline: the same decoding loop and the same ops (embedding,
    each Block with its compressed MLA cache, final norm and head), each stage run by its owner with the
    hidden states handed on as in ``evaluate``; the last stage's logits of replica 0 are summed onto every
    rank (the others add zeros: exact), so every rank draws the same token. Every rank calls it (the
    pipeline and the expert all-to-all need them all); every rank returns the new ids."""
    pipe, mcfg = parallel_model.pipe, parallel_model.cfg.model
    S, me, owner, peer = _owners(pipe)
    stages = {s: pipe.stage_module[s] for s in range(S) if owner[s] == me}
    prompt, max_len, eos_id = limits(mcfg, tokenizer, prompt_ids, max_new_tokens)
    caches = {s: [MLACache(1, max_len, mcfg.mla, dtype=pipe.act_dtype, device=pipe.device) for _ in m.layers]
              for s, m in stages.items()}

    def next_logits(ids: list[int], pos: int) -> torch.Tensor:
        tokens = torch.tensor([ids], device=pipe.device)
        logits = torch.zeros(mcfg.vocab_size, dtype=pipe.act_dtype, device=pipe.device)
        h: Optional[torch.Tensor] = None
        for s, m in stages.items():
            cos, sin = m.rope(pos, len(ids))
            if s == 0:
                h = m.embed(tokens)
            elif owner[s - 1] != me:
                h = torch.empty(1, len(ids), mcfg.dim, dtype=pipe.act_dtype, device=pipe.device)
                dist.recv(h, src=peer[owner[s - 1]], group=pipe.group)
            for layer, cache in zip(m.layers, caches[s]):
                h = layer(h, cos, sin, cache, pos)
            if s == S - 1:
                if parallel_model.dp_index == 0:
                    logits += m.head(m.norm(h))[0, -1]
            elif owner[s + 1] != me:
                dist.send(h.to(pipe.act_dtype).contiguous(), dst=peer[owner[s + 1]], group=pipe.group)
        return _all_reduce_on(logits, pipe.device)

    for m in stages.values():
        m.eval()
    try:
        return decode(next_logits, prompt, max_len, eos_id, temperature, top_p, seed)
    finally:
        for m in stages.values():
            m.train()


def _all_reduce_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Summed over all ranks on the model's device (NCCL reduces device tensors only), returned on the CPU."""
    on = t.to(device)
    dist.all_reduce(on)
    return on.cpu()


def _agree_domains(domains: list[str], device: torch.device = torch.device("cpu")) -> list[str]:
    """The union of every rank's domain names, in sorted order (gathered as bytes; no pickling)."""
    blob = torch.tensor(list("\n".join(domains).encode()), dtype=torch.uint8)
    size = torch.tensor([blob.numel()], dtype=torch.int64)
    size = size.to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[:blob.numel()] = blob.to(device)
    parts = [torch.zeros(width, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [p.cpu() for p in parts]
    names = set()
    for p, s in zip(parts, sizes):
        text = bytes(p[:int(s.item())].tolist()).decode()
        names.update(x for x in text.split("\n") if x)
    return sorted(names)
