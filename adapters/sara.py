"""SaRA (Hu et al., ICLR 2025): progressive sparse low-rank adaptation of the small weights.

Selection: one global absolute threshold θ over every eligible parameter tensor (the paper adapts
every tensor of the UNet: targets="all"), M = |P0| < θ, computed in fp32. options["fraction"]
instead picks θ so that that fraction of the eligible scalars is selected (one global θ, found over
all targets at once and written back into options["threshold"] so the saved config records it).

Model: P = P0 + ΔP with ΔP zero off M. The trainable object per tensor is a 1-D vector
`sara_delta` (ΔP on M, init 0, so P = P0 exactly at step 0; the official code wrote |V| here and
flipped small negative weights). In training the values are written into the frozen tensor's own
storage on M (write_into: no dense copy per forward, the paper's "unstructured backpropagation");
the gradient is dL/dΔ = (dL/dP)[M], so the frozen tensors get no gradient and no optimiser state.
Where the core cannot write in place (several adapters on a tensor, one merged) a custom op scatters
ΔP into P's shape out of place, with the same backward.

Low-rank regulariser: λ·‖P ⊙ M‖_* on the masked matrix built FROM sara_delta (so, unlike the
official UB code, its gradient reaches the trainable values); after the progressive switch on the
reduced mask M2, as the official code does. One pseudo-random tensor per step (seeded by the step, so
a resumed run picks the same ones); weight options["rank_weight"]. Eligible: every tensor of >= 2 dims
(convs flattened), not only the official code's 2-D ones with min(out, in) > 64 (docs/adapters-sara-tlora.md).

Progressive adjustment (after options["progressive_at"] steps: an int, or a fraction of training,
default 0.5): entries whose |P| grew to >= θ are frozen at their current value (kept in the
buffer `sara_frozen`, read instead of sara_delta there, gradient zero), the rest keep training
with fresh optimiser state. The switch lives in buffers, so it survives save/resume.

Training-loop hooks, per layer as studio/train.py calls them (module functions do the same over a
handle): regularization_loss(), on_step(step, optimizer) -> skip, training_state(). A fractional
progressive_at needs options["total_steps"].

On disk (safetensors): per tensor `sara_indices` (flat int32 positions of M, a fingerprint of the
base weights), `sara_delta`, `sara_trainable` (bool), `sara_frozen`, `sara_progressed`.
"""
from __future__ import annotations

import math
import random

import torch
from torch import nn

from adapters.core import AdapterLayer

_EXACT_SELECTION_LIMIT = 1 << 26  # above this many scalars, find the fraction's θ by bisection


class _ScatterValues(torch.autograd.Function):
    """Dense tensor of `shape` holding `values` at the flat `indices`, zero elsewhere.
    Backward: dL/dvalues = (dL/dW)[indices]; nothing dense is kept or returned."""

    @staticmethod
    def forward(ctx, values, indices, shape, dtype):
        ctx.save_for_backward(indices)
        ctx.values_dtype = values.dtype
        out = torch.zeros(math.prod(shape), dtype=dtype, device=values.device)
        out.index_put_((indices,), values.to(dtype))  # int32 positions are fine here (not for index_copy_)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad.reshape(-1).index_select(0, indices).to(ctx.values_dtype), None, None, None


class _WriteValues(torch.autograd.Function):
    """The in-place forward: P0 + w·ΔP written into the frozen tensor's own storage on M (through .data,
    outside autograd's version counting: the values cannot change between this forward and its backward
    in a training step). Returns an alias of that storage whose gradient is dL/dvalues = w·(dL/dW)[M]:
    the dense dL/dW exists only transiently inside the layer's backward, and no dense copy is kept."""

    @staticmethod
    def forward(ctx, weight, values, indices, p0, w):
        _put(weight, indices, p0 + w * values)
        ctx.save_for_backward(indices)
        ctx.w, ctx.values_dtype = w, values.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, (ctx.w * grad.reshape(-1).index_select(0, indices)).to(ctx.values_dtype), None, None, None


def _flat_storage(weight):
    """weight.data as one flat run of its storage, and a map from logical flat indices to positions in it.
    Covers contiguous and channels-last tensors (the layouts a model runs in); None for anything else."""
    data = weight.data
    if data.is_contiguous():
        return data.view(-1), None
    if data.dim() == 4 and data.is_contiguous(memory_format=torch.channels_last):
        strides = data.stride()

        def position(indices):
            coords = torch.unravel_index(indices.long(), data.shape)
            return sum(c * s for c, s in zip(coords, strides))
        return data.as_strided((data.numel(),), (1,)), position
    return None, None


def _put(weight, indices, values) -> bool:
    """weight[logical flat indices] = values, in place; False when the layout is not one _flat_storage maps."""
    flat, position = _flat_storage(weight)
    if flat is None:
        return False
    flat.index_put_((indices if position is None else position(indices),), values.to(weight.dtype))
    return True


def scatter_values(values, indices, shape, dtype=None) -> torch.Tensor:
    return _ScatterValues.apply(values, indices, tuple(shape), dtype or values.dtype)


def _check_options(options):
    threshold, fraction = options["threshold"], options["fraction"]
    if fraction is not None:
        if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"SaRA fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(threshold, (int, float)) or not float(threshold) > 0.0:
        raise ValueError(f"SaRA threshold must be a positive number, got {threshold!r}")
    if not isinstance(options["rank_weight"], (int, float)) or options["rank_weight"] < 0:
        raise ValueError(f"SaRA rank_weight must be >= 0, got {options['rank_weight']!r}")
    at = options["progressive_at"]
    ok = at is None or (isinstance(at, int) and not isinstance(at, bool) and at >= 0) or \
        (isinstance(at, float) and 0.0 < at < 1.0)
    total = options["total_steps"]
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 1):
        raise ValueError(f"SaRA total_steps must be a positive integer, got {total!r}")
    if not ok:
        raise ValueError(f"SaRA progressive_at must be a step (int >= 1), a fraction of training in (0, 1), "
                         f"or 0/None to disable, got {at!r}")


def threshold_for_fraction(tensors, fraction: float) -> float:
    """The global θ for which |p| < θ selects (at least, ties included) round(fraction·N) scalars."""
    flat = [t.detach().reshape(-1).abs().float() for t in tensors]
    total = sum(t.numel() for t in flat)
    k = max(1, round(fraction * total))
    if k >= total:
        return math.inf
    if total <= _EXACT_SELECTION_LIMIT:
        kth = torch.cat([t.cpu() for t in flat]).kthvalue(k).values
        return float(torch.nextafter(kth, torch.tensor(math.inf)))
    lo, hi = 0.0, max(float(t.max()) for t in flat) * 2 + 1e-30  # count(|p| < θ) is monotone in θ
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(int((t < mid).sum()) for t in flat) >= k:
            hi = mid
        else:
            lo = mid
    return hi


class SaRA(AdapterLayer):
    name = "sara"
    kind = "parameter"
    options = {"threshold": 2e-3, "fraction": None, "rank_weight": 5e-4, "progressive_at": 0.5, "total_steps": None}
    fingerprints = ("sara_indices",)

    def __init__(self, base, cfg):
        super().__init__(cfg)
        _check_options(self.options)
        self.threshold = float(self.options["threshold"])
        self.shape = tuple(base.shape)
        self._select(base, (base.detach().float().abs().reshape(-1) < self.threshold).nonzero().reshape(-1))
        self.regularizer_calls = 0
        # the layers of this adapter, in build order (shared through the config object they are built from)
        self._siblings = cfg.__dict__.setdefault("_sara_layers", [])
        self._siblings.append(self)
        self._eligible = None

    def _select(self, base, indices):
        """Set M (flat positions) and the per-entry state: ΔP = 0, so P = P0."""
        index_dtype = torch.int32 if base.numel() < 2 ** 31 else torch.int64
        indices = indices.to(device=base.device, dtype=index_dtype)
        self.register_buffer("sara_indices", indices)
        # P0 on M, recomputed from the base tensor (not saved): needed for |P| and the rank term
        self.register_buffer("p0", base.detach().float().reshape(-1).index_select(0, indices), persistent=False)
        self.sara_delta = nn.Parameter(torch.zeros(len(indices), dtype=torch.float32, device=base.device))
        self.register_buffer("sara_trainable", torch.ones(len(indices), dtype=torch.bool, device=base.device))
        self.register_buffer("sara_frozen", torch.zeros(len(indices), dtype=torch.float32, device=base.device))
        self.register_buffer("sara_progressed", torch.zeros(1, dtype=torch.bool, device=base.device))
        self.is_matrix = base.dim() >= 2 and min(self.shape[0], math.prod(self.shape[1:])) >= 2 and len(indices) > 0

    @classmethod
    def from_saved(cls, base, cfg, saved: dict):
        """Core hook for loading a saved adapter. On a half-precision base, |p| < θ on the rounded weights can
        differ from the fp32 selection the adapter was trained with, for entries within rounding of θ. The
        saved selection is taken when it agrees with this base up to that rounding; otherwise the layer is
        built as usual and the fingerprint check reports a different base."""
        layer = cls(base, cfg)
        indices = saved.get("sara_indices")
        if indices is None or base.dtype == torch.float32 or indices.dim() != 1 or \
                torch.equal(indices.to(layer.sara_indices.dtype).cpu(), layer.sara_indices.cpu()):
            return layer
        indices = indices.long().cpu()
        magnitude = base.detach().float().abs().reshape(-1).cpu()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= magnitude.numel()):
            return layer
        chosen = torch.zeros(magnitude.numel(), dtype=torch.bool)
        chosen[indices] = True
        margin = layer.threshold * torch.finfo(base.dtype).eps  # more than half a unit of rounding near θ
        if bool((chosen & (magnitude >= layer.threshold + margin)).any()) or \
                bool((~chosen & (magnitude < layer.threshold - margin)).any()):
            return layer
        layer._select(base, indices)
        return layer

    @classmethod
    def count(cls, base, cfg):
        threshold = float({**cls.options, **cfg.options}["threshold"])
        return int((base.detach().float().abs() < threshold).sum())

    @classmethod
    def prepare_targets(cls, cfg, tensors: dict) -> dict:
        """Core hook, before the layers are built: turn a target fraction into the one global θ
        (recorded in cfg.options["threshold"]) and drop tensors with nothing below θ."""
        options = {**cls.options, **cfg.options}
        _check_options(options)
        cfg.__dict__["_sara_layers"] = []  # a new attach: a new group of sibling layers
        if options["fraction"] is not None:
            cfg.options["threshold"] = threshold_for_fraction(tensors.values(), float(options["fraction"]))
        threshold = float({**cls.options, **cfg.options}["threshold"])
        kept = {path: t for path, t in tensors.items() if bool((t.detach().abs() < threshold).any())}
        if not kept:
            raise ValueError(f"SaRA threshold {threshold:g} selects no parameter in the targets: raise it or use "
                             f"options={{'fraction': 0.01}}")
        return kept

    # -- values ------------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """ΔP on M as trained: frozen entries (after the progressive switch) read their snapshot."""
        if not bool(self.sara_progressed):
            return self.sara_delta
        return torch.where(self.sara_trainable, self.sara_delta, self.sara_frozen)

    def num_selected(self) -> int:
        """Entries that still train (|M| before the progressive switch, |M2| after)."""
        return int(self.sara_trainable.sum())

    def delta_weight(self, weight):
        return scatter_values(self.values(), self.sara_indices, weight.shape, weight.dtype)

    def write_into(self, weight, w: float):
        """Core hook: the adapted tensor without a dense copy (see _WriteValues); None declines (the core
        then adds delta_weight out of place), for a layout other than contiguous or channels-last."""
        if weight.shape != self.shape or _flat_storage(weight)[0] is None:
            return None
        return _WriteValues.apply(weight, self.values(), self.sara_indices, self.p0, float(w))

    @torch.no_grad()
    def restore_into(self, weight):
        """Put P0 back on M (p0 holds the exact base values: fp32 is exact for every float dtype). The layout
        may have changed since the write (model.to(memory_format=...)); the logical positions have not."""
        if not _put(weight, self.sara_indices, self.p0):
            weight.data.copy_(weight.data.contiguous().view(-1).index_put_((self.sara_indices,), self.p0.to(weight.dtype))
                              .view(weight.shape))

    def nuclear_norm(self) -> torch.Tensor:
        """‖P ⊙ M‖_*: the masked matrix (small pretrained values + their updates), built from
        sara_delta so that the gradient reaches it; after the progressive switch ‖P ⊙ M2‖_*, the
        entries frozen there left out. Convs are flattened to (out, in·kh·kw)."""
        entries = self.p0 + self.values()
        if bool(self.sara_progressed):
            entries = torch.where(self.sara_trainable, entries, torch.zeros_like(entries))
        masked = scatter_values(entries, self.sara_indices, self.shape)
        return torch.linalg.svdvals(masked.reshape(self.shape[0], -1)).sum()

    @torch.no_grad()
    def progress(self) -> tuple[int, int]:
        """Freeze the entries whose |P0 + ΔP| reached θ. Returns (trainable before, after)."""
        before = self.num_selected()
        grown = self.sara_trainable & ((self.p0 + self.sara_delta).abs() >= self.threshold)
        self.sara_frozen.copy_(torch.where(grown, self.sara_delta, self.sara_frozen))
        self.sara_trainable &= ~grown
        self.sara_progressed.fill_(True)
        return before, self.num_selected()

    # -- training-loop hooks (studio/train.py looks them up on every adapter layer) -----------
    def regularization_loss(self) -> torch.Tensor | None:
        """λ·‖P ⊙ M‖_* of ONE tensor per call round: every layer of the adapter is asked once per
        micro-step, and only the one drawn for that round (seeded by the round number, so a resumed
        run draws the same) answers; the others return None."""
        round_, self.regularizer_calls = self.regularizer_calls, self.regularizer_calls + 1
        weight = float(self.options["rank_weight"])
        if weight == 0.0 or not self.is_matrix:
            return None
        if self._eligible is None:
            self._eligible = [layer for layer in self._siblings if layer.is_matrix]
        if self._eligible[random.Random(round_).randrange(len(self._eligible))] is not self:
            return None
        return weight * self.nuclear_norm()

    def switch_step(self) -> int | None:
        at, total = self.options["progressive_at"], self.options["total_steps"]
        if not at:
            return None
        if isinstance(at, float):
            if not total:
                raise ValueError(f"SaRA progressive_at={at} is a fraction of training: set options total_steps "
                                 f"(the run's steps) or give progressive_at as a step number")
            return max(1, round(at * int(total)))
        return at

    def on_step(self, step: int, optimizer=None) -> bool:
        """Called before each optimizer.step() with the number of updates done. At the switch step:
        freeze the grown entries, drop this tensor's optimiser state (fresh moments for the rest)
        and skip that update (as the official code does). Returns True when the update is skipped."""
        at = self.switch_step()
        if at is None or step < at or bool(self.sara_progressed):
            return False
        self.progress()
        if optimizer is not None:
            optimizer.state.pop(self.sara_delta, None)
        self.sara_delta.grad = None
        return True

    def training_state(self) -> dict:
        return {"regularizer_calls": self.regularizer_calls}

    def load_training_state(self, state: dict):
        self.regularizer_calls = int(state.get("regularizer_calls", 0))


# -- the same hooks over a whole adapter (for loops other than studio/train.py) --------------------

def regularization_loss(handle) -> torch.Tensor | None:
    terms = [t for t in (layer.regularization_loss() for layer in handle.layers.values()) if t is not None]
    return sum(terms) if terms else None


def on_step(handle, step: int, optimizer=None) -> bool:
    """Returns True when this update must be skipped (the progressive switch happened now)."""
    return any([layer.on_step(step, optimizer) for layer in handle.layers.values()])


def progressive_update(handle, optimizer=None) -> tuple[int, int]:
    """Re-select now, whatever the step: (trainable entries before, after)."""
    before = after = 0
    for layer in handle.layers.values():
        b, a = layer.progress()
        before, after = before + b, after + a
        if optimizer is not None:
            optimizer.state.pop(layer.sara_delta, None)
        layer.sara_delta.grad = None
    return before, after


def num_selected(handle) -> int:
    """Entries that still train, over the whole adapter (|M|, or |M2| after the switch)."""
    return sum(layer.num_selected() for layer in handle.layers.values())
