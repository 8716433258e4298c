"""export_lora: any adapter -> plain LoRA that diffusers' load_lora_weights reads with no missing or
unexpected keys and that reproduces the adapted model (reference: the adapted model itself)."""
import logging
from pathlib import Path

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

    from pipelines.tiny import tiny_pixart_pipeline

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no adapter"):
        export_lora(model, tmp_path / "x", rank=2)
    attach(model, AdapterConfig(method="lora", rank=2, targets=["0"]))
    with pytest.raises(ValueError, match="unknown export format"):
        export_lora(model, tmp_path / "x", rank=2, format="a1111")
    pixart = tiny_pixart_pipeline().transformer
    attach(pixart, AdapterConfig(method="lora", rank=2, targets="attn"))
    with pytest.raises(ValueError, match="no tool reads kohya keys for PixArt"):
        export_lora(pixart, tmp_path / "x.safetensors", rank=2, format="kohya")


# --- DiT families: the diffusers layout, as diffusers' save_lora_weights writes it ------------------------------------

def _dit(name):
    from pipelines import tiny

    return {"pixart": tiny.tiny_pixart_pipeline, "sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}[name]()


def _peft_load(model, file):
    """What diffusers' load_lora_adapter does, for PixArt (its pipeline and transformer have no LoRA loader): peft's
    LoraConfig with the file's ranks (alpha = rank: scale 1), inject_adapter_in_model, set_peft_model_state_dict."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    tensors = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    ranks = {k.rsplit(".lora_B", 1)[0]: v.shape[1] for k, v in tensors.items() if ".lora_B" in k}
    config = LoraConfig(r=4, lora_alpha=4, target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=ranks)
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_dit_export_loads_in_diffusers_as_the_merged_adapter(name, tmp_path, caplog):
    """A studio LoRA on a DiT's attention and MLP, exported at its own rank (exact), loads with the pipeline's
    load_lora_weights (PixArt: peft, as diffusers would) with no key left over, and the denoiser then computes what
    the studio adapter merged into the weights computes."""
    from pipelines.families import family_of

    pipe = _dit(name)
    family = family_of(pipe)
    handle = attach(family.denoiser, AdapterConfig(method="lora", rank=4, targets="attn+ff"), name="subject")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, t = torch.randn(1, *family.latent_shape(32, 32), generator=g), torch.tensor([500.0])
    cond = family.encode_text(["a photo of a bag"])
    handle.merge()
    with torch.no_grad():
        merged = family.predict(x, t, cond, guidance=1.0)
    report = export_lora(family.denoiser, tmp_path / "export", rank=4)
    assert report["path"].endswith("export/pytorch_lora_weights.safetensors") and report["skipped"] == []
    assert max(layer["relative_error"] for layer in report["layers"].values()) < 1e-5

    fresh = _dit(name)
    fresh_family = family_of(fresh)
    with torch.no_grad():
        base = fresh_family.predict(x, t, cond, guidance=1.0)
    with caplog.at_level(logging.WARNING):
        if name == "pixart":
            _peft_load(fresh.transformer, report["path"])
        else:
            fresh.load_lora_weights(str(tmp_path / "export"))
    assert not [r for r in caplog.records
                if any(w in r.getMessage().lower() for w in ("unexpected keys", "missing keys", "not loaded"))]
    assert _lora_layers(fresh.transformer) == set(report["layers"])
    with torch.no_grad():
        loaded = fresh_family.predict(x, t, cond, guidance=1.0)
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_dit_export_writes_what_diffusers_save_lora_weights_writes(name, tmp_path):
    """Same file name, keys and shapes as the pipeline class's own save_lora_weights for the same layers (peft's
    LoRA through get_peft_model_state_dict): the layout diffusers and ComfyUI read for SD3 and Flux."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipelines.families import family_of

    pipe = _dit(name)
    attach(pipe.transformer, AdapterConfig(method="lora", rank=2, targets="attn+ff"), name="subject")
    report = export_lora(pipe.transformer, tmp_path / "ours", rank=2)
    reference = _dit(name)
    reference.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=sorted(report["layers"])))
    type(reference).save_lora_weights(tmp_path / "theirs",
                                      transformer_lora_layers=get_peft_model_state_dict(reference.transformer))
    ours = load_file(report["path"])
    theirs = load_file(tmp_path / "theirs" / Path(report["path"]).name)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert family_of(pipe).component == "transformer" and all(k.startswith("transformer.") for k in ours)
    with safe_open(report["path"], "pt") as handle:
        assert handle.metadata()["format"] == "pt"


# --- the model card beside a trained adapter ------------------------------------------------------------------------

def test_model_card_beside_a_trained_adapter(tmp_path, tiny_sd_dir, monkeypatch):
    """README.md as diffusers' training scripts write it: front matter, the run's LAST validation samples copied
    beside it and linked relatively, and load lines that work as written (studio, then export + load_lora_weights)."""
    import re

    import numpy as np
    from PIL import Image

    from adapters import save_adapter
    from pipelines.tiny import tiny_sd_pipeline
    from studio.model_card import write_model_card
    from studio.train import TrainConfig

    run = tmp_path / "bag"
    for step, seeds in ((0, (0, 1)), (4, (0, 1))):
        for seed in seeds:
            folder = run / "samples" / f"step-{step:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * step + seed, np.uint8)).save(folder / f"p0-seed{seed}.png")
    unet = tiny_sd_pipeline().unet
    handle = attach(unet, AdapterConfig(method="lora", rank=2, targets="attn"), name="default")
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_adapter(unet, run / "adapter", name="default", base_model=str(tiny_sd_dir))
    config = TrainConfig(base=str(tiny_sd_dir), images="subject", prompt="a photo of sks bag", method="lora", rank=2,
                         steps=4, out=str(run))

    card = write_model_card(run / "adapter", config, run)
    text = card.read_text()
    assert card == run / "adapter" / "README.md" and not list(card.parent.glob(".*.tmp"))
    assert text.startswith("---\n") and f'base_model: "{tiny_sd_dir}"' in text and 'instance_prompt: "a photo of sks bag"' in text
    assert "A LoRA adapter (rank 2" in text and "4 steps" in text and "`a photo of sks bag`" in text
    links = re.findall(r"\]\((samples/[^)]+)\)", text)
    assert links == ["samples/p0-seed0.png", "samples/p0-seed1.png"]
    for link in links:  # the last validation's images (step 4), not step 0's
        assert (card.parent / link).read_bytes() == (run / "samples" / "step-000004" / Path(link).name).read_bytes()

    from studio import library

    copied = library.add_adapter(run / "adapter", "bag", home=tmp_path / "home")  # the card travels with the adapter
    assert (copied / "README.md").read_text() == text and (copied / links[0]).is_file()

    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert "load_adapter(pipe.unet" in blocks[0] and "pipe.load_lora_weights('bag-lora')" in blocks[2]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks[1:]:  # the export, then diffusers' own loader on a plain pipeline, as written (not sampling:
        exec("\n".join(line for line in block.splitlines() if not line.startswith("image = ")), namespace)  # 50 steps)
    assert _lora_layers(namespace["pipe"].unet) == set(handle.layers)


def test_model_card_of_a_full_fine_tune(tmp_path, tiny_sd_dir):
    from pipelines.tiny import tiny_sd_pipeline
    from studio.model_card import write_model_card

    run = tmp_path / "full"
    tiny_sd_pipeline().unet.save_pretrained(run / "unet")
    card = write_model_card(run / "unet", {"base": str(tiny_sd_dir), "method": "full", "prompt": "a photo of sks bag",
                                           "steps": 2}, run)
    text = card.read_text()
    assert "fully fine-tuned" in text and "## Samples" not in text
    assert f"pipe.unet = UNet2DConditionModel.from_pretrained('{run / 'unet'}')" in text


def test_model_card_after_a_real_run(tmp_path, tiny_sd_dir, make_subject):
    """On what the training loop leaves (the call studio/train.py makes after save_result): the end's samples."""
    from studio.model_card import write_model_card
    from studio.train import TrainConfig, train

    config = TrainConfig(base=str(tiny_sd_dir), images=str(make_subject(2, 0)), prompt="a photo of sks bag",
                         method="loldu", rank=2, steps=2, batch_size=1, prior_preservation=False, validate_every=0, validation_steps=2, device="cpu", quiet=True,
                         out=str(tmp_path / "run"))
    run = Path(train(config))
    card = write_model_card(run / "adapter", config, run)
    ends = sorted(p.name for p in (run / "samples" / "step-000002").glob("*.png"))
    assert ends and sorted(p.name for p in (card.parent / "samples").iterdir()) == ends
    assert "A LoLDU adapter (rank 2" in card.read_text() and "a rank-2 SVD of its weight change" in card.read_text()
