"""Each method's maths against an independent dense reference (the formulas of specs/adapters.md)."""
import math

import pytest
import torch
from torch import nn

from adapters import AdapterConfig, attach


def _perturb(handle, seed=0, size=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(size * torch.randn(p.shape, generator=g))


def test_flora_conv_matches_tucker_einsum():
    model = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1))
    handle = attach(model, AdapterConfig(method="flora", rank=3, alpha=6, targets=["0"], options={"rank_h": 2}))
    _perturb(handle)
    layer = handle.layers["0"]
    G, A_in, A_out, A_h, A_w = layer.flora_G, layer.flora_A_in, layer.flora_A_out, layer.flora_A_h, layer.flora_A_w
    assert G.shape == (3, 3, 2, 3)
    reference = 2.0 * torch.einsum("abpq,ca,ob,hp,wq->ochw", G, A_in, A_out, A_h, A_w)
    torch.testing.assert_close(layer.delta_weight(model[0].base.weight), reference)


def test_flora_linear_and_init():
    model = nn.Sequential(nn.Linear(40, 30))
    handle = attach(model, AdapterConfig(method="flora", rank=8, targets=["0"]))
    layer = handle.layers["0"]
    assert torch.count_nonzero(layer.flora_G) == 0
    # Kaiming-normal(a=√3) on (dim, r) -> std 1/sqrt(2r)
    assert abs(layer.flora_A_in.std().item() - 1 / math.sqrt(16)) < 0.05
    _perturb(handle)
    reference = layer.flora_A_out @ layer.flora_G.T @ layer.flora_A_in.T
    torch.testing.assert_close(layer.delta_weight(model[0].base.weight), reference)


def test_loldu_full_rank_reconstructs_weight_and_residual_is_schur():
    """At r = min(out, in), σ·P·L·diag(D)·Ū = W0 (so z = 0 gives ΔW = −W0); for r < k the residual
    W0 − P·L_r·diag(D_r)·Ū_r is zero on the r pivot rows and the first r columns (spec §2a)."""
    torch.manual_seed(0)
    lin = nn.Linear(7, 9)
    model = nn.Sequential(lin)
    handle = attach(model, AdapterConfig(method="loldu", rank=7, alpha=7, targets=["0"]))
    layer = handle.layers["0"]
    with torch.no_grad():
        layer.loldu_z.zero_()
    torch.testing.assert_close(layer.delta_weight(lin.weight), -lin.weight.detach(), rtol=1e-5, atol=1e-5)

    handle.detach()
    handle = attach(model, AdapterConfig(method="loldu", rank=3, alpha=3, targets=["0"]))
    layer = handle.layers["0"]
    with torch.no_grad():
        layer.loldu_z.zero_()
    residual = lin.weight.detach() + layer.delta_weight(lin.weight)
    P, _, _ = torch.linalg.lu(lin.weight.detach())
    permuted = P.T @ residual
    assert permuted[:3].abs().max() < 1e-5 and permuted[:, :3].abs().max() < 1e-5
    assert permuted[3:, 3:].abs().max() > 1e-2


@pytest.mark.parametrize("init", ["lu", "uniform", "constant", "normal"])
def test_loldu_identity_for_every_init(init):
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    x = torch.randn(2, 4, 8, 8)
    y0 = model(x).detach()
    handle = attach(model, AdapterConfig(method="loldu", rank=4, targets=["0"], options={"init": init}))
    assert (model(x) - y0).abs().max() < 1e-5
    assert handle.num_trainable() == 5


def test_dora_matches_dense_definition():
    """W' = diag(m/n)(W0 + sBA) with n the row norms, for Linear and Conv2d."""
    for module, x in [(nn.Linear(8, 6), torch.randn(3, 8)), (nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 7, 7))]:
        model = nn.Sequential(module)
        handle = attach(model, AdapterConfig(method="dora", rank=2, alpha=4, targets=["0"]))
        _perturb(handle)
        layer = handle.layers["0"]
        w0 = module.weight.detach()
        combined = w0 + 2.0 * (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view(w0.shape)
        norms = combined.flatten(1).norm(dim=1)
        dense = (layer.dora_magnitude / norms).view(-1, *(1,) * (w0.dim() - 1)) * combined
        if isinstance(module, nn.Linear):
            reference = nn.functional.linear(x, dense, module.bias)
        else:
            reference = nn.functional.conv2d(x, dense, module.bias, padding=1)
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


def test_lora_matches_peft():
    """Same A, B and scale as PEFT's LoraConfig give the same output (Linear and Conv2d)."""
    peft = pytest.importorskip("peft")
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 25, 6))
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    for use_dora in (False, True):
        ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
        method = "dora" if use_dora else "lora"
        handle = attach(ours, AdapterConfig(method=method, rank=2, alpha=6, targets=["0", "2"]))
        _perturb(handle)
        theirs = peft.inject_adapter_in_model(
            peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"], use_dora=use_dora), theirs)
        with torch.no_grad():
            for path in ("0", "2"):
                layer, mod = handle.layers[path], theirs.get_submodule(path)
                mod.lora_A["default"].weight.copy_(layer.lora_A.view_as(mod.lora_A["default"].weight))
                mod.lora_B["default"].weight.copy_(layer.lora_B.view_as(mod.lora_B["default"].weight))
                if use_dora:
                    mag = mod.lora_magnitude_vector["default"].weight
                    mag.copy_(layer.dora_magnitude.view_as(mag))
        x = torch.randn(2, 3, 5, 5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
