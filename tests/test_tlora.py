"""TLoRA: the tensor-ring maths against brute-force references, the spec's SD1.5 parameter counts,
and the seven invariants of specs/adapters.md §0 on a tiny UNet (Linear + conv) and two tiny DiTs."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters import AdapterConfig, attach, load_adapter, save_adapter
from adapters.core import AdaptedModule, resolve_targets
from adapters.tensor_ring import (apply_ring_residual, apply_transform, factorize, identity_transform_cores,
                                  ring_residual_matrix, transform_matrix)
from adapters.tlora import TLoRA


# -- maths -------------------------------------------------------------------------------------

def test_factorisations_match_the_official_tables():
    # the official code's tables (SD widths) and the spec's DiT widths
    table = {320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16),
             1152: (8, 12, 12), 1536: (8, 12, 16), 3072: (12, 16, 16)}
    for width, factors in table.items():
        assert factorize(width) == factors
    for width in (1, 7, 16, 24, 77, 1024, 4096):
        assert math.prod(factorize(width)) == width and len(factorize(width)) == 3
    assert factorize(1024, 2) == (32, 32)


def _brute_ring_matrix(cores):
    """T[(i..), (j..)] = tr(A^1[i1, j1] ⋯ A^D[iD, jD]) by looping over every index pair."""
    dims = [c.shape[0] for c in cores]
    n = math.prod(dims)
    t = torch.zeros(n, n, dtype=torch.float64)
    rows = list(itertools.product(*[range(d) for d in dims]))  # row-major flattening
    for r, i in enumerate(rows):
        for c, j in enumerate(rows):
            m = torch.eye(cores[0].shape[2], dtype=torch.float64)
            for d, core in enumerate(cores):
                m = m @ core[i[d], j[d]].double()
            t[r, c] = m.trace()
    return t


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_transform_by_mode_products_equals_the_dense_ring_matrix(rank):
    g = torch.Generator().manual_seed(0)
    cores = [torch.randn(f, f, rank, rank, generator=g, dtype=torch.float64) for f in (2, 3, 4)]
    dense = _brute_ring_matrix(cores)
    torch.testing.assert_close(transform_matrix(cores), dense)
    x = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_transform(x, cores), x @ dense.T)
    if rank == 1:  # Kronecker special case
        kron = torch.kron(torch.kron(cores[0][..., 0, 0], cores[1][..., 0, 0]), cores[2][..., 0, 0])
        torch.testing.assert_close(dense, kron)
    identity = identity_transform_cores((2, 3, 4), rank, dtype=torch.float64)
    torch.testing.assert_close(transform_matrix(identity), torch.eye(24, dtype=torch.float64))


def test_ring_residual_matches_its_trace_formula():
    g = torch.Generator().manual_seed(1)
    out_cores = [torch.randn(f, 3, 3, generator=g, dtype=torch.float64) for f in (2, 5)]
    in_cores = [torch.randn(f, 3, 3, generator=g, dtype=torch.float64) for f in (4, 3)]
    delta = ring_residual_matrix(out_cores, in_cores)
    for o, i in [(0, 0), (7, 11), (9, 5)]:
        (o1, o2), (i1, i2) = divmod(o, 5), divmod(i, 3)
        expected = (out_cores[0][o1] @ out_cores[1][o2] @ in_cores[0][i1] @ in_cores[1][i2]).trace()
        torch.testing.assert_close(delta[o, i], expected)
    x = torch.randn(6, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_ring_residual(x, out_cores, in_cores), x @ delta.T)


# -- parameter counts ----------------------------------------------------------------------------

SD15_FACTORS = {320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16)}


def _spec_total(transform_rank, residual, rank):
    """Spec §4c by hand: per transformer block of width C, six C→C projections and two 768→C ones;
    5 blocks at 320, 5 at 640, 6 at 1280."""
    total = 0
    for width, blocks in ((320, 5), (640, 5), (1280, 6)):
        sq = lambda w: sum(f * f for f in SD15_FACTORS[w])  # noqa: E731
        sm = lambda w: sum(SD15_FACTORS[w])  # noqa: E731
        per = transform_rank ** 2 * (6 * sq(width) + 2 * sq(768))
        if residual == "tr":
            per += rank ** 2 * (6 * 2 * sm(width) + 2 * (sm(width) + sm(768)))
        else:
            per += rank * (6 * 2 * width + 2 * (width + 768))
        total += blocks * per
    return total


@pytest.mark.parametrize("residual,rank,expected", [("tr", 6, 400_288), ("lora", 4, 941_440)])
def test_sd15_counts_match_the_paper(residual, rank, expected):
    """TLoRA(2,6) = 0.40M and TLoRA*(2,4) = 0.94M on the 128 attention projections of SD1.5."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD1.5's published config (the diffusers defaults), no weights
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8, layers_per_block=2)
    cfg = AdapterConfig(method="tlora", rank=rank, targets="attn", options={"transform_rank": 2, "residual": residual})
    assert _spec_total(2, residual, rank) == expected
    found = resolve_targets(unet, cfg)
    assert len(found) == 128
    assert sum(TLoRA.count(m, cfg) for m in found.values()) == expected
    handle = attach(unet, cfg)
    assert handle.num_trainable() == expected


# -- invariants on tiny models --------------------------------------------------------------------

_CACHE = {}


def fresh(family):
    from pipelines.tiny import tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

    if family not in _CACHE:
        build = {"unet": lambda: tiny_sd_pipeline().unet, "pixart": lambda: tiny_pixart_pipeline().transformer,
                 "sd3": lambda: tiny_sd3_pipeline().transformer}[family]
        _CACHE[family] = build().float().eval()
    return copy.deepcopy(_CACHE[family])


def run(model, family, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([10, 500])
    if family == "unet":
        kw = dict(sample=torch.randn(2, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g))
    elif family == "pixart":
        kw = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        kw = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 8, 64, generator=g),
                  pooled_projections=torch.randn(2, 64, generator=g))
    return model(timestep=t, return_dict=False, **kw)[0]


def expected_count(module, transform_rank, residual, rank):
    """Spec §4c from the layer's shape: R_t²·ΣI_d² + {R²·(ΣO_d + ΣI'_d) | r·(out + in·kh·kw)}."""
    w = module.weight
    out_f, in_f, flat_in = w.shape[0], w.shape[1], math.prod(w.shape[1:])
    n = transform_rank ** 2 * sum(f * f for f in factorize(in_f))
    if residual == "tr":
        return n + rank ** 2 * (sum(factorize(out_f)) + sum(factorize(flat_in)))
    return n + rank * (out_f + flat_in)


@pytest.mark.parametrize("family,residual,targets", [
    ("unet", "tr", "attn+conv"), ("pixart", "tr", "attn+ff"), ("sd3", "lora", "attn"),
    pytest.param("unet", "lora", "attn+ff+conv", marks=pytest.mark.slow)])  # conv LoRA residual: also below
def test_invariants(family, residual, targets, tmp_path):
    model = fresh(family)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y0 = run(model, family)
    options = {"transform_rank": 2, "residual": residual}
    handle = attach(model, AdapterConfig(method="tlora", rank=2, targets=targets, options=options), name="t")
    wrapped = {path: m.base for path, m in model.named_modules() if isinstance(m, AdaptedModule)}
    if family == "unet":
        assert any(isinstance(m, nn.Conv2d) for m in wrapped.values())

    # (1) identity at step 0 (T = I exactly for R_t = 2, Δ = 0)
    with torch.no_grad():
        assert (run(model, family) - y0).abs().max() < 1e-5
    # (4) trainable count == formula
    assert handle.num_trainable() == sum(expected_count(m, 2, residual, 2) for m in wrapped.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == handle.num_trainable()

    # (6) only adapter parameters get gradients, every core among them; (7) accumulation
    trainable = {id(p) for p in handle.trainable_parameters()}
    run(model, family, 0).square().mean().backward()
    g1 = [p.grad.clone() for p in handle.trainable_parameters()]
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    run(model, family, 3).square().mean().backward()
    accumulated = [p.grad.clone() for p in handle.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    run(model, family, 3).square().mean().backward()
    for a, b, c in zip(accumulated, g1, [p.grad for p in handle.trainable_parameters()]):
        torch.testing.assert_close(a, b + c, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        y1 = run(model, family)
    assert (y1 - y0).abs().max() > 1e-4

    # (2) merged == unmerged; (3) unmerge restores W0
    handle.merge()
    with torch.no_grad():
        torch.testing.assert_close(run(model, family), y1, rtol=1e-4, atol=1e-5)
    handle.unmerge()
    for path, m in wrapped.items():
        assert (m.weight - w0[f"{path}.weight"]).norm() <= 1e-5 * w0[f"{path}.weight"].norm()

    # (5) save -> load on a fresh model gives the same output; factors are recorded
    save_adapter(model, tmp_path / "t", name="t")
    other = fresh(family)
    load_adapter(other, tmp_path / "t", name="t")
    with torch.no_grad():
        torch.testing.assert_close(run(other, family), y1, rtol=0, atol=1e-6)
    import json

    info = json.loads((tmp_path / "t" / "adapter_config.json").read_text())["layers"]
    assert all(v["index_order"] == "row-major" and len(v["factors"]["in"]) == 3 for v in info.values())


@pytest.mark.parametrize("residual", ["tr", "lora"])
@pytest.mark.parametrize("layer", [nn.Linear(24, 20), nn.Conv2d(8, 12, 3, stride=2, padding=1)])
def test_forward_equals_the_dense_new_weight(layer, residual):
    """y = (W0·T + s·Δ) x + b with T and Δ built densely (brute force), after random training."""
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(layer))
    w0, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    handle = attach(model, AdapterConfig(method="tlora", rank=2, alpha=1.0, rslora=True, targets=["0"],
                                         options={"transform_rank": 3, "residual": residual}))
    tl = handle.layers["0"]
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    t = _brute_ring_matrix(list(tl.tlora_T)).float()
    if residual == "tr":
        delta = ring_residual_matrix(list(tl.tlora_out), list(tl.tlora_in))
    else:
        delta = tl.tlora_B @ tl.tlora_A
    assert tl.scale == pytest.approx(1 / math.sqrt(2))
    new = torch.einsum("oc...,cd->od...", w0, t) + tl.scale * delta.view(w0.shape)
    x = torch.randn(3, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 9, 9)
    ref = nn.functional.linear(x, new, bias) if isinstance(layer, nn.Linear) else \
        nn.functional.conv2d(x, new, bias, stride=2, padding=1)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tl.delta_weight(w0) + w0, new, rtol=1e-4, atol=1e-5)


def test_bad_options_and_factor_override():
    lin = nn.Sequential(nn.Linear(12, 6))
    with pytest.raises(ValueError, match="residual"):
        attach(copy.deepcopy(lin), AdapterConfig(method="tlora", targets=["0"], options={"residual": "svd"}))
    with pytest.raises(ValueError, match="multiply"):
        attach(copy.deepcopy(lin), AdapterConfig(method="tlora", targets=["0"], options={"factors": {"12": [2, 5]}}))
    handle = attach(copy.deepcopy(lin), AdapterConfig(method="tlora", rank=1, targets=["0"],
                                                      options={"factors": {"12": [3, 4], "6": [2, 3]}}))
    assert handle.layers["0"].factors["in"] == (3, 4)
    assert handle.num_trainable() == 2 ** 2 * (9 + 16) + 1 * (2 + 3 + 3 + 4)


def test_export_lora_reproduces_the_delta(tmp_path):
    from safetensors.torch import load_file

    from adapters import export_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(8, 6, 3, padding=1))
    w0 = [model[0].weight.detach().clone(), model[1].weight.detach().clone()]
    handle = attach(model, AdapterConfig(method="tlora", rank=2, targets=["0", "1"]))
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    report = export_lora(model, tmp_path / "lora", rank=8, format="kohya")
    tensors = load_file(report["path"])
    for i, (path, w) in enumerate(zip(["0", "1"], w0)):
        up, down = tensors[f"lora_transformer_{path}.lora_up.weight"], tensors[f"lora_transformer_{path}.lora_down.weight"]
        rebuilt = (up.flatten(1) @ down.flatten(1)).view(w.shape)
        torch.testing.assert_close(rebuilt, handle.layers[path].delta_weight(w), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_and_mode_product_routes_give_the_same_output_and_gradients(kind, dropout):
    """forward_delta takes the dense W0·(T − I) route or the mode products on x (dense_route's cost model);
    both are W0·(T x − x) + s·Δ·dropout(x), with the same gradients, and dropout reaches only the residual."""
    torch.manual_seed(0)
    layer = (nn.Linear(24, 16) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)).double()
    adapter = TLoRA(layer, AdapterConfig(method="tlora", rank=3, dropout=dropout)).double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn((50, 24) if kind == "linear" else (4, 6, 5, 5), dtype=torch.float64)
    outputs, grads = [], []
    for dense in (True, False):
        adapter.dense_route = lambda rows, dense=dense: dense
        torch.manual_seed(1)  # the same dropout mask on both routes
        out = adapter.forward_delta(x, layer, None)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.sum(), list(adapter.parameters())))
    del adapter.dense_route
    assert torch.allclose(outputs[0], outputs[1], atol=1e-10)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9)
    if dropout == 0.0:  # with no dropout both equal the dense new weight's output
        expected = F.linear(x, adapter.delta_weight(layer.weight)) if kind == "linear" else \
            F.conv2d(x, adapter.delta_weight(layer.weight), padding=1)
        assert torch.allclose(outputs[0], expected, atol=1e-10)


def test_the_route_follows_the_cost_of_each():
    """A training batch into a narrow layer goes dense; a few text tokens into a wide layer use the mode products."""
    adapter = TLoRA(nn.Linear(128, 128), AdapterConfig(method="tlora", rank=4))
    assert adapter.dense_route(512)
    wide = TLoRA(nn.Linear(2048, 1280), AdapterConfig(method="tlora", rank=4))
    assert not wide.dense_route(154) and wide.dense_route(16384)
