"""export_lora: any adapter -> plain LoRA that diffusers' load_lora_weights reads with no missing or
unexpected keys and that reproduces the adapted model (reference: the adapted model itself)."""
import logging

import pytest
import torch

from adapters import AdapterConfig, attach, export_lora, get_adapter
from adapters.export import low_rank_factors


def _train_one_step(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([10, 500]),
                 encoder_hidden_states=torch.randn(2, 8, 32, generator=g))
    params = [p for name in ("subject", "style") for p in get_adapter(unet, name).trainable_parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = unet(**batch, return_dict=False)[0].square().mean()
    loss.backward()
    opt.step()
    return batch


def _lora_layers(unet):
    return {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_modules() if n.endswith("lora_A")}


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_round_trip_through_load_lora_weights(fmt, tmp_path, caplog):
    from pipelines.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    attach(unet, AdapterConfig(method="loldu", rank=4, targets="attn+ff"), name="subject")
    attach(unet, AdapterConfig(method="flora", rank=4, targets="conv"), name="style", weight=0.7)
    batch = _train_one_step(unet)
    with torch.no_grad():
        adapted = unet(**batch, return_dict=False)[0]

    target = tmp_path / ("export" if fmt == "diffusers" else "export.safetensors")
    report = export_lora(unet, target, rank=10_000, format=fmt)  # full rank: exact up to rounding
    assert report["skipped"] == []
    assert max(layer["relative_error"] for layer in report["layers"].values()) < 1e-5

    fresh = tiny_sd_pipeline()
    with torch.no_grad():
        base = fresh.unet(**batch, return_dict=False)[0]
    assert (adapted - base).abs().max() > 1e-3  # the step changed something worth exporting
    with caplog.at_level(logging.WARNING):
        fresh.load_lora_weights(str(tmp_path / "export") if fmt == "diffusers" else str(target))
    key_problems = [r.getMessage() for r in caplog.records
                    if any(w in r.getMessage().lower() for w in ("unexpected keys", "missing keys", "not loaded"))]
    assert key_problems == []
    assert _lora_layers(fresh.unet) == set(report["layers"])  # every exported layer was loaded
    with torch.no_grad():
        loaded = fresh.unet(**batch, return_dict=False)[0]
    torch.testing.assert_close(loaded, adapted, rtol=1e-4, atol=1e-4)


def test_truncated_export_reports_svd_error():
    """A rank-k export of ΔW has the Eckart-Young error sqrt(Σ_{i>k} s_i²)/‖ΔW‖."""
    torch.manual_seed(0)
    delta = torch.randn(12, 5, 3, 3)
    up, down, error = low_rank_factors(delta, 3)
    s = torch.linalg.svdvals(delta.reshape(12, -1))
    assert up.shape == (12, 3) and down.shape == (3, 45)
    assert error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)


def test_export_errors(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no adapter"):
        export_lora(model, tmp_path / "x", rank=2)
    attach(model, AdapterConfig(method="lora", rank=2, targets=["0"]))
    with pytest.raises(ValueError, match="unknown export format"):
        export_lora(model, tmp_path / "x", rank=2, format="a1111")
