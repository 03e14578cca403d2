"""Rounding bounds for tests that compare two computations of the same formula (issue 15).

Two implementations of one formula (other GEMM blockings, another summation order, with or without FMA,
another CPU's kernels) agree only to rounding, so no fixed tolerance holds on every machine. A test
compares them within a bound derived from the computation instead (Higham, Accuracy and Stability of
Numerical Algorithms, §3.1): a sum of n products, in any order, with or without FMA, is within
γ_n = n·u/(1 − n·u) of exact times the sum of the products' absolute values (u: the unit roundoff,
2⁻²⁴ in fp32, 2⁻⁵³ in fp64). Each of the two computations is that close to exact, hence a factor 2 where
a test compares them. Along a chain of such sums the errors add to first order (γ_a + γ_b ≤ γ_(a+b)), each
carried forward by the derivatives of what follows; the absolute-value sums below bound those."""
from __future__ import annotations

import torch

# roundings in silu or silu' (exp ≤ 1 ulp in libm and SLEEF, then add, divide, multiply)
C_SILU = 8


def unit_roundoff(dtype: torch.dtype = torch.float64) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: float, dtype: torch.dtype = torch.float64) -> float:
    """γ_n = n·u/(1 − n·u) for the unit roundoff u of dtype."""
    nu = n * unit_roundoff(dtype)
    assert nu < 0.5, f"γ_{n:g} in {dtype}: n·u = {nu:.3g}, the bound says nothing"
    return nu / (1 - nu)


def swiglu_chain(dim: int, inter: int) -> float:
    """Roundings along one row of a SwiGLU expert, forward and backward: W1 x and W3 x (dim terms), silu,
    ⊙, W2 h (inter terms), the gate weight; backward W2ᵀg (dim), silu', W1ᵀ and W3ᵀ (2·inter). The 2.1 and
    3.1 are the |silu'| ≤ 1.1 factors where a dim-term error passes through silu (see swiglu_abs_sums)."""
    return 2 * inter + 3.1 * dim + 2 * C_SILU + 4


def swiglu_abs_sums(x, w1, w2, w3, w, g) -> dict:
    """The absolute-value sums that rounding errors are fractions of, for rows r of SwiGLU experts
    y_r = w_r·W2(silu(W1 x_r) ⊙ W3 x_r) under the output gradient g_r. x (R, D), w1/w3 (R, I, D), w2 (R, D, I),
    w (R,), g (R, D); fp64. With A = |W1||x| ≥ |W1 x|, B = |W3||x| ≥ |W3 x|, H = A⊙B (|silu(a)| ≤ |a|), and
    G = |W2|ᵀ|g|, first-order error propagation (|silu'| ≤ 1.1, |silu''| ≤ 0.5) bounds every error of a
    row's chain by γ_chain (swiglu_chain) times: y: |w|·|W2|H; ∂/∂w: |g|·|W2|H; ∂/∂x: |w|·(|W1|ᵀ(G⊙B⊙(1.1 +
    A/2)) + |W3|ᵀ(G⊙A)); ∂/∂W1: |w|·(G⊙B⊙(1.1 + A/2)) ⊗ |x|; ∂/∂W2: |w|·|g| ⊗ H; ∂/∂W3: |w|·(G⊙A) ⊗ |x|.
    (The A/2 is silu'' times the error of W1 x.) Sums over rows add their length to the γ."""
    xa, w1, w2, w3, wa, ga = x.abs(), w1.abs(), w2.abs(), w3.abs(), w.abs()[:, None], g.abs()
    A, B = torch.einsum("rid,rd->ri", w1, xa), torch.einsum("rid,rd->ri", w3, xa)
    G = torch.einsum("rdi,rd->ri", w2, ga)
    W2H = torch.einsum("rdi,ri->rd", w2, A * B)
    d_gate, d_up = G * B * (1.1 + A / 2), G * A
    return {"y": wa * W2H, "w": (ga * W2H).sum(-1),
            "x": wa * (torch.einsum("rid,ri->rd", w1, d_gate) + torch.einsum("rid,ri->rd", w3, d_up)),
            "w1": wa[..., None] * d_gate[:, :, None] * xa[:, None, :],
            "w2": wa[..., None] * ga[:, :, None] * (A * B)[:, None, :],
            "w3": wa[..., None] * d_up[:, :, None] * xa[:, None, :]}


def worst(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> float:
    """max |got − want| / bound (≤ 1: within the bound; 0/0 counts as 0)."""
    err = (got.double() - want.double()).abs()
    return (err / bound.clamp_min(1e-300)).max().item() if err.numel() else 0.0


def routed_abs_sums(experts, x, idx, w, g) -> tuple[torch.Tensor, dict]:
    """swiglu_abs_sums of the N·k rows (token t, choice j) of a routed dispatch through ``experts``
    (w1/w2/w3 of shape (E, …)): x (N, D), idx and w (N, k), g (N, D). Returns (token of each row, sums)."""
    N, k = idx.shape
    rows, tok = idx.reshape(-1), torch.arange(N).repeat_interleave(k)
    f = lambda t: t.detach().double()  # noqa: E731
    return tok, swiglu_abs_sums(f(x)[tok], f(experts.w1)[rows], f(experts.w2)[rows], f(experts.w3)[rows],
                                f(w).reshape(-1), f(g)[tok])
