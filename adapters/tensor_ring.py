"""Tensor-ring maths used by TLoRA (torch only): width factorisation, the tensor-ring matrix (TRM)
transform applied to x by mode products, and the tensor-ring (TR) residual.

Index flattening is row-major everywhere (the first sub-index varies slowest), as in the official
code; a flat index i of a width n = I_1·…·I_D is (i_1, …, i_D) with i = ((i_1·I_2 + i_2)·I_3 + i_3)….

TRM: cores A^d of shape (I_d, I_d, R, R); T[(i_1..i_D), (j_1..j_D)] = tr(A^1[i_1,j_1] ⋯ A^D[i_D,j_D]).
With R = 1 this is the Kronecker product A^1 ⊗ … ⊗ A^D.
TR: cores G^d of shape (K_d, R, R); the chain G(k_1..k_D) = G^1[k_1] ⋯ G^D[k_D] is an R×R matrix
per flat index, and Δ[o, i] = tr(B(o) · C(i)) with output cores B and input cores C.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _factorisations(n: int, order: int, smallest: int = 1):
    """All ascending tuples of `order` integers >= smallest whose product is n."""
    if order == 1:
        if n >= smallest:
            yield (n,)
        return
    f = smallest
    while f ** order <= n:
        if n % f == 0:
            for rest in _factorisations(n // f, order - 1, f):
                yield (f,) + rest
        f += 1


@lru_cache(maxsize=None)
def factorize(n: int, order: int = 3) -> tuple[int, ...]:
    """Near-cubic factors of a width, ascending. Among all factorisations into `order` factors,
    take the fewest odd factors, then the smallest sum of squares (= the transform's size per R²).
    Reproduces the official tables: 320 = 4·8·10, 640 = 8·8·10, 768 = 8·8·12, 1280 = 8·10·16,
    2048 = 8·16·16, and the DiT widths 1152 = 8·12·12, 1536 = 8·12·16, 3072 = 12·16·16."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cannot factorise width {n!r}: it must be a positive integer")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"factorisation order must be a positive integer, got {order!r}")
    return min(_factorisations(n, order), key=lambda fs: (sum(f % 2 for f in fs if f > 1), sum(f * f for f in fs), fs))


def check_factors(n: int, factors, what: str) -> tuple[int, ...]:
    factors = tuple(int(f) for f in factors)
    if not factors or any(f < 1 for f in factors) or math.prod(factors) != n:
        raise ValueError(f"factors {list(factors)} for {what} do not multiply to its width {n}")
    return factors


# ---------------------------------------------------------------------------------------------
# TRM transform

def identity_transform_cores(factors, rank: int, dtype=None, device=None) -> list[torch.Tensor]:
    """Cores with every slice A^d[:, :, r, r'] = I / R, so that T = I (paper, Prop. 1):
    the product of D such slices is δ·R^{D-1}·J / R^D and tr(J) = R."""
    return [torch.eye(f, dtype=dtype, device=device)[:, :, None, None].expand(f, f, rank, rank) / rank
            for f in factors]


def apply_transform(x: torch.Tensor, cores) -> torch.Tensor:
    """T x over the last dimension of x, by one contraction per mode: never builds the n×n matrix.
    Cost O(batch·n·(ΣI_d)·R²)."""
    lead, n = x.shape[:-1], x.shape[-1]
    batch = math.prod(lead)
    first = cores[0]
    t = x.reshape(batch, first.shape[1], n // first.shape[1])
    # (batch, done outputs P, ring start a, current ring index b, remaining inputs)
    t = torch.einsum("njr,ijab->niabr", t, first.to(x.dtype))
    for core in cores[1:]:
        b, p, ra, rb, rest = t.shape
        t = t.reshape(b, p, ra, rb, core.shape[1], rest // core.shape[1])
        t = torch.einsum("npabjr,ijbc->npiacr", t, core.to(x.dtype))
        t = t.reshape(b, p * core.shape[0], ra, core.shape[3], -1)
    out = torch.diagonal(t[..., 0], dim1=2, dim2=3).sum(-1)  # close the ring: trace over (a, a)
    return out.reshape(*lead, -1)


def transform_matrix(cores) -> torch.Tensor:
    """The dense T (n×n), for merging, the training route and tests. Each step is one matmul over the ring
    index (the last one over both ring indices, which closes the trace), so no (n, n, R, R) tensor is built."""
    first = cores[0]
    if len(cores) == 1:
        return torch.diagonal(first, dim1=2, dim2=3).sum(-1)
    t = first  # (I, J, a, b): rows and columns done so far, ring start a, current ring index b
    for core in cores[1:-1]:
        big_i, big_j, ra, rb = t.shape
        i, j, _, rc = core.shape
        t = t.reshape(big_i * big_j * ra, rb) @ core.to(t.dtype).permute(2, 0, 1, 3).reshape(rb, i * j * rc)
        t = t.reshape(big_i, big_j, ra, i, j, rc).permute(0, 3, 1, 4, 2, 5).reshape(big_i * i, big_j * j, ra, rc)
    last = cores[-1].to(t.dtype)  # (i, j, b, a): T[(I,i), (J,j)] = Σ_ab t[I, J, a, b] · last[i, j, b, a]
    big_i, big_j, ra, rb = t.shape
    i, j = last.shape[:2]
    out = t.reshape(big_i * big_j, ra * rb) @ last.permute(3, 2, 0, 1).reshape(ra * rb, i * j)
    return out.reshape(big_i, big_j, i, j).permute(0, 2, 1, 3).reshape(big_i * i, big_j * j)


def transform_count(factors, rank: int) -> int:
    return rank * rank * sum(f * f for f in factors)


# ---------------------------------------------------------------------------------------------
# TR residual

def ring_chain(cores) -> torch.Tensor:
    """(ΠK_d, R, R): the matrix product G^1[k_1] ⋯ G^D[k_D] for every flat index (row-major)."""
    chain = cores[0]
    for core in cores[1:]:
        p, ra, rb = chain.shape
        k, _, rc = core.shape
        chain = chain.reshape(p * ra, rb) @ core.to(chain.dtype).transpose(0, 1).reshape(rb, k * rc)
        chain = chain.reshape(p, ra, k, rc).transpose(1, 2).reshape(p * k, ra, rc)
    return chain


def ring_residual_matrix(out_cores, in_cores) -> torch.Tensor:
    """Dense Δ (out × in), Δ[o, i] = tr(B(o) · C(i)) = Σ_ab B(o)[a, b] · C(i)[b, a]."""
    b, c = ring_chain(out_cores), ring_chain(in_cores)
    return b.reshape(b.shape[0], -1) @ c.transpose(1, 2).reshape(c.shape[0], -1).T


def apply_ring_residual(x: torch.Tensor, out_cores, in_cores) -> torch.Tensor:
    """Δ x over the last dimension without the out×in matrix: Δx[o] = tr(B(o) · Σ_i x_i C(i)),
    i.e. a rank-R² product (cost O(batch·(in + out)·R²))."""
    c = ring_chain(in_cores).to(x.dtype)                   # (in, a, b)
    b = ring_chain(out_cores).to(x.dtype)                  # (out, b, a)
    rank = c.shape[-1]
    m = x @ c.reshape(c.shape[0], rank * rank)             # (..., a·b)
    return m @ b.transpose(1, 2).reshape(b.shape[0], rank * rank).T


def ring_residual_count(out_factors, in_factors, rank: int) -> int:
    return rank * rank * (sum(out_factors) + sum(in_factors))
