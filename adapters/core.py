"""The adapter core: everything every method shares, written once.

What the core does: resolve targets (presets or module-name patterns), wrap nn.Linear / nn.Conv2d
(or parametrize any parameter tensor), keep several named adapters per site with weights, merge /
unmerge, adapter-only state dicts, and validation that leaves the model untouched on any error.
Files on disk live in adapters/io.py.

THE METHOD INTERFACE (what a method file defines)
-------------------------------------------------
A method is one file adapters/<name>.py with one subclass of `AdapterLayer`, registered by one line
in adapters/registry.py: `"<name>": "adapters.<name>:<Class>"`. The core builds one instance per
adapted site (a layer, or a parameter tensor) and owns everything else. The subclass defines:

  name = "<name>"            registry name; its tensors should be prefixed with it ("lora_A", "loldu_z").
  kind = "module"            "module": wraps an nn.Linear or a groups=1 nn.Conv2d; __init__ gets
                             that module as `base`. "parameter": adapts ONE parameter tensor of any
                             module (weight, bias, norm affine, embedding: e.g. SaRA); __init__ gets
                             the frozen tensor as `base`, only delta_weight() is used, and the core
                             installs it through torch.nn.utils.parametrize (gradient accumulation,
                             autograd and merge all work through the parametrization). Optional, for
                             sparse deltas: write_into(weight, w) writes P0 + w·ΔP into the frozen
                             tensor's storage and returns an alias routing the gradient to the
                             trainable values (or None to decline), restore_into(weight) writes P0
                             back; the core then never builds a dense copy of the tensor.
  options = {...}            method-specific hyper-parameters with their defaults; cfg.options is
                             checked against these keys, and self.options holds the merged values.
  __init__(self, base, cfg)  call super().__init__(cfg); create the trainable nn.Parameters and the
                             frozen buffers. The effective weight must equal the base weight at
                             init (ΔW == 0 exactly). Raise ValueError for an impossible config
                             (rank too large, wrong layer type) naming the layer.
  delta_weight(self, weight) dense ΔW in `weight`'s shape such that the adapted weight is
                             weight + ΔW. A multiplicative method (W0·T + sΔ) returns W0·T + sΔ − W0.
                             Used by merge, export_lora and the parameter kind's forward.
  forward_delta(self, x, base, base_out)   (module kind, optional) what this adapter adds to
                             base_out = base(x). Default: base's op (linear/conv, same stride and
                             padding) with delta_weight(base.weight), no bias. Override it for a
                             factorised forward (LoRA: B(A x)) or a multiplicative one (TLoRA:
                             W0·(T x − x) + sΔx).
  delta_depends_on_base = False   True when delta_weight reads `weight` (DoRA, TLoRA): merge then
                             keeps the ΔW it added so that unmerge subtracts exactly that.
  fingerprints = ()          names of persistent buffers recomputed from the base weight (e.g. LU
                             pivots) that must equal the saved ones on load, else the file belongs
                             to another base model and loading fails.
  layer_info(self) -> dict   (optional) per-site JSON kept in adapter_config.json.
  no_decay = ()              name prefixes of trainable tensors that weight decay must not touch,
                             because zero is not their neutral value (TLoRA's transform cores are
                             identity at init, DoRA's magnitudes are the row norms, LoLDU's scalars
                             the LU diagonal): decay would pull them away from the base model.
  count(cls, base, cfg) -> int   (optional classmethod) the spec's trainable-count formula.
  prepare_targets(cls, cfg, tensors) -> tensors   (optional classmethod, parameter kind) sees every
                             targeted tensor {path: tensor} before any layer is built, for a choice
                             over all of them (SaRA: one global θ for a target fraction, recorded
                             in cfg.options); may drop paths. Not called when loading a saved file.

Helpers for methods: self.scale (alpha/rank, or alpha/sqrt(rank) with rslora), self.rank,
self.dropout (nn.Dropout or nn.Identity), layer_shape(base), conv_args(base), base_op(base, x, w).

Several adapters at once: y = base(x) + Σ_i w_i · forward_delta_i(x); for the parameter kind
P = P0 + Σ_i w_i · ΔP_i. The weights w_i are plain floats, changeable at any time (set_weight).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from adapters.registry import METHODS

_RECORDS = "_studio_adapters"  # attribute on the adapted model: {name: _Record}

# Module-name regexes (matched in full against the module path), one set for every family.
# UNet2DConditionModel (SD1.x/2.x/SDXL): attn1 (self) and attn2 (cross) of each transformer block; ff = GEGLU
#   net.0.proj + net.2; conv = resnet and down/up-sampler convs (not conv_in/conv_out: 4-channel edges whose
#   rank limit is tiny).
# DiTs: PixArt attn1/attn2; SD3/3.5 joint blocks' `attn` (image to_q/k/v, to_out.0 and context add_q/k/v_proj,
#   to_add_out) and SD3.5's extra image self-attention `attn2`; Flux double-stream blocks name theirs as SD3, and
#   single-stream blocks have attn.to_q/k/v only. ff = ff and ff_context, and in Flux single-stream blocks
#   proj_mlp (D -> 4D) and proj_out. That proj_out maps [attention out | MLP hidden] (5D) -> D: the attention
#   output projection and the MLP down-projection fused. It goes in ff, not attn, because 4/5 of it is the MLP
#   half; "attn" then stays attention-sized on Flux (per double block 8 Linears, per single block 3) and
#   "attn+ff" still covers every block Linear. DiT blocks hold no convolutions: "conv" matches nothing there,
#   so UNet-minded defaults such as "attn+conv" mean "attn" on a DiT.
# Never matched by attn/ff/conv: adaLN and norm Linears (norm1.linear, norm.linear, norm_out, adaln_single),
# timestep/text/guidance embedders, patch embedding, the UNet's proj_in/proj_out and the final proj_out.
_ATTN = r"(.*\.)?attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FF = r"(.*\.)?(ff|ff_context)\.net\.(0\.proj|2)|(.*\.)?proj_mlp|(.*\.)?single_transformer_blocks\.\d+\.proj_out"
_CONV = r"(.*\.)?(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(downsamplers|upsamplers)\.\d+\.conv)"
PRESETS = {"attn": [_ATTN], "ff": [_FF], "conv": [_CONV], "all": [r".*"]}


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(import_module(module), cls)


@dataclass
class AdapterConfig:
    """What to attach. targets: a preset ("attn", "attn+ff", "conv", "all", or presets joined by '+')
    or a list of module-name patterns (exact path, path suffix after a '.', or a full regex)."""
    method: str
    rank: int = 4
    alpha: float | None = None       # scale = alpha / rank; None -> alpha = rank (scale 1)
    targets: str | list = "attn"
    dropout: float = 0.0
    rslora: bool = False             # scale = alpha / sqrt(rank)
    options: dict = field(default_factory=dict)
    base_model: str | None = None

    def __post_init__(self):
        cls = method_class(self.method)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        unknown = set(self.options) - set(cls.options)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {self.method!r}; "
                             f"it takes {sorted(cls.options) or 'none'}")
        if isinstance(self.targets, str):
            bad = [p for p in self.targets.split("+") if p not in PRESETS]
            if bad:
                raise ValueError(f"unknown target preset {'+'.join(bad)!r}: use {', '.join(PRESETS)} (joined by '+') "
                                 f"or a list of module-name patterns")
        elif not (isinstance(self.targets, (list, tuple)) and self.targets and all(isinstance(t, str) for t in self.targets)):
            raise ValueError(f"targets must be a preset name or a non-empty list of module-name patterns, got {self.targets!r}")
        else:
            self.targets = list(self.targets)
            for pattern in self.targets:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"target pattern {pattern!r} is not a valid regex ({err})") from None

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else float(self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "method" not in known:
            raise ValueError("adapter config has no 'method' field")
        return cls(**known)


# ----------------------------------------------------------------------------------------------
# helpers for method files

def layer_shape(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear (kernel ()) or a Conv2d (kernel (kh, kw))."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features, ()
    return base.out_channels, base.in_channels, tuple(base.kernel_size)


def conv_args(base: nn.Conv2d) -> dict:
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}


def base_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """base's linear map with another weight and no bias."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, **conv_args(base))


def check_rank(rank: int, limit: int, what: str):
    if rank > limit:
        raise ValueError(f"rank {rank} is larger than {what} allows (at most {limit}); lower the rank "
                         f"or exclude that layer from targets")


class AdapterLayer(nn.Module):
    """Base class of one method's layer at one site (see the module docstring for the contract)."""
    name = "base"
    kind = "module"
    options: dict = {}
    delta_depends_on_base = False
    fingerprints: tuple = ()
    no_decay: tuple = ()

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.rank = cfg.rank
        self.scale = cfg.scale
        self.options = {**type(self).options, **cfg.options}
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_delta(self, x, base, base_out):
        delta = self.delta_weight(base.weight)
        return base_op(base, self.dropout(x).to(delta.dtype), delta)

    def layer_info(self) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------
# sites: one per adapted layer / parameter, holding every adapter attached there

class _Site(nn.Module):
    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.merged: dict[str, tuple[float, torch.Tensor | None]] = {}  # name -> (weight, cached ΔW)

    def active(self):
        return [(n, layer, self.weights[n]) for n, layer in self.adapters.items()
                if n not in self.merged and self.weights[n] != 0.0]

    @torch.no_grad()
    def merge(self, name):
        if name in self.merged:
            return
        layer, w = self.adapters[name], self.weights[name]
        weight = self.base_weight()
        # a method whose ΔW depends on W0 (DoRA) must see W0, not W0 plus other merged adapters
        reference = self._unmerged_weight() if layer.delta_depends_on_base and self.merged else weight
        delta = (w * layer.delta_weight(reference)).to(weight.dtype)
        weight.add_(delta)
        self.merged[name] = (w, delta if layer.delta_depends_on_base else None)

    def _unmerged_weight(self):
        weight = self.base_weight().clone()
        for name, (w, delta) in self.merged.items():
            weight -= delta if delta is not None else (w * self.adapters[name].delta_weight(weight)).to(weight.dtype)
        return weight

    @torch.no_grad()
    def unmerge(self, name):
        if name not in self.merged:
            return
        w, delta = self.merged.pop(name)
        weight = self.base_weight()
        if delta is None:
            delta = (w * self.adapters[name].delta_weight(weight)).to(weight.dtype)
        weight.sub_(delta)


class AdaptedModule(_Site):
    """Replaces a Linear/Conv2d in its parent: y = base(x) + Σ w · forward_delta(x)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def base_weight(self):
        return self.base.weight

    def forward(self, x):
        out = self.base(x)
        result = out
        for _, layer, w in self.active():
            delta = layer.forward_delta(x, self.base, out)
            result = result + (delta if w == 1.0 else w * delta).to(out.dtype)
        return result


class AdaptedParameter(_Site):
    """A parametrization of one parameter tensor: P = P0 + Σ w · ΔP.

    A method with sparse deltas may instead write P0 + w·ΔP into the frozen tensor's own storage
    (write_into / restore_into, SaRA): no dense copy of the tensor per forward. That path is taken when
    it is the only adapter at the site and nothing is merged; the storage is put back to P0
    (restore) before anything reads the base tensor (merge, unmerge, detach, another path)."""

    def __init__(self, module: nn.Module, pname: str):
        super().__init__()
        object.__setattr__(self, "_owner", module)  # not a submodule: avoids a reference cycle in the tree
        self.pname = pname
        self.written: str | None = None  # the adapter whose values the storage holds now

    def original(self):
        return self._owner.parametrizations[self.pname].original

    def base_weight(self):
        self.restore()
        return self.original()

    @torch.no_grad()
    def restore(self):
        if self.written is not None:
            self.adapters[self.written].restore_into(self.original())
            self.written = None

    def forward(self, original):
        active = self.active()
        if len(active) == 1 and len(self.adapters) == 1 and not self.merged:
            name, layer, w = active[0]
            routed = layer.write_into(original, w) if hasattr(layer, "write_into") else None
            if routed is not None:
                self.written = name
                return routed
        self.restore()
        for _, layer, w in active:
            original = original + w * layer.delta_weight(original).to(original.dtype)
        return original


@dataclass
class _Record:
    cfg: AdapterConfig
    sites: dict  # path -> _Site (module path, or "<module path>.<param name>" for the parameter kind)
    info: dict = field(default_factory=dict)


def _records(model) -> dict:
    if _RECORDS not in model.__dict__:
        model.__dict__[_RECORDS] = {}
    return model.__dict__[_RECORDS]


# ----------------------------------------------------------------------------------------------
# target resolution

def _clean_modules(model):
    """(path, module) over the model as it was before adapters: an AdaptedModule shows as its base,
    adapter internals and parametrization containers are skipped."""
    skip = []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, AdaptedModule):
            skip.append(path + ".")
            yield path, module.base
            for sub, inner in module.base.named_modules():
                if sub and not isinstance(inner, parametrize.ParametrizationList):
                    yield f"{path}.{sub}", inner
            continue
        if isinstance(module, (parametrize.ParametrizationList, _Site)) or ".parametrizations." in f".{path}.":
            continue
        yield path, module


def _matches(path: str, patterns: list[str]) -> bool:
    for p in patterns:
        if path == p or path.endswith("." + p) or re.fullmatch(p, path):
            return True
    return False


def _patterns(cfg: AdapterConfig) -> tuple[list[str], bool]:
    if isinstance(cfg.targets, str):
        return [p for name in cfg.targets.split("+") for p in PRESETS[name]], True
    return cfg.targets, False


def _supported(module) -> str | None:
    """None if the module can be wrapped, else why not."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped/depthwise Conv2d (groups={module.groups}); adapters support groups=1 only"
        if module.padding_mode != "zeros":
            return f"a Conv2d with padding_mode={module.padding_mode!r}; adapters support 'zeros' only"
        return None
    return f"a {type(module).__name__}; module adapters wrap nn.Linear and nn.Conv2d only"


def resolve_targets(model, cfg: AdapterConfig, exact: list[str] | None = None) -> dict:
    """path -> the module (module kind) or (module, param name) (parameter kind) to adapt.
    `exact` (from a saved file) lists the paths to adapt instead of cfg.targets."""
    kind = method_class(cfg.method).kind
    patterns, preset = _patterns(cfg)
    found = {}
    for path, module in _clean_modules(model):
        if kind == "module":
            if exact is not None:
                if path in exact:
                    why = _supported(module)
                    if why:
                        raise ValueError(f"saved adapter targets {path!r}, which in this model is {why}: "
                                         f"it was made for a different architecture")
                    found[path] = module
                continue
            if not _matches(path, patterns):
                continue
            why = _supported(module)
            if why is None:
                found[path] = module
            elif not preset and not isinstance(module, (nn.ModuleList, nn.Sequential)) and \
                    isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"target {path!r} is {why}: exclude it from targets")
        else:
            names = [n for n, t in module._parameters.items() if t is not None]  # e.g. bias=None
            if parametrize.is_parametrized(module):
                names += list(module.parametrizations.keys())
            for pname in names:
                ppath = f"{path}.{pname}" if path else pname
                if exact is not None:
                    if ppath in exact:
                        found[ppath] = (module, pname)
                elif _matches(ppath, patterns) or (path and _matches(path, patterns)):
                    found[ppath] = (module, pname)
    if exact is not None:
        missing = sorted(set(exact) - set(found))
        if missing:
            raise ValueError(f"saved adapter targets {len(missing)} module(s) this model lacks (first: {missing[0]!r}): "
                             f"it was made for a different architecture")
    if not found:
        raise ValueError(f"targets {cfg.targets!r} match no supported layer in {type(model).__name__}; "
                         f"check the module names (model.named_modules()) or use a preset: {', '.join(PRESETS)}")
    return found


# ----------------------------------------------------------------------------------------------
# attach / handles

def build_layers(model, cfg: AdapterConfig, exact=None, saved=None) -> dict:
    """Build one method layer per target without touching the model. saved: the tensors of a saved adapter
    about to be loaded; a method with a from_saved(base, cfg, its tensors) hook builds from them."""
    cls = method_class(cfg.method)
    targets = resolve_targets(model, cfg, exact)
    if cls.kind == "module":
        return {path: cls(module, cfg) for path, module in targets.items()}
    tensors = {path: getattr(module, pname).detach() for path, (module, pname) in targets.items()}
    prepare = getattr(cls, "prepare_targets", None)
    if prepare is not None and exact is None:
        tensors = prepare(cfg, tensors)  # a choice over all tensors at once (SaRA: one global θ)
    from_saved = getattr(cls, "from_saved", None)
    if from_saved is not None and saved is not None:
        return {path: from_saved(tensor, cfg, {k[len(path) + 1:]: t for k, t in saved.items() if k.startswith(path + ".")})
                for path, tensor in tensors.items()}
    return {path: cls(tensor, cfg) for path, tensor in tensors.items()}


def _install(model, name: str, cfg: AdapterConfig, layers: dict, weight: float) -> "AdapterHandle":
    cls = method_class(cfg.method)
    sites = {}
    for path, layer in layers.items():
        if cls.kind == "module":
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            current = getattr(parent, leaf)
            if not isinstance(current, AdaptedModule):
                current = AdaptedModule(current)
                setattr(parent, leaf, current)
            site = current
        else:
            module_path, _, pname = path.rpartition(".")
            module = dict(_clean_modules(model))[module_path]
            site = None
            if parametrize.is_parametrized(module, pname):
                site = next((p for p in module.parametrizations[pname] if isinstance(p, AdaptedParameter)), None)
            if site is None:
                site = AdaptedParameter(module, pname)
                parametrize.register_parametrization(module, pname, site, unsafe=True)
        site.adapters[name] = layer
        site.weights[name] = float(weight)
        sites[path] = site
    info = {path: layer.layer_info() for path, layer in layers.items() if layer.layer_info()}
    _records(model)[name] = _Record(cfg, sites, info)
    # only adapter tensors train: freeze everything else in the model
    adapter_params = {id(p) for layer in layers.values() for p in layer.parameters()}
    for record in _records(model).values():
        adapter_params |= {id(p) for site in record.sites.values() for p in site.adapters.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    return AdapterHandle(model, name)


def attach(model: nn.Module, cfg: AdapterConfig, name: str = "default", weight: float = 1.0) -> "AdapterHandle":
    """Wrap the layers that cfg.targets selects, in place, and return a handle. The model's other
    parameters are frozen. On any error the model is left exactly as it was."""
    if not isinstance(cfg, AdapterConfig):
        raise ValueError(f"attach needs an AdapterConfig, got {type(cfg).__name__}")
    if name in _records(model):
        raise ValueError(f"an adapter named {name!r} is already attached; pick another name or detach it first")
    layers = build_layers(model, cfg)
    return _install(model, name, cfg, layers, weight)


class AdapterHandle:
    """A view on one named adapter attached to a model."""

    def __init__(self, model, name):
        self.model, self.name = model, name

    @property
    def record(self) -> _Record:
        try:
            return _records(self.model)[self.name]
        except KeyError:
            raise ValueError(f"adapter {self.name!r} is not attached (detached?)") from None

    @property
    def config(self) -> AdapterConfig:
        return self.record.cfg

    @property
    def layers(self) -> dict:
        """path -> this adapter's method layer at that site."""
        return {path: site.adapters[self.name] for path, site in self.record.sites.items()}

    @property
    def weight(self) -> float:
        return next(iter(self.record.sites.values())).weights[self.name]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed): the trainable tensors split by each method's `no_decay` prefixes."""
        decayed, kept = [], []
        for layer in self.layers.values():
            for key, p in layer.named_parameters():
                if p.requires_grad:
                    (kept if key.startswith(tuple(layer.no_decay)) else decayed).append(p)
        return decayed, kept

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def set_weight(self, weight: float):
        weight = float(weight)
        for site in self.record.sites.values():
            remerge = self.name in site.merged
            site.unmerge(self.name)
            site.weights[self.name] = weight
            if remerge:
                site.merge(self.name)

    def merge(self):
        """Fold weight·ΔW into the base weights; the adapter then adds nothing at forward."""
        for site in self.record.sites.values():
            site.merge(self.name)

    def unmerge(self):
        for site in self.record.sites.values():
            site.unmerge(self.name)

    @property
    def merged(self) -> bool:
        return any(self.name in site.merged for site in self.record.sites.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-only tensors keyed "<site path>.<tensor name>" (what save_adapter writes)."""
        return {f"{path}.{key}": t for path, layer in self.layers.items() for key, t in layer.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]):
        """Load adapter tensors (exact resume). Checks every key and shape before changing anything."""
        load_into_layers(self.layers, tensors)

    def detach(self, keep_merged: bool = False):
        """Remove this adapter. keep_merged=True bakes it into the base weights first."""
        record = _records(self.model).pop(self.name, None)
        if record is None:
            return
        for path, site in record.sites.items():
            if isinstance(site, AdaptedParameter):
                site.restore()  # the storage back to P0 before this adapter goes
            if keep_merged:
                site.merge(self.name)
                site.merged.pop(self.name)
            else:
                site.unmerge(self.name)
            del site.adapters[self.name]
            site.weights.pop(self.name)
            if len(site.adapters):
                continue
            if isinstance(site, AdaptedModule):
                parent_path, _, leaf = path.rpartition(".")
                parent = self.model.get_submodule(parent_path) if parent_path else self.model
                setattr(parent, leaf, site.base)
            else:
                module = site._owner
                if len(module.parametrizations[site.pname]) == 1:
                    parametrize.remove_parametrizations(module, site.pname, leave_parametrized=False)

    def __repr__(self):
        return f"AdapterHandle({self.name!r}, {self.config.method}, {len(self.record.sites)} sites, weight={self.weight})"


def load_into_layers(layers: dict, tensors: dict):
    """Validate all keys/shapes/fingerprints first, then copy: all or nothing."""
    expected = {f"{path}.{key}": (path, key, t) for path, layer in layers.items()
                for key, t in layer.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ValueError(f"adapter tensors do not fit this model: {len(missing)} missing, {len(unexpected)} unexpected "
                         f"(first: {first!r}); was it saved for a different architecture or method?")
    # fingerprints first: a SaRA selection of another base also gives its other tensors other lengths
    for full, (path, key, ref) in expected.items():
        got = tensors[full]
        if key in layers[path].fingerprints and (tuple(got.shape) != tuple(ref.shape) or
                                                 not torch.equal(got.to(ref.dtype).cpu(), ref.cpu())):
            raise ValueError(f"adapter tensor {full!r} does not match this base model's weights (fingerprint "
                             f"differs): it was made for a different base model")
    for full, (path, key, ref) in expected.items():
        got = tensors[full]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f"adapter tensor {full!r} has shape {tuple(got.shape)} but this model needs "
                             f"{tuple(ref.shape)}: the adapter was made for a different architecture")
    with torch.no_grad():
        for full, (path, key, ref) in expected.items():
            ref.copy_(tensors[full].to(ref.dtype))


# ----------------------------------------------------------------------------------------------
# model-level helpers

def get_adapter(model, name: str) -> AdapterHandle:
    if name not in _records(model):
        have = ", ".join(_records(model)) or "none"
        raise ValueError(f"no adapter named {name!r} is attached (attached: {have})")
    return AdapterHandle(model, name)


def list_adapters(model) -> dict[str, float]:
    """name -> weight of every attached adapter."""
    return {name: AdapterHandle(model, name).weight for name in _records(model)}


def set_weights(model, weights: dict[str, float]):
    """Change several adapters' weights at once (no re-attaching)."""
    handles = [get_adapter(model, name) for name in weights]
    for handle in handles:
        handle.set_weight(weights[handle.name])


def remove_adapter(model, name: str):
    get_adapter(model, name).detach()


def cast_base(model, dtype):
    """Store the frozen base in `dtype` (bf16/fp16 training, as diffusers' LoRA scripts do) while every tensor of
    every attached adapter keeps its own dtype (fp32 trainables, SaRA's exact fp32 P0): model.to(dtype) would
    round those too."""
    keep = {id(t) for record in _records(model).values() for site in record.sites.values()
            for t in (*site.adapters.parameters(), *site.adapters.buffers())}
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for tensor in group.values():
                if tensor is not None and tensor.is_floating_point() and id(tensor) not in keep and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
