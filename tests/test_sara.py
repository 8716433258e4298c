"""SaRA: the sparse scatter op, threshold/fraction selection, the invariants of specs/adapters.md §0,
exact identity for small negative weights, the nuclear norm reaching the trainable values, the
progressive switch (grown entries stop changing, survives save/resume) and training memory."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from adapters import AdapterConfig, attach, load_adapter, save_adapter
from adapters import sara
from adapters.sara import scatter_values

_CACHE = {}


def fresh(family="unet"):
    from pipelines.tiny import tiny_pixart_pipeline, tiny_sd_pipeline

    if family not in _CACHE:
        build = {"unet": lambda: tiny_sd_pipeline().unet, "pixart": lambda: tiny_pixart_pipeline().transformer}[family]
        _CACHE[family] = build().float().eval()
    return copy.deepcopy(_CACHE[family])


def run(model, family="unet", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([10, 500])
    if family == "unet":
        return model(torch.randn(2, 4, 16, 16, generator=g), t, torch.randn(2, 8, 32, generator=g), return_dict=False)[0]
    return model(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timestep=t, return_dict=False,
                 encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None})[0]


def sara_config(threshold=2e-2, **options):
    return AdapterConfig(method="sara", targets="all", options={"threshold": threshold, **options})


# -- the op --------------------------------------------------------------------------------------

def test_scatter_op_against_dense_reference():
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([0, 5, 6, 11], dtype=torch.int32)
    values = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    out = scatter_values(values, indices, (3, 4))
    dense = torch.zeros(12, dtype=torch.float64)
    dense[indices.long()] = values.detach()
    assert torch.equal(out, dense.view(3, 4))
    upstream = torch.randn(3, 4, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    assert torch.equal(values.grad, upstream.reshape(-1)[indices.long()])
    assert torch.autograd.gradcheck(lambda v: scatter_values(v, indices, (3, 4)), (values.detach().requires_grad_(),))


# -- selection and counts ------------------------------------------------------------------------

def test_threshold_selection_counts_every_tensor():
    model = fresh()
    theta = 2e-2
    expected = {n: int((p.abs() < theta).sum()) for n, p in model.named_parameters()}
    handle = attach(model, sara_config(theta))
    # every tensor kind is eligible (weights, biases, norms), each site holds exactly its |p| < θ entries
    assert set(handle.layers) == {n for n, c in expected.items() if c > 0}
    assert any(n.endswith("bias") for n in handle.layers) and any("norm" in n for n in handle.layers)
    assert handle.num_trainable() == sum(expected.values()) == sara.num_selected(handle)
    originals = dict(fresh().named_parameters())
    for path, layer in handle.layers.items():
        assert layer.sara_delta.numel() == expected[path] == sara.SaRA.count(originals[path], handle.config)


def test_fraction_picks_one_global_threshold():
    model = fresh()
    magnitudes = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()])
    handle = attach(model, AdapterConfig(method="sara", targets="all", options={"fraction": 0.05}))
    theta = handle.config.options["threshold"]  # recorded for the saved config
    k = round(0.05 * magnitudes.numel())
    assert handle.num_trainable() == int((magnitudes < theta).sum())
    assert k <= handle.num_trainable() <= k + int((magnitudes == magnitudes.sort().values[k - 1]).sum())


def test_bad_options():
    for options, match in [({"threshold": -1.0}, "threshold"), ({"fraction": 2.0}, "fraction"),
                           ({"progressive_at": 1.5}, "progressive_at"), ({"total_steps": 0}, "total_steps"),
                           ({"threshold": 1e-30}, "selects no parameter")]:
        with pytest.raises(ValueError, match=match):
            attach(_mlp(), AdapterConfig(method="sara", targets="all", options=options))


# -- invariants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["unet", "pixart"])
def test_invariants(family, tmp_path):
    model = fresh(family)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y0 = run(model, family)
    handle = attach(model, sara_config(), name="s")

    # (1) identity at step 0: bit-exact
    with torch.no_grad():
        assert torch.equal(run(model, family), y0)
    # (4) trainable count == number of selected entries
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == handle.num_trainable() == \
        sum(int((w.abs() < 2e-2).sum()) for w in w0.values())

    # (6) only the sparse vectors get gradients: no dense .grad on any frozen tensor; (7) accumulation
    trainable = {id(p) for p in handle.trainable_parameters()}
    run(model, family, 0).square().mean().backward()
    g1 = [p.grad.clone() for p in handle.trainable_parameters()]
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    assert all(g.dim() == 1 for g in g1) and any(g.abs().sum() > 0 for g in g1)
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
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        y1 = run(model, family)
    assert (y1 - y0).abs().max() > 1e-4
    # the adapted weight is P0 with the selected entries moved, nothing else (dense recomputation)
    some_path = max(handle.layers, key=lambda p: handle.layers[p].sara_delta.numel())
    module_path, _, pname = some_path.rpartition(".")
    expected = w0[some_path].clone().reshape(-1)
    layer = handle.layers[some_path]
    expected[layer.sara_indices.long()] += layer.sara_delta.detach()
    torch.testing.assert_close(getattr(model.get_submodule(module_path), pname).detach(), expected.view_as(w0[some_path]))

    # (2) merged == unmerged; (3) unmerge restores every W0
    handle.merge()
    with torch.no_grad():
        torch.testing.assert_close(run(model, family), y1, rtol=1e-4, atol=1e-5)
    handle.unmerge()
    with torch.no_grad():
        for path, layer in handle.layers.items():
            module_path, _, pname = path.rpartition(".")
            current = model.get_submodule(module_path).parametrizations[pname].original
            assert (current - w0[path]).norm() <= 1e-5 * w0[path].norm() + 1e-12

    # (5) save -> load: identical output; the file holds only the sparse pieces
    save_adapter(model, tmp_path / "s", name="s")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in saved} == {"sara_indices", "sara_delta", "sara_trainable", "sara_frozen",
                                                   "sara_progressed"}
    assert sum(t.numel() for k, t in saved.items() if k.endswith("sara_delta")) == handle.num_trainable()
    other = fresh(family)
    load_adapter(other, tmp_path / "s", name="s")
    with torch.no_grad():
        torch.testing.assert_close(run(other, family), y1, rtol=0, atol=1e-6)


def test_identity_is_exact_for_small_negative_weights():
    """The official code wrote |V| into the weights at step 0, flipping small negative weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.uniform_(-1e-3, 1e-3)
    x = torch.randn(5, 16)
    y0 = model(x).detach()
    handle = attach(model, AdapterConfig(method="sara", targets="all", options={"threshold": 2e-3}))
    assert (model[0].parametrizations.weight.original < 0).sum() > 50
    assert handle.layers["0.weight"].sara_delta.numel() == 256
    assert torch.equal(model(x), y0)
    assert torch.equal(model[0].weight, model[0].parametrizations.weight.original)


def test_in_place_forward_matches_a_dense_reference_and_restores_the_base_exactly():
    """Training writes P0 + ΔP into the frozen tensors' own storage (no dense copy per forward): the
    output and the gradient of the sparse values equal a dense re-computation, and the base tensors are
    bit-exact P0 again after merge/unmerge and after detach."""
    model, reference = fresh(), fresh()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach(model, sara_config(), name="s")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.sara_delta.copy_(0.01 * torch.randn(layer.sara_delta.shape, generator=g))
    # the reference: every adapted tensor rebuilt densely as a leaf that takes gradients
    dense = {}
    for path, layer in handle.layers.items():
        module_path, _, pname = path.rpartition(".")
        full = w0[path].clone().reshape(-1)
        full[layer.sara_indices.long()] += layer.sara_delta.detach()
        dense[path] = nn.Parameter(full.view_as(w0[path]))
        delattr(reference.get_submodule(module_path), pname)
        setattr(reference.get_submodule(module_path), pname, dense[path])
    out = run(model)
    assert torch.equal(out, run(reference))
    some = next(p for p in handle.layers if p.endswith("weight") and handle.layers[p].sara_delta.numel() > 10)
    module = model.get_submodule(some.rpartition(".")[0])
    assert module.weight.data_ptr() == module.parametrizations.weight.original.data_ptr()  # no copy
    out.square().mean().backward()
    run(reference).square().mean().backward()
    for path, layer in handle.layers.items():
        torch.testing.assert_close(layer.sara_delta.grad, dense[path].grad.reshape(-1)[layer.sara_indices.long()],
                                   rtol=1e-5, atol=1e-8)
    handle.merge()
    for path in handle.layers:  # merge reads the clean base: W0 + ΔP, not W0 + 2ΔP
        module_path, _, pname = path.rpartition(".")
        assert torch.equal(model.get_submodule(module_path).parametrizations[pname].original, dense[path].detach())
    handle.unmerge()
    run(model)  # written again
    handle.detach()  # restore puts p0 back on M; off M nothing was ever written
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())


# -- the low-rank regulariser -------------------------------------------------------------------------

def test_nuclear_norm_gradient_reaches_the_sparse_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6))
    with torch.no_grad():
        model[0].weight.mul_(0.1)
    handle = attach(model, AdapterConfig(method="sara", targets=[r".*weight"],
                                         options={"threshold": 0.03, "rank_weight": 0.5}))
    layer = handle.layers["0.weight"]
    with torch.no_grad():
        layer.sara_delta.normal_(0, 0.01)
    # dense reference: the masked matrix P ⊙ M, its nuclear norm, its gradient read at M
    w0 = model[0].parametrizations.weight.original.detach().double()
    mask = w0.abs() < 0.03
    assert torch.equal(mask.reshape(-1).nonzero().reshape(-1), layer.sara_indices.long())
    p = w0.clone().requires_grad_(True)
    dense_delta = torch.zeros(w0.numel(), dtype=torch.float64)
    dense_delta[layer.sara_indices.long()] = layer.sara_delta.detach().double()
    shifted = torch.where(mask, p + dense_delta.view_as(w0), torch.zeros_like(w0))
    norm = torch.linalg.svdvals(shifted).sum()
    norm.backward()
    ours = layer.nuclear_norm()
    torch.testing.assert_close(ours.double(), norm.detach(), rtol=1e-5, atol=1e-6)
    ours.backward()
    torch.testing.assert_close(layer.sara_delta.grad.double(), p.grad.reshape(-1)[layer.sara_indices.long()],
                               rtol=1e-4, atol=1e-6)

    # one tensor per round, the same draw for the same round (resume)
    layer.sara_delta.grad = None
    answers = []
    for _ in range(6):
        terms = {path: l.regularization_loss() for path, l in handle.layers.items()}
        answers.append([path for path, t in terms.items() if t is not None])
    assert all(len(a) == 1 for a in answers) and {a[0] for a in answers} == set(handle.layers)
    total = sara.regularization_loss(handle)
    total.backward()
    assert any(l.sara_delta.grad is not None and l.sara_delta.grad.abs().sum() > 0 for l in handle.layers.values())


def test_nuclear_norm_after_the_switch_covers_only_the_reduced_mask():
    """After the progressive switch the regulariser is ‖P ⊙ M2‖_* (the official code's reduced mask): an
    entry frozen at the switch neither counts nor gets a gradient. Dense reference, Linear and flattened conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        for m in model:
            m.weight.mul_(0.1)
    handle = attach(model, AdapterConfig(method="sara", targets=[r".*weight"], options={"threshold": 0.03}))
    for layer in handle.layers.values():
        with torch.no_grad():
            layer.sara_delta.normal_(0, 0.03)  # moves many entries past θ
    before, after = sara.progressive_update(handle)
    assert 0 < after < before
    for path, layer in handle.layers.items():
        base = model[int(path[0])].parametrizations.weight.original.detach().double()
        indices = layer.sara_indices.long()
        grown = ~layer.sara_trainable
        assert grown.any() and layer.sara_trainable.any()
        p = base.reshape(-1).clone()
        p[indices] += layer.values().detach().double()
        m2 = torch.zeros_like(p, dtype=torch.bool)
        m2[indices[layer.sara_trainable]] = True
        p.requires_grad_(True)
        expected = torch.linalg.svdvals(torch.where(m2, p, 0.0).view(base.shape[0], -1)).sum()
        expected.backward()
        ours = layer.nuclear_norm()
        torch.testing.assert_close(ours.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        ours.backward()
        assert torch.equal(layer.sara_delta.grad[grown], torch.zeros(int(grown.sum())))
        torch.testing.assert_close(layer.sara_delta.grad.double(), p.grad[indices], rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            layer.sara_frozen[grown] += 1.0  # whatever a frozen entry holds, the norm does not see it
        torch.testing.assert_close(layer.nuclear_norm(), ours.detach(), rtol=0, atol=0)


# -- progressive adjustment --------------------------------------------------------------------------

def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(0.05)
    return model


def _train(model, handle, optimizer, steps, start=0):
    g = torch.Generator().manual_seed(123 + start)
    skipped = []
    for step in range(start, start + steps):
        x = torch.randn(32, 16, generator=g)
        loss = (model(x) - x[:, :8].sin()).square().mean()
        reg = sara.regularization_loss(handle)
        (loss + reg if reg is not None else loss).backward()
        if sara.on_step(handle, step, optimizer):
            skipped.append(step)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return skipped


def _effective(layer):
    return layer.values().detach().clone()


def test_progressive_switch_freezes_grown_entries_and_survives_resume(tmp_path):
    model = _mlp()
    cfg = AdapterConfig(method="sara", targets=[r".*weight"], options={"threshold": 5e-3, "progressive_at": 4})
    handle = attach(model, cfg)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=3e-3, weight_decay=0.1)
    before = sara.num_selected(handle)
    assert _train(model, handle, optimizer, 4) == []
    # at step 4: re-select, reset the optimiser state, skip that update
    grown_expected = {path: ((l.p0 + l.sara_delta.detach()).abs() >= 5e-3) for path, l in handle.layers.items()}
    assert _train(model, handle, optimizer, 1, start=4) == [4]
    assert all(l.sara_delta not in optimizer.state for l in handle.layers.values())
    after = sara.num_selected(handle)
    assert after == before - sum(int(g.sum()) for g in grown_expected.values()) and 0 < after < before
    frozen = {path: _effective(l) for path, l in handle.layers.items()}
    _train(model, handle, optimizer, 3, start=5)  # weight decay and Adam keep moving sara_delta ...
    for path, l in handle.layers.items():
        now, grown = _effective(l), grown_expected[path]
        assert torch.equal(now[grown], frozen[path][grown])        # ... but grown entries stay as they were
        assert not torch.equal(now[~grown], frozen[path][~grown])  # while the rest trains
        assert torch.equal(l.sara_trainable, ~grown)

    # save at step 8, resume into a fresh model with the optimiser state, train on: same result
    save_adapter(model, tmp_path / "p")
    resumed_model = _mlp()
    resumed = load_adapter(resumed_model, tmp_path / "p", name="default")
    assert sara.num_selected(resumed) == after
    x = torch.randn(4, 16)
    torch.testing.assert_close(resumed_model(x), model(x), rtol=0, atol=0)
    resumed_opt = torch.optim.AdamW(resumed.trainable_parameters(), lr=3e-3, weight_decay=0.1)
    resumed_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for a, b in zip(resumed.layers.values(), handle.layers.values()):
        a.load_training_state(b.training_state())
    assert _train(resumed_model, resumed, resumed_opt, 3, start=8) == _train(model, handle, optimizer, 3, start=8) == []
    torch.testing.assert_close(resumed_model(x), model(x), rtol=0, atol=0)


def test_fractional_switch_needs_total_steps():
    model = _mlp()
    handle = attach(model, AdapterConfig(method="sara", targets="all", options={"threshold": 5e-3}))
    with pytest.raises(ValueError, match="total_steps"):
        sara.on_step(handle, 0)
    model = _mlp()
    handle = attach(model, AdapterConfig(method="sara", targets="all", options={"threshold": 5e-3, "total_steps": 10}))
    assert [step for step in range(10) if sara.on_step(handle, step)] == [5]


# -- memory ------------------------------------------------------------------------------------------

def _training_peak_bytes(method):
    """Peak bytes of tensors alive during two training steps beyond the model's own weights."""
    from studio.bench.live_memory import LiveTensorBytes

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    if method == "full":
        params = list(model.parameters())
    else:
        options = {"threshold": 2e-4, "rank_weight": 0.0} if method == "sara" else {}
        params = attach(model, AdapterConfig(method=method, rank=4, targets="all", options=options)).trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(8, 512)
    with LiveTensorBytes().ignore(model.parameters(), model.buffers(), [x]) as meter:
        for _ in range(2):
            model(x).square().mean().backward()
            frozen_grads = [p for p in model.parameters() if not p.requires_grad and p.grad is not None]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return meter.peak, frozen_grads, sum(p.numel() for p in params)


def test_training_memory_is_below_full_fine_tuning():
    """6 × Linear(512): 6.3 MB of weights. Full fine-tuning keeps a gradient and two Adam moments per
    weight (3×); SaRA keeps them only for its ~1% of entries. Its forward writes into the frozen weights'
    storage, so nothing weight-sized is kept: at most one layer's dense dL/dW lives, inside that layer's
    backward (1/6 of the weights here)."""
    weights = 6 * (512 * 512 + 512) * 4
    full, _, _ = _training_peak_bytes("full")
    ours, frozen_grads, selected = _training_peak_bytes("sara")
    assert frozen_grads == [] and 0 < selected < 0.02 * weights / 4
    assert full >= 3 * weights
    assert ours < 0.35 * weights


def test_export_lora_keeps_the_weight_deltas(tmp_path):
    from safetensors.torch import load_file

    from adapters import export_lora

    model = _mlp()
    handle = attach(model, AdapterConfig(method="sara", targets="all", options={"threshold": 5e-3}))
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(1e-3 * torch.randn_like(p))
    report = export_lora(model, tmp_path / "lora", rank=16, format="diffusers")
    assert set(report["layers"]) == {"0", "2"} and set(report["skipped"]) <= {"0.bias", "2.bias"}
    tensors = load_file(report["path"])
    for path in ("0", "2"):
        layer = handle.layers[f"{path}.weight"]
        w = model.get_submodule(path).parametrizations.weight.original
        rebuilt = tensors[f"transformer.{path}.lora_B.weight"] @ tensors[f"transformer.{path}.lora_A.weight"]
        torch.testing.assert_close(rebuilt, layer.delta_weight(w), rtol=1e-4, atol=1e-6)  # full rank: exact
