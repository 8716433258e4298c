"""DoRA with PEFT semantics: W' = diag(m / n)·(W0 + s·B·A), n = per-output-row norm of (W0 + s·B·A),
detached from autograd. m (one per output row / channel) starts at ‖W0‖ so W' = W0 at step 0.

Forward (as PEFT): y = base(x) + (m/n − 1)⊙(W0 x) + (m/n)⊙ s·B(A x); the bias is added once.
Trainable: r·(in·kh·kw + out) + out. ΔW = W' − W0 depends on W0, so merge keeps the exact ΔW it
added and unmerge subtracts it.
"""
import math

import torch
from torch import nn

from adapters.core import AdapterLayer, base_op, layer_shape
from adapters.lora import low_rank_delta, low_rank_forward, low_rank_pair


def row_norm(weight):
    return weight.flatten(1).norm(dim=1)


class DoRA(AdapterLayer):
    name = "dora"
    options = {"init": "kaiming"}
    delta_depends_on_base = True
    no_decay = ("dora_magnitude",)  # the base's row norms, not zero, are neutral

    def __init__(self, base, cfg):
        super().__init__(cfg)
        self.lora_A, self.lora_B = low_rank_pair(base, cfg.rank, self.options["init"])
        self.dora_magnitude = nn.Parameter(row_norm(base.weight.detach()).to(self.lora_A.dtype))

    @classmethod
    def count(cls, base, cfg):
        out_f, in_f, kernel = layer_shape(base)
        return cfg.rank * (in_f * math.prod(kernel) + out_f) + out_f

    def _combined(self, weight):
        return weight.to(self.lora_A.dtype) + self.scale * low_rank_delta(self.lora_A, self.lora_B, weight.shape)

    def _ratio(self, weight):
        with torch.no_grad():  # n is a constant for autograd: build no graph (and save no weight-sized tensor)
            norm = row_norm(self._combined(weight))
        return self.dora_magnitude / norm

    def delta_weight(self, weight):
        ratio = self._ratio(weight)
        return ratio.view(-1, *(1,) * (weight.dim() - 1)) * self._combined(weight) - weight

    def forward_delta(self, x, base, base_out):
        ratio = self._ratio(base.weight)
        x = x.to(self.lora_A.dtype)
        dropped = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:  # reuse base(x) minus bias, as PEFT does
            plain = base_out if base.bias is None else base_out - _channel(base.bias, base_out, base)
        else:
            plain = base_op(base, dropped, base.weight)
        ratio = _channel(ratio, plain, base)
        lora = self.scale * low_rank_forward(dropped, base, self.lora_A, self.lora_B)
        return (ratio - 1) * plain + ratio * lora


def _channel(vector, like, base):
    """Broadcast a per-output vector over a Linear (last dim) or Conv2d (dim 1) output."""
    if isinstance(base, nn.Linear):
        return vector
    return vector.view(1, -1, 1, 1)
