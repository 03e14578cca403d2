"""RMSNorm's hand-written backward against autograd of the plain formula (fp32) and gradcheck (fp64);
under autocast it writes the autocast dtype unless told not to, values equal to the FP32 result rounded."""
from __future__ import annotations

import torch

from dsv3.model.layers import RMSNorm


def _plain(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rmsnorm_equals_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(40, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40, generator=g))
    x = torch.randn(3, 5, 40, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 40, generator=g)
    y = norm(x)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(True), norm.weight.detach().clone().requires_grad_(True)
    y2 = _plain(x2, w2, 1e-6)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w2.grad, rtol=1e-5, atol=1e-5)
    n64 = RMSNorm(7).double()
    with torch.no_grad():
        n64.weight.normal_()
    assert torch.autograd.gradcheck(n64, (torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True),))


def test_rmsnorm_autocast_output_dtype():
    norm = RMSNorm(16)
    norm.autocast_output = True
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        norm.autocast_output = False
        y32 = norm(x)
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert torch.equal(y, y32.bfloat16())
    assert norm(x.bfloat16()).dtype == torch.bfloat16           # no autocast: the input's dtype


def test_shared_input_linears_equal_separate_calls():
    """Under BF16 autocast the Linears sharing an input run as one GEMM on the concatenated weights:
    outputs and weight gradients equal the separate calls (same BF16 products), the input gradient to
    BF16 rounding (summed inside one GEMM instead of two BF16 results added)."""
    from dsv3.model.layers import Linear
    from dsv3.model.fast.shared_input import packed_linear, shared_input_linears
    torch.manual_seed(0)
    a, b = Linear(12, 5), Linear(12, 7)
    x = torch.randn(3, 4, 12, requires_grad=True)
    assert packed_linear(x, a, b) is None                 # FP32 on CPU: separate calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_linear(x, a, b) is not None
        ya, yb = shared_input_linears(x, a, b)
    (ya.float().sin().sum() + yb.float().cos().sum()).backward()
    got = [ya, yb, a.weight.grad, b.weight.grad, x.grad]
    x2 = x.detach().clone().requires_grad_(True)
    a.weight.grad = b.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za, zb = a(x2), b(x2)
    (za.float().sin().sum() + zb.float().cos().sum()).backward()
    for g, r in zip(got[:4], [za, zb, a.weight.grad, b.weight.grad]):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    assert (got[4] - x2.grad).norm() <= 1e-2 * x2.grad.norm()
    a.impl = lambda x, w: torch.zeros(*x.shape[:-1], w.shape[0])      # a swapped impl runs on its own
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_linear(x, a, b) is None and shared_input_linears(x, a, b)[0].abs().max() == 0


def test_packed_swiglu_equals_autograd_formula():
    """swiglu_packed([g | u], w) = silu(g) · u · w per row; its hand-written backward (packed dg/du and
    the row-weight gradient) passes gradcheck in fp64 and equals autograd of the formula in fp32."""
    from dsv3.model.fast.swiglu import swiglu_packed
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    rw = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_packed, (gu, rw))
    assert torch.autograd.gradcheck(lambda t: swiglu_packed(t), (gu,))
    a, b = gu.detach().float().requires_grad_(True), rw.detach().float().requires_grad_(True)
    dy = torch.randn(6, 5, generator=g).float()
    swiglu_packed(a, b).backward(dy)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    (torch.nn.functional.silu(a2[:, :5]) * a2[:, 5:] * b2[:, None]).backward(dy)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-6)


def test_moe_gate_recomputes_its_input_from_the_norm():
    """Norms recomputed (report §3.2.3): the MoE block's gate keeps h (which the ffn_norm checkpoint keeps
    anyway) and recomputes its normed input in the backward: the gradients equal those of the gate keeping
    its input bit for bit, and exactly the normed input's B·T·dim·4 bytes fewer are saved."""
    import os
    from dsv3.model.block import Block
    from dsv3.config import load_config
    from dsv3.model.rope import rope_cos_sin

    torch.manual_seed(0)
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug.yaml"),
                      ["model.moe.n_shared_experts=0"])       # FP32 shared-expert Linears would keep the normed h
    m = cfg.model
    block = Block(m.n_dense_layers, m)                       # an MoE block
    block.recompute_norms = True
    for p in block.parameters():                             # the experts and gate start uninitialised
        torch.nn.init.normal_(p, std=0.05)
    cos, sin = rope_cos_sin(m.mla, 16)
    x = torch.randn(2, 16, m.dim)
    dy = torch.randn(2, 16, m.dim)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()} | {t.untyped_storage().data_ptr() for t in (cos, sin)}
    grads, saved = {}, {}
    for recompute_gate in (False, True):
        block.zero_grad()
        xx = x.clone().requires_grad_()
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if recompute_gate:
                y = block(xx, cos, sin)
            else:                                            # Block.forward with the gate keeping its input
                h = block.attention(xx, cos, sin)
                y = h + block.ffn(block.ffn_input(h))
        y.backward(dy)
        grads[recompute_gate] = [xx.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]
        saved[recompute_gate] = sum(seen.values())
    assert len(grads[True]) == len(grads[False]) > 10
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
    assert saved[False] - saved[True] == 2 * 16 * m.dim * 4


def test_fp8_shared_input_linears_quantise_x_once():
    """FP8 Linears sharing x (MLA's wq_a / wkv_a, an MLP's w1 / w3) through shared_impl: the outputs and
    every gradient equal separate fp8_linear calls bit for bit (the same GEMMs; dx the same two dgrads
    added), and x's token-tiled FP8 copy is kept once: exactly one copy's bytes fewer are saved."""
    import functools
    from dsv3.model.layers import Linear
    from dsv3.model.fast.shared_input import shared_input_linears
    from triton_kernels.fp8_linear import fp8_linear, fp8_linear_shared
    g = torch.Generator().manual_seed(1)
    lins = [Linear(160, 200), Linear(160, 72)]                       # ragged 128-tiles
    x, dys = torch.randn(1, 130, 160, generator=g), [torch.randn(1, 130, n, generator=g) for n in (200, 72)]
    got = {}
    for shared in (False, True):
        for lin in lins:
            lin.weight.grad = None
            lin.impl = functools.partial(fp8_linear, backend="torch")
            lin.shared_impl = functools.partial(fp8_linear_shared, backend="torch") if shared else None
        if shared:                                                   # one hook object across the Linears
            lins[1].shared_impl = lins[0].shared_impl
        xx, seen = x.clone().requires_grad_(), {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ys = shared_input_linears(xx, *lins)
        torch.autograd.backward(ys, dys)
        got[shared] = ([y.detach() for y in ys] + [xx.grad] + [lin.weight.grad for lin in lins],
                       sum(seen.values()) - sum(lin.weight.untyped_storage().nbytes() for lin in lins))
    assert all(torch.equal(a, b) for a, b in zip(got[True][0], got[False][0]))
    # x's token-tiled copy: 160 channels × 130 tokens in E4M3 + one FP32 scale per channel per 128 tokens
    one_copy = 160 * 130 + 4 * 160 * 2
    assert got[False][1] == 2 * one_copy and got[True][1] == one_copy
