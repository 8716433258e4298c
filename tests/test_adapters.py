"""The seven invariants of specs/adapters.md §0 for every method on a tiny UNet and two tiny DiTs,
plus training, weighted combination, bad input and the parameter-kind plumbing."""
import copy
import math

import pytest
import torch
from torch import nn

from adapters import (METHODS, AdapterConfig, attach, get_adapter, list_adapters, load_adapter, save_adapter,
                      set_weights)
from adapters.core import AdaptedModule

CORE_METHODS = [m for m in ("lora", "dora", "loldu", "flora") if m in METHODS]
FAMILIES = ["unet", "pixart", "sd3"]


def _build(family):
    from pipelines.tiny import tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

    if family == "unet":
        return tiny_sd_pipeline().unet
    if family == "pixart":
        return tiny_pixart_pipeline().transformer
    return tiny_sd3_pipeline().transformer


_CACHE = {}


def fresh(family):
    """A new copy of the family's tiny denoiser (built once per session, fp32, eval)."""
    if family not in _CACHE:
        _CACHE[family] = _build(family).float().eval()
    return copy.deepcopy(_CACHE[family])


def inputs(family, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([10, 500][:batch])
    if family == "unet":
        return dict(sample=torch.randn(batch, 4, 16, 16, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(batch, 8, 32, generator=g))
    if family == "pixart":
        return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(batch, 8, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g))


def run(model, family, seed=0):
    return model(**inputs(family, seed), return_dict=False)[0]


def config(method, **kw):
    kw.setdefault("rank", 4)
    kw.setdefault("targets", "all")  # every Linear and Conv2d: exercises both wrappers and all kernel sizes
    return AdapterConfig(method=method, **kw)


def perturb(handle, seed=1, size=0.05):
    """Make ΔW != 0 (a trained adapter), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(size * torch.randn(p.shape, generator=g))


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the spec's trainable-count formulas, computed here from the layer shapes ---------------------

def expected_count(method, module, rank):
    w = module.weight
    out_f, in_f = w.shape[0], w.shape[1]
    kh, kw = (w.shape[2], w.shape[3]) if w.dim() == 4 else (1, 1)
    if method == "lora":
        return rank * (in_f * kh * kw + out_f)
    if method == "dora":
        return rank * (in_f * kh * kw + out_f) + out_f
    if method == "loldu":
        return rank + 1  # z (r) + the scalar σ
    if method == "flora":
        if w.dim() == 4:
            return rank * rank * kh * kw + in_f * rank + out_f * rank + kh * kh + kw * kw
        return rank * rank + in_f * rank + out_f * rank
    raise AssertionError(method)


# -- the seven invariants ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CORE_METHODS)
def test_invariants(method, family, tmp_path):
    model = fresh(family)
    w0 = base_weights(model)
    with torch.no_grad():
        y0 = run(model, family)
    handle = attach(model, config(method), name="a")

    # (1) identity at step 0
    with torch.no_grad():
        assert (run(model, family) - y0).abs().max() < 1e-5

    # (4) trainable count == formula, over the modules the adapter wrapped
    wrapped = {path: m.base for path, m in model.named_modules() if isinstance(m, AdaptedModule)}
    assert set(wrapped) == set(handle.layers)
    assert handle.num_trainable() == sum(expected_count(method, m, 4) for m in wrapped.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == handle.num_trainable()

    # (6) only adapter parameters receive gradients; (7) accumulation over two backward passes
    trainable = {id(p) for p in handle.trainable_parameters()}
    run(model, family, seed=0).square().mean().backward()
    g1 = [p.grad.clone() for p in handle.trainable_parameters()]
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    run(model, family, seed=3).square().mean().backward()
    accumulated = [p.grad.clone() for p in handle.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    run(model, family, seed=3).square().mean().backward()
    for a, b, c in zip(accumulated, g1, [p.grad for p in handle.trainable_parameters()]):
        torch.testing.assert_close(a, b + c, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in g1)
    model.zero_grad(set_to_none=True)

    # a trained adapter changes the output
    perturb(handle)
    with torch.no_grad():
        y1 = run(model, family)
    assert (y1 - y0).abs().max() > 1e-4

    # (2) merged forward == unmerged forward; (3) unmerge restores W0
    handle.merge()
    assert handle.merged
    with torch.no_grad():
        torch.testing.assert_close(run(model, family), y1, rtol=1e-4, atol=1e-5)
    handle.unmerge()
    for path, m in wrapped.items():
        w_init = w0[f"{path}.weight"]
        assert (m.weight - w_init).norm() <= 1e-5 * w_init.norm()

    # (5) save -> load gives identical output, on a fresh model
    save_adapter(model, tmp_path / "ad", name="a", base_model="tiny")
    other = fresh(family)
    loaded = load_adapter(other, tmp_path / "ad", name="a")
    assert loaded.config == AdapterConfig(**{**handle.config.to_dict(), "base_model": "tiny"})
    with torch.no_grad():
        torch.testing.assert_close(run(other, family), y1, rtol=0, atol=1e-6)

    # detach gives the base model back
    handle.detach()
    assert not any(isinstance(m, AdaptedModule) for m in model.modules())
    with torch.no_grad():
        assert (run(model, family) - y0).abs().max() < 1e-5


@pytest.mark.parametrize("method", CORE_METHODS)
def test_one_step_lowers_loss(method):
    model = fresh("unet")
    attach(model, config(method, targets="attn+ff+conv"))
    batch = inputs("unet", seed=5)
    target = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    params = get_adapter(model, "default").trainable_parameters()
    opt = torch.optim.Adam(params, lr=1e-3)

    def loss():
        return (model(**batch, return_dict=False)[0] - target).square().mean()

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before.detach()


@pytest.mark.parametrize("method", CORE_METHODS)
def test_weighted_pair_is_mean_of_deltas(method, family="unet"):
    """Two adapters at 0.5/0.5 give the mean of what each adds alone (weights change without re-attaching)."""
    model = fresh(family)
    with torch.no_grad():
        y0 = run(model, family)
    first = attach(model, config(method), name="one")
    perturb(first, seed=1)
    second = attach(model, config(method, rank=2), name="two")
    perturb(second, seed=2)
    with torch.no_grad():
        set_weights(model, {"one": 1.0, "two": 0.0})
        y1 = run(model, family)
        set_weights(model, {"one": 0.0, "two": 1.0})
        y2 = run(model, family)
        set_weights(model, {"one": 0.5, "two": 0.5})
        assert list_adapters(model) == {"one": 0.5, "two": 0.5}
        y_mix = run(model, family)
    # at every layer the mix is exactly base + 0.5·ΔW1 + 0.5·ΔW2 (dense reference)
    from adapters.core import base_op

    for path, layer in first.layers.items():
        site = dict(model.named_modules())[path]
        base = site.base
        shape = [base.in_features] if isinstance(base, nn.Linear) else [base.in_channels, 6, 6]
        x = torch.randn(3, *shape)
        with torch.no_grad():
            dense = base.weight + 0.5 * layer.delta_weight(base.weight) + 0.5 * second.layers[path].delta_weight(base.weight)
            expect = base_op(base, x, dense)
            if base.bias is not None:
                expect = expect + (base.bias if isinstance(base, nn.Linear) else base.bias.view(-1, 1, 1))
            torch.testing.assert_close(site(x), expect, rtol=1e-5, atol=1e-5)
    # merged with weights == unmerged with weights
    first.merge()
    second.merge()
    with torch.no_grad():
        torch.testing.assert_close(run(model, family), y_mix, rtol=1e-4, atol=1e-5)


def test_layer_mix_is_exact_mean():
    """At one layer, weights 0.5/0.5 give exactly base + mean of the two deltas (dense reference)."""
    for method in CORE_METHODS:
        layer = nn.Linear(12, 10)
        model = nn.Sequential(layer)
        a = attach(model, config(method, targets=["0"]), name="a")
        perturb(a, 1)
        b = attach(model, config(method, targets=["0"]), name="b")
        perturb(b, 2)
        set_weights(model, {"a": 0.5, "b": 0.5})
        x = torch.randn(5, 12)
        w = layer.weight
        dense = w + 0.5 * a.layers["0"].delta_weight(w) + 0.5 * b.layers["0"].delta_weight(w)
        torch.testing.assert_close(model(x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", CORE_METHODS)
@pytest.mark.parametrize("conv", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(1, 3), padding=(0, 2), dilation=2),
                                  dict(kernel_size=1), dict(kernel_size=4, stride=3)])
def test_conv_kernels_match_dense_delta(method, conv):
    """The factorised conv forward equals a conv with the dense ΔW, for any kernel, stride, padding."""
    model = nn.Sequential(nn.Conv2d(6, 8, **conv))
    handle = attach(model, config(method, rank=2, targets=["0"]))
    perturb(handle)
    x = torch.randn(2, 6, 11, 13)
    base = model[0].base
    dense = base.weight + handle.layers["0"].delta_weight(base.weight)
    reference = nn.functional.conv2d(x, dense, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


# -- targets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,preset,expected", [
    ("unet", "attn", r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    ("unet", "attn+ff", r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"),
    ("unet", "conv", r"(resnets\.\d\.(conv1|conv2|conv_shortcut)|samplers\.0\.conv)$"),
    ("pixart", "attn", r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    ("pixart", "attn+ff", r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"),
    ("sd3", "attn", r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"),
    ("sd3", "attn+ff", r"(attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2))$"),
])
def test_presets(family, preset, expected):
    import re

    model = fresh(family)
    want = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and re.search(expected, n)}
    handle = attach(model, AdapterConfig(method="lora", rank=1, targets=preset))
    assert set(handle.layers) == want and want


def test_sd15_attention_count_matches_spec():
    """Spec §0: LoRA r=4 on the 128 attention Linears of SD1.5 has 797,184 parameters."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    from adapters.core import resolve_targets

    found = resolve_targets(unet, AdapterConfig(method="lora", rank=4, targets="attn"))
    assert len(found) == 128
    assert sum(expected_count("lora", m, 4) for m in found.values()) == 797_184


# -- bad input leaves the model untouched ---------------------------------------------------------

def _snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], base_weights(model)


def _assert_untouched(model, snap):
    names, weights = _snapshot(model)
    assert names == snap[0]
    for n, w in snap[1].items():
        assert torch.equal(weights[n], w)
    assert list_adapters(model) == {}


def test_bad_config_and_targets():
    model = fresh("unet")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="unknown adapter method 'lorax'"):
        AdapterConfig(method="lorax")
    with pytest.raises(ValueError, match="unknown target preset"):
        AdapterConfig(method="lora", targets="attention")
    with pytest.raises(ValueError, match="match no supported layer"):
        attach(model, AdapterConfig(method="lora", targets=["no_such_layer"]))
    with pytest.raises(ValueError, match="unknown option"):
        AdapterConfig(method="lora", options={"nope": 1})
    for method in CORE_METHODS:
        # up_blocks convs come after many good layers: the error must still leave nothing attached
        with pytest.raises(ValueError, match="rank 64 is larger than"):
            attach(model, AdapterConfig(method=method, rank=64, targets="all"))
    _assert_untouched(model, snap)


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="grouped/depthwise"):
        attach(model, AdapterConfig(method="lora", rank=2, targets=["0", "1"]))
    assert not any(isinstance(m, AdaptedModule) for m in model.modules())
    handle = attach(model, AdapterConfig(method="lora", rank=2, targets="all"))  # presets skip it
    assert list(handle.layers) == ["1"]


@pytest.mark.parametrize("method", CORE_METHODS)
def test_load_errors_leave_model_untouched(method, tmp_path):
    source = fresh("unet")
    perturb(attach(source, config(method, targets="attn")))
    save_adapter(source, tmp_path / "good")

    # a different architecture: PixArt has attention layers with other names and shapes
    other = fresh("pixart")
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="different architecture"):
        load_adapter(other, tmp_path / "good")
    _assert_untouched(other, snap)

    # same names, different shapes
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    snap = _snapshot(wider)
    with pytest.raises(ValueError, match="different (architecture|base model)"):
        load_adapter(wider, tmp_path / "good")
    _assert_untouched(wider, snap)

    # truncated and corrupted files
    target = fresh("unet")
    snap = _snapshot(target)
    weights = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    for name, data in [("truncated", weights[: len(weights) // 2]), ("garbage", b"\x00\x01not a safetensors file")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
        (folder / "adapter_model.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match="corrupted or truncated"):
            load_adapter(target, folder)
    with pytest.raises(FileNotFoundError):
        load_adapter(target, tmp_path / "missing")
    _assert_untouched(target, snap)


def test_names_and_state_dict_resume(tmp_path):
    model = fresh("pixart")
    handle = attach(model, config("lora"), name="x")
    with pytest.raises(ValueError, match="already attached"):
        attach(model, config("lora"), name="x")
    perturb(handle)
    state = {k: v.clone() for k, v in handle.state_dict().items()}
    with torch.no_grad():
        y = run(model, "pixart")
    other = fresh("pixart")
    resumed = attach(other, config("lora"), name="x")
    resumed.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(run(other, "pixart"), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({k: v for k, v in list(state.items())[1:]})


# -- the parameter kind (what SaRA builds on), tested with a tiny method defined here ------------

def test_parameter_kind_sites(monkeypatch):
    from adapters import AdapterLayer, registry

    class Shift(AdapterLayer):
        """ΔP = a trainable tensor of P's shape (a dense reference method)."""
        name = "shift"
        kind = "parameter"

        def __init__(self, base, cfg):
            super().__init__(cfg)
            self.shift_delta = nn.Parameter(torch.zeros_like(base))

        def delta_weight(self, weight):
            return self.shift_delta

    import sys
    import types

    module = types.ModuleType("adapters_test_shift")
    module.Shift = Shift
    monkeypatch.setitem(sys.modules, "adapters_test_shift", module)
    monkeypatch.setitem(registry.METHODS, "shift", "adapters_test_shift:Shift")

    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    x = torch.randn(3, 4)
    y0 = model(x).detach()
    handle = attach(model, AdapterConfig(method="shift", targets=["1.weight", "0.bias"]))
    assert set(handle.layers) == {"1.weight", "0.bias"}
    torch.testing.assert_close(model(x), y0)
    with torch.no_grad():
        handle.layers["0.bias"].shift_delta.fill_(0.25)
    ln = model[1]
    reference = nn.functional.layer_norm(x @ model[0].weight.T + model[0].parametrizations.bias.original + 0.25, (5,),
                                         ln.weight, ln.bias)
    torch.testing.assert_close(model(x), reference)
    model(x).sum().backward()
    model(x).sum().backward()  # accumulation through the parametrization
    assert handle.layers["0.bias"].shift_delta.grad is not None
    handle.merge()
    torch.testing.assert_close(model(x), reference)
    handle.detach()
    assert not hasattr(model[0], "parametrizations")
    torch.testing.assert_close(model(x), y0)
