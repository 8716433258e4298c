"""LoRA with PEFT semantics: y = W0 x + s·B(A(dropout(x))), ΔW = s·B·A, s = alpha/rank.

Linear: A (r, in), B (out, r). Conv2d: A is a (r, in, kh, kw) conv with the base stride, padding
and dilation, B a 1x1 conv (out, r, 1, 1). A Kaiming-uniform(a=√5) ("gaussian": N(0, 1/r)), B = 0.
Trainable: r·(in·kh·kw + out).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters.core import AdapterLayer, check_rank, conv_args, layer_shape


def low_rank_pair(base, rank, init="kaiming"):
    """Trainable (A, B) shaped for base with ΔW = B·A = 0 at init (shared by LoRA and DoRA)."""
    out_f, in_f, kernel = layer_shape(base)
    check_rank(rank, min(out_f, in_f * math.prod(kernel)), f"layer {type(base).__name__}{tuple(base.weight.shape)}")
    factory = {"device": base.weight.device, "dtype": base.weight.dtype}
    A = torch.empty(rank, in_f, *kernel, **factory)
    if init == "gaussian":
        nn.init.normal_(A, std=1 / rank)
    elif init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    else:
        raise ValueError(f"unknown init {init!r} for LoRA: use 'kaiming' or 'gaussian'")
    B = torch.zeros(out_f, rank, *(1,) * len(kernel), **factory)
    return nn.Parameter(A), nn.Parameter(B)


def low_rank_forward(x, base, A, B):
    """B(A x) with base's op (no scale)."""
    if isinstance(base, nn.Linear):
        return F.linear(F.linear(x, A), B)
    return F.conv2d(F.conv2d(x, A, None, **conv_args(base)), B)


def low_rank_delta(A, B, shape):
    return (B.flatten(1) @ A.flatten(1)).view(shape)


class LoRA(AdapterLayer):
    name = "lora"
    options = {"init": "kaiming"}

    def __init__(self, base, cfg):
        super().__init__(cfg)
        self.lora_A, self.lora_B = low_rank_pair(base, cfg.rank, self.options["init"])

    @classmethod
    def count(cls, base, cfg):
        out_f, in_f, kernel = layer_shape(base)
        return cfg.rank * (in_f * math.prod(kernel) + out_f)

    def delta_weight(self, weight):
        return self.scale * low_rank_delta(self.lora_A, self.lora_B, weight.shape)

    def forward_delta(self, x, base, base_out):
        return self.scale * low_rank_forward(self.dropout(x).to(self.lora_A.dtype), base, self.lora_A, self.lora_B)
