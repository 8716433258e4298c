"""TLoRA (Tao et al., ICCV 2025): transformed low-rank adaptation via tensor decomposition.

    W' = W0·T + s·Δ

T (in×in) is a full-rank transform on the input side, a tensor-ring matrix (TRM) whose cores
A^d (I_d, I_d, R_t, R_t) start with every slice = I/R_t, so T = I exactly; R_t = 1 is a Kronecker
product. Δ (out×in) is a tensor-ring residual (cores B^d (O_d, R, R) for the output width,
C^d (I_d, R, R) for the input width; B^1 = 0) or, with residual="lora", a plain B·A (B = 0).
R = cfg.rank, R_t = options["transform_rank"], s = cfg.scale (the paper: alpha=1, rslora=True).

Forward (never builds W0·T): y = W0·(T x) + s·Δx + b, with T x by one contraction per mode of x
reshaped to (…, I_1, …, I_D) and Δx as a rank-R² product (adapters/tensor_ring.py).

Widths are factorised automatically (near-cubic, options["order"] factors; 320 = 4·8·10,
1152 = 8·12·12, …) or by options["factors"] = {"<width>": [f1, f2, f3]}; index order row-major.

Conv2d (our extension, not in the paper): T acts on the input channels, W'[o,:,h,w] = W0[o,:,h,w]·T
(a 1×1 transform of x before the base conv, so stride and padding are unchanged), and Δ is a
TR over the flattened (out × in·kh·kw) kernel or a LoCon-style B·A.

Trainable per layer: R_t²·ΣI_d² + {R²·(ΣO_d + ΣI'_d) | r·(out + in·kh·kw)}, I'_d the factors of
in·kh·kw (= in for a Linear).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters.core import AdapterLayer, base_op, layer_shape
from adapters.tensor_ring import (apply_ring_residual, apply_transform, check_factors, factorize,
                                  identity_transform_cores, ring_residual_count, ring_residual_matrix,
                                  transform_count, transform_matrix)

RESIDUALS = ("tr", "lora")
MODE_PRODUCT_COST = 12  # see TLoRA.dense_route


def _options_check(options):
    if options["residual"] not in RESIDUALS:
        raise ValueError(f"TLoRA residual must be one of {RESIDUALS}, got {options['residual']!r}")
    rt = options["transform_rank"]
    if not isinstance(rt, int) or isinstance(rt, bool) or rt < 1:
        raise ValueError(f"TLoRA transform_rank must be a positive integer, got {rt!r}")
    if not isinstance(options["factors"], dict):
        raise ValueError(f"TLoRA factors must be a mapping width -> list of factors, got {options['factors']!r}")


def _factors(width: int, options, what: str) -> tuple[int, ...]:
    override = options["factors"].get(str(width), options["factors"].get(width))
    if override is not None:
        return check_factors(width, override, what)
    return factorize(width, options["order"])


def _shapes(base, options):
    """(out factors, transform factors of in, residual input factors of in·kh·kw)."""
    out_f, in_f, kernel = layer_shape(base)
    what = f"{type(base).__name__}{tuple(base.weight.shape)}"
    flat_in = in_f * math.prod(kernel)
    return (_factors(out_f, options, what), _factors(in_f, options, what), _factors(flat_in, options, what))


class TLoRA(AdapterLayer):
    name = "tlora"
    options = {"transform_rank": 2, "residual": "tr", "order": 3, "factors": {}}
    delta_depends_on_base = True  # W0·(T − I) reads W0
    no_decay = ("tlora_T",)  # identity at init; the reference code decays them by 1e-4, not 1e-2

    def __init__(self, base, cfg):
        super().__init__(cfg)
        _options_check(self.options)
        out_factors, in_factors, flat_in_factors = _shapes(base, self.options)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        rt, rank = self.options["transform_rank"], cfg.rank
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight_shape = tuple(base.weight.shape)
        self.factors = {"out": out_factors, "in": in_factors, "residual_in": flat_in_factors}
        self.tlora_T = nn.ParameterList(nn.Parameter(c.contiguous())
                                        for c in identity_transform_cores(in_factors, rt, **factory))
        out_f, flat_in = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if self.options["residual"] == "tr":
            # B^1 = 0 makes Δ = 0; the other cores are random so that B^1 gets a gradient (the
            # official code's scales: output cores std √O_d / R², input cores std 1/√I_d)
            self.tlora_out = nn.ParameterList(
                nn.Parameter(torch.zeros(f, rank, rank, **factory) if d == 0 else
                             torch.randn(f, rank, rank, **factory) * (math.sqrt(f) / rank ** 2))
                for d, f in enumerate(out_factors))
            self.tlora_in = nn.ParameterList(nn.Parameter(torch.randn(f, rank, rank, **factory) / math.sqrt(f))
                                             for f in flat_in_factors)
        else:
            if rank > min(out_f, flat_in):
                raise ValueError(f"rank {rank} is larger than layer {type(base).__name__}{self.weight_shape} allows "
                                 f"(at most {min(out_f, flat_in)}); lower the rank or exclude that layer")
            A = torch.empty(rank, flat_in, **factory)
            nn.init.kaiming_normal_(A, a=math.sqrt(5))
            self.tlora_A = nn.Parameter(A)
            self.tlora_B = nn.Parameter(torch.zeros(out_f, rank, **factory))

    @classmethod
    def count(cls, base, cfg):
        options = {**cls.options, **cfg.options}
        out_factors, in_factors, flat_in_factors = _shapes(base, options)
        n = transform_count(in_factors, options["transform_rank"])
        if options["residual"] == "tr":
            return n + ring_residual_count(out_factors, flat_in_factors, cfg.rank)
        return n + cfg.rank * (math.prod(out_factors) + math.prod(flat_in_factors))

    def layer_info(self):
        return {"factors": {k: list(v) for k, v in self.factors.items()}, "index_order": "row-major"}

    # -- pieces ------------------------------------------------------------------------------
    def residual_matrix(self) -> torch.Tensor:
        """Δ (unscaled) as a (out, in·kh·kw) matrix."""
        if self.options["residual"] == "tr":
            return ring_residual_matrix(list(self.tlora_out), list(self.tlora_in))
        return self.tlora_B @ self.tlora_A

    def transform(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """T x along one dimension of x (the features of a Linear, the channels of a conv)."""
        if channel_dim in (-1, x.dim() - 1):
            return apply_transform(x, list(self.tlora_T))
        return apply_transform(x.movedim(channel_dim, -1), list(self.tlora_T)).movedim(-1, channel_dim)

    def transform_matrix(self) -> torch.Tensor:
        return transform_matrix(list(self.tlora_T))

    # -- the method interface ----------------------------------------------------------------
    def transformed_weight(self, weight):
        """W0·(T − I): (W0·T)[o, c', ...] = Σ_c W0[o, c, ...] T[c, c']."""
        t = self.transform_matrix().to(weight.dtype)
        if weight.dim() == 2:
            return weight @ t - weight
        return (weight.movedim(1, -1) @ t).movedim(-1, 1) - weight

    def delta_weight(self, weight):
        return self.transformed_weight(weight) + self.scale * self.residual_matrix().to(weight.dtype).view(weight.shape)

    def dense_route(self, rows: int) -> bool:
        """Whether W0·(T − I) as a matrix is cheaper than T x by mode products for `rows` rows of x. The dense
        product costs out·in·kh·kw·in multiply-adds once; the mode products cost rows·in·ΣI_d·R_t² but move
        R_t² copies of x through many small reshapes, which on a CPU made them about 12x slower per flop than a
        matmul (measured on 128- to 2048-wide layers). Training batches and most generation
        inputs take the dense route; few rows into a wide layer (text tokens into a cross-attention) do not."""
        out_f, in_f = self.weight_shape[:2]
        dense = out_f * math.prod(self.weight_shape[1:]) * in_f
        mode = rows * in_f * sum(self.factors["in"]) * self.options["transform_rank"] ** 2 * MODE_PRODUCT_COST
        return dense <= mode

    def forward_delta(self, x, base, base_out):
        """W0·(T x − x) + s·Δ·dropout(x), by the cheaper of two routes (dense_route)."""
        weight = base.weight
        rows = x.numel() // (x.shape[1] if self.is_conv else x.shape[-1])
        residual_x = self.dropout(x)
        if self.dense_route(rows):
            residual = self.residual_matrix().to(weight.dtype).view(weight.shape)
            if residual_x is x:  # no dropout: one product with the whole ΔW
                return base_op(base, x.to(weight.dtype), self.transformed_weight(weight) + self.scale * residual)
            return (base_op(base, x.to(weight.dtype), self.transformed_weight(weight))
                    + self.scale * base_op(base, residual_x.to(weight.dtype), residual))
        shifted = self.transform(x.to(self.tlora_T[0].dtype), -1 if not self.is_conv else 1) - x
        out = base_op(base, shifted.to(weight.dtype), weight)
        residual_x = residual_x.to(self.tlora_T[0].dtype)
        if self.is_conv:
            delta = self.residual_matrix().view(self.weight_shape)
            residual = base_op(base, residual_x, delta)
        elif self.options["residual"] == "tr":
            residual = apply_ring_residual(residual_x, list(self.tlora_out), list(self.tlora_in))
        else:
            residual = F.linear(F.linear(residual_x, self.tlora_A), self.tlora_B)
        return out + self.scale * residual.to(out.dtype)
