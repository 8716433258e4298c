"""LoLDU: pivoted LU of the frozen weight, W0 = P·L·diag(D)·Ū, with only a diagonal trained.

Keep the first r pivots: ΔW = P·L_r·diag(σ·z − σ0·z0)·Ū_r, where z ∈ R^r (init z0) and the scalar σ
(init σ0 = alpha/rank) are trainable: r + 1 parameters per layer ("train_sigma": False gives r).
This equals the paper's W_res + σ·P·L_r·diag(z)·Ū_r with W_res = W0 − σ0·P·L_r·diag(z0)·Ū_r, but
keeps W0 untouched, so several adapters can share a layer. Conv2d: the kernel is flattened to
(out, in·kh·kw) and Ū_r runs as a conv with the base stride/padding, P·L_r as a 1x1 conv.

The decomposition runs in fp32 on the base weight at attach/load time; P·L_r is stored pre-permuted
(no dense P). The LU pivots are saved as a fingerprint: loading onto different base weights fails.
z0 ("init"): "lu" = D_r (default), "uniform" U(−m/2, m/2), "constant" m, "normal" N(mean, std of D_r),
with m = |mean(D_r)|.
"""
import torch
import torch.nn.functional as F
from torch import nn

from adapters.core import AdapterLayer, check_rank, conv_args, layer_shape


class LoLDU(AdapterLayer):
    name = "loldu"
    options = {"init": "lu", "train_sigma": True}
    fingerprints = ("loldu_pivots",)
    no_decay = ("loldu_z", "loldu_sigma")  # the LU diagonal and the scale: zero would erase the update

    def __init__(self, base, cfg):
        super().__init__(cfg)
        weight = base.weight.detach()
        flat = weight.float().flatten(1)
        r = cfg.rank
        check_rank(r, min(flat.shape), f"layer {type(base).__name__}{tuple(weight.shape)}")
        lu, pivots = torch.linalg.lu_factor(flat)
        P, L, U = torch.lu_unpack(lu, pivots)
        D = U.diagonal()[:r]
        if (D == 0).any():
            raise ValueError(f"layer {type(base).__name__}{tuple(weight.shape)} has rank below {r} (a zero LU pivot); "
                             f"lower the rank or exclude the layer")
        z0 = self._init_z0(D, self.options["init"])
        dtype = weight.dtype
        self.register_buffer("loldu_PL", (P @ L[:, :r]).to(dtype), persistent=False)  # out × r, rows permuted
        self.register_buffer("loldu_U", (U[:r] / D[:, None]).to(dtype), persistent=False)  # r × in·kh·kw, unit diagonal
        self.register_buffer("loldu_pivots", pivots.to(torch.int32))
        self.register_buffer("loldu_z0", z0.to(dtype))
        self.register_buffer("loldu_sigma0", torch.tensor(float(cfg.scale), dtype=dtype))
        self.loldu_z = nn.Parameter(z0.to(dtype).clone())
        sigma = torch.tensor(float(cfg.scale), dtype=dtype)
        if self.options["train_sigma"]:
            self.loldu_sigma = nn.Parameter(sigma)
        else:
            self.register_buffer("loldu_sigma", sigma)
        self._kernel = tuple(weight.shape[1:])

    @staticmethod
    def _init_z0(D, init):
        m = D.mean().abs()
        if init == "lu":
            return D.clone()
        if init == "uniform":
            return (torch.rand_like(D) - 0.5) * m
        if init == "constant":
            return torch.full_like(D, float(m))
        if init == "normal":
            return torch.randn_like(D) * D.std() + D.mean()
        raise ValueError(f"unknown LoLDU init {init!r}: use lu, uniform, constant or normal")

    @classmethod
    def count(cls, base, cfg):
        return cfg.rank + (1 if {**cls.options, **cfg.options}["train_sigma"] else 0)

    def _coefficients(self):
        return self.loldu_sigma * self.loldu_z - self.loldu_sigma0 * self.loldu_z0

    def delta_weight(self, weight):
        return ((self.loldu_PL * self._coefficients()) @ self.loldu_U).view(weight.shape)

    def forward_delta(self, x, base, base_out):
        x = self.dropout(x).to(self.loldu_U.dtype)
        c = self._coefficients().to(x.dtype)  # fp32 trainables on a half-precision base
        if isinstance(base, nn.Linear):
            return F.linear(F.linear(x, self.loldu_U) * c, self.loldu_PL)
        U = self.loldu_U.view(self.rank, *self._kernel)
        h = F.conv2d(x, U, None, **conv_args(base)) * c.view(1, -1, 1, 1)
        return F.conv2d(h, self.loldu_PL[:, :, None, None])
