"""FLoRA: a low-rank Tucker core that keeps a conv kernel 4-D (and its 2-D form for Linear).

Mode order follows the official code, (in, out, spatial...):
  Conv2d: ΔW[o,c,h,w] = s·Σ G[a,b,p,q]·A_in[c,a]·A_out[o,b]·A_h[h,p]·A_w[w,q]
          G (r_in, r_out, r_h, r_w), A_in (in, r_in), A_out (out, r_out), A_h (kh, r_h), A_w (kw, r_w)
  Linear: ΔW = s·A_out·Gᵀ·A_inᵀ, G (r_in, r_out)
Ranks: r_in = r_out = rank unless options "rank_in"/"rank_out" say otherwise; r_h = kh, r_w = kw unless
"rank_h"/"rank_w" (each at most the kernel size). s = alpha/rank (alpha defaults to rank: s = 1).
Init: G = 0 (ΔW = 0 exactly), factors Kaiming-normal(a=√3) -> N(0, 1/(2·r_i)).
Forward is factorised (no dense ΔW): 1x1 conv by A_inᵀ, a kh×kw conv with G×A_h×A_w at the base
stride/padding/dilation, 1x1 conv by A_out. Trainable: conv r_in·r_out·r_h·r_w + in·r_in + out·r_out
+ kh·r_h + kw·r_w; Linear r_in·r_out + in·r_in + out·r_out.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters.core import AdapterLayer, check_rank, conv_args, layer_shape


def _factor(n, r, factory):
    t = torch.empty(n, r, **factory)
    nn.init.kaiming_normal_(t, a=math.sqrt(3))
    return nn.Parameter(t)


class FLoRA(AdapterLayer):
    name = "flora"
    options = {"rank_in": None, "rank_out": None, "rank_h": None, "rank_w": None}

    @classmethod
    def ranks(cls, base, cfg):
        opts = {**cls.options, **cfg.options}
        out_f, in_f, kernel = layer_shape(base)
        r_in, r_out = opts["rank_in"] or cfg.rank, opts["rank_out"] or cfg.rank
        what = f"layer {type(base).__name__}{tuple(base.weight.shape)}"
        check_rank(r_in, in_f, f"{what} on its input mode")
        check_rank(r_out, out_f, f"{what} on its output mode")
        if not kernel:
            return r_in, r_out
        r_h, r_w = opts["rank_h"] or kernel[0], opts["rank_w"] or kernel[1]
        check_rank(r_h, kernel[0], f"{what} on its kernel height")
        check_rank(r_w, kernel[1], f"{what} on its kernel width")
        return r_in, r_out, r_h, r_w

    def __init__(self, base, cfg):
        super().__init__(cfg)
        ranks = self.ranks(base, cfg)
        out_f, in_f, kernel = layer_shape(base)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.flora_G = nn.Parameter(torch.zeros(*ranks, **factory))
        self.flora_A_in = _factor(in_f, ranks[0], factory)
        self.flora_A_out = _factor(out_f, ranks[1], factory)
        if kernel:
            self.flora_A_h = _factor(kernel[0], ranks[2], factory)
            self.flora_A_w = _factor(kernel[1], ranks[3], factory)

    @classmethod
    def count(cls, base, cfg):
        ranks = cls.ranks(base, cfg)
        out_f, in_f, kernel = layer_shape(base)
        dims = (in_f, out_f, *kernel)
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks))

    def _spatial_core(self):
        """G ×3 A_h ×4 A_w as a conv kernel (r_out, r_in, kh, kw)."""
        return torch.einsum("abpq,hp,wq->bahw", self.flora_G, self.flora_A_h, self.flora_A_w)

    def delta_weight(self, weight):
        if weight.dim() == 2:
            return self.scale * (self.flora_A_out @ self.flora_G.T @ self.flora_A_in.T)
        return self.scale * torch.einsum("bahw,ca,ob->ochw", self._spatial_core(), self.flora_A_in, self.flora_A_out)

    def forward_delta(self, x, base, base_out):
        x = self.dropout(x).to(self.flora_G.dtype)
        if isinstance(base, nn.Linear):
            return self.scale * F.linear(F.linear(F.linear(x, self.flora_A_in.T), self.flora_G.T), self.flora_A_out)
        h = F.conv2d(x, self.flora_A_in.T[:, :, None, None])
        h = F.conv2d(h, self._spatial_core(), None, **conv_args(base))
        return self.scale * F.conv2d(h, self.flora_A_out[:, :, None, None])
