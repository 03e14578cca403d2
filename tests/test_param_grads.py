"""Per-parameter gradients of the parallel layouts against one process, in fp64, before clipping and
AdamW (report §3.4 ZeRO-1, §3.2 expert and pipeline parallelism): ZeRO-1 over DP2, EP2 inside DP2 and
PP2 under DualPipe, each through ``parallelize()``'s ``train_step`` (what ``parallel/steps.py`` runs),
two steps on different batches — step 2's gradients are taken at the weights step 1's clipped AdamW
update and routing-bias update produced, so the update is compared too — and the weights after step 2.

The gradient a rank holds at clipping time is its ZeRO-1 shard of each flat gradient it holds (its
experts under EP, its stages under PP, mirrored DualPipe copies summed), already reduce-scattered and
divided by the global number of micro-batches: it is read where ``parallel/zero.py`` asks
``dsv3.training.optim.clip_coefficient`` for the clip factor, and compared with the same elements of the
one-process model's ``.grad`` (whole global batch in one forward, ``tests/dist_utils.reference_step``'s
order of operations). A missing average over DP doubles a gradient; a wrong expert slice, a shard
off by one chunk or a mirrored copy not summed changes one parameter while the loss barely moves.

Bound (Higham §3.1, tests/rounding.py): each gradient element is a sum over the B·T = 64 token rows of
products along the backward chain; the two computations differ only in the order of those sums
(micro-batches, reduce-scatter, copies) and in GEMM blocking, each within γ_N of exact, N the roundings
along the longest chain: per layer (main and MTP, L = 3) forward and backward through attention (the
down/up projections, q·k over the head dims, softmax·v over T), the MoE (router over dim, experts over
dim and inter) and the norms, plus the head and loss over the vocabulary and the rows. N is written out in
``_chain_roundings``. Relative to a parameter's gradient norm the error is γ_N times the ratio of the
absolute-value sums to the values (the condition); γ_N is the worst case of N roundings all of one sign,
where roundings of either sign give ~√N·u (√N ≈ 78 here), which covers a condition well above 1; we allow
KAPPA = 2 on top, and 2 for the two computations. With the sizes below N ≈ 6.1·10³, so the bound is
2·2·γ_N ≈ 2.7·10⁻¹² relative per parameter (measured: ≤ 7.3·10⁻¹⁴); a missing DP average is an error of
1 (0.5 relative), a mirrored copy not summed about as large.
"""
from __future__ import annotations

import torch

from tests.conftest import config_path
from tests.dist_utils import run_ranks
from tests.rounding import gamma

SEQ, ROWS, STEPS = 16, 4, 2
MODEL = ["model.n_layers=2", "model.dim=32", "model.inter_dim=48", "model.mla.n_heads=2", "model.mla.q_lora_rank=16",
         "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
         "model.mla.v_head_dim=8", "model.moe.moe_inter_dim=16", "model.mtp.depth=1"]
BASE = [f"data.seq_len={SEQ}", "train.micro_batch_size=1", f"train.global_batch={ROWS}", "parallel.dispatcher=flat",
        *MODEL]
LAYOUTS = {  # name: overrides (world 2)
    "zero1_dp2": [],
    "ep2_dp2": ["parallel.ep=2"],
    "pp2_dualpipe": ["parallel.pp=2", "parallel.pp_schedule=dualpipe"],
}
KAPPA = 2


def _chain_roundings(cfg) -> int:
    """Roundings along the longest path from the loss to one gradient element (see the module docstring)."""
    m, mla, moe = cfg.model, cfg.model.mla, cfg.model.moe
    head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    attn = (m.dim + mla.q_lora_rank + mla.kv_lora_rank + head_dim + SEQ + mla.n_heads * mla.v_head_dim)
    ffn = m.dim + max(m.inter_dim, moe.moe_inter_dim * (moe.n_activated_experts + moe.n_shared_experts))
    per_layer = 2 * (attn + ffn + 3 * m.dim)          # forward and backward; 3 norms' sums of squares
    layers = m.n_layers + m.mtp.depth
    return layers * per_layer + 2 * (m.dim + m.vocab_size) + ROWS * SEQ


def _setup(overrides):
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    cfg = load_config(config_path("debug.yaml"), BASE + overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model).double()
    model.train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ + 1), generator=g) for _ in range(STEPS)]
    return cfg, model, batches


def _reference():
    """One process, the whole global batch per step: gradients before clipping, then clip, AdamW, bias."""
    from dsv3.training.optim import build_optimizer, clip_grad_norm
    cfg, model, batches = _setup([])
    opt = build_optimizer(model, cfg.train)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for b in batches:
        model(b[:, :-1], labels=b[:, 1:]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
        clip_grad_norm(list(params.values()), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_bias()
    return cfg, grads, {n: p.detach().clone() for n, p in params.items()}


def _worker(rank, world, layouts):
    """Every layout in turn in the same two processes; per layout and step, each held parameter's shard
    of the reduced, divided gradient at clipping time, and after the last step the master shards."""
    import dsv3.training.optim as optim
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    from parallel.placement import Placement
    orig, seen = optim.clip_coefficient, []

    def spy(norm, max_norm):
        seen.append({n: e.master.grad.clone() for n, e in current.zero.entries.items()})
        return orig(norm, max_norm)
    optim.clip_coefficient = spy
    out = {}
    try:
        for name, overrides in layouts.items():
            cfg, model, batches = _setup(overrides)
            mesh = Mesh.from_config(cfg.parallel)
            current = parallelize(model, mesh, cfg)
            rows = ROWS // mesh.dp
            seen.clear()
            for b in batches:
                current.train_step(b[current.dp_index * rows:(current.dp_index + 1) * rows], cfg.train.lr,
                                   model.mtp_weight)
            experts = (Placement.contiguous(cfg.model.moe.n_routed_experts, mesh.ep).local_experts(mesh.ep_rank)
                       if cfg.parallel.ep > 1 else None)
            where = {n: (e.index, e.chunk, n in current.expert_names and experts is not None)
                     for n, e in current.zero.entries.items()}
            out[name] = dict(grads=list(seen), where=where, experts=experts,
                             master={n: e.master.detach().clone() for n, e in current.zero.entries.items()})
    finally:
        optim.clip_coefficient = orig
    return out


def _shard(full: torch.Tensor, index: int, chunk: int, experts) -> torch.Tensor:
    """Elements [index·chunk, (index+1)·chunk) of the flat tensor (of the rank's experts), zero-padded."""
    if experts is not None:
        full = full[experts]
    flat = full.reshape(-1)
    piece = flat[index * chunk:(index + 1) * chunk]
    return torch.cat([piece, piece.new_zeros(chunk - piece.numel())])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def test_parallel_gradients_equal_one_process_per_parameter():
    cfg, ref_grads, ref_weights = _reference()
    bound = 2 * KAPPA * gamma(_chain_roundings(cfg))
    assert 1e-12 < bound < 1e-11, bound
    results = run_ranks(_worker, 2, LAYOUTS, timeout=400)
    worst = {}
    for name in LAYOUTS:
        covered = {n: torch.zeros(w.numel(), dtype=torch.bool) for n, w in ref_weights.items()}
        for rank, r in enumerate(results):
            res = r[name]
            assert len(res["grads"]) == STEPS, (name, rank, len(res["grads"]))
            for n, (index, chunk, is_expert) in res["where"].items():
                ex = res["experts"] if is_expert else None
                for step in range(STEPS):
                    want = _shard(ref_grads[step][n], index, chunk, ex)
                    got = res["grads"][step][n]
                    assert want.abs().sum() > 0 or want.numel() == 0, (name, n, step)
                    err = _rel(got, want)
                    worst[name] = max(worst.get(name, 0.0), err)
                    assert err <= bound, (name, rank, n, f"step {step + 1}", err, bound)
                got = res["master"][n]
                assert _rel(got, _shard(ref_weights[n], index, chunk, ex)) <= bound, (name, rank, n, "weights")
                ids = _shard(torch.arange(1, ref_weights[n].numel() + 1).view(ref_weights[n].shape), index, chunk, ex)
                covered[n][ids[ids > 0] - 1] = True   # padding is 0
        # every element of every parameter is held by some rank (ZeRO shards and EP slices tile the model)
        assert all(c.all() for c in covered.values()), (name, [n for n, c in covered.items() if not c.all()])
    print(f"worst relative gradient error per layout {worst}, bound {bound:.3g}")
