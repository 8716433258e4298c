"""Layouts and precisions the GPU path uses, checked on the CPU against fp32 contiguous references:
channels-last memory order, a half-precision frozen base with fp32 adapter tensors, a SaRA adapter
trained on fp32 weights loaded onto a half base, and a training run with all of them."""
import json

import pytest
import torch
from safetensors.torch import load_file

from adapters import METHODS, AdapterConfig, attach, cast_base, load_adapter, save_adapter


def _unet(seed=0):
    from pipelines.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed).unet


def _inputs(unet):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=gen)
    return x, torch.tensor([10, 500]), torch.randn(2, 8, unet.config.cross_attention_dim, generator=gen)


def _adapted(method):
    unet = _unet()
    unet.requires_grad_(False)
    unet.base_snapshot = {k: v.clone() for k, v in unet.state_dict().items()}
    options = {"fraction": 0.05} if method == "sara" else {}
    handle = attach(unet, AdapterConfig(method=method, rank=2, targets="attn+conv", options=options), name="d")
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: ΔW = 0 at init would hide layout mistakes
        for p in handle.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet, handle


def _run(unet, handle, x, t, e):
    for p in handle.trainable_parameters():
        p.grad = None
    out = unet(x, t, e).sample
    out.float().pow(2).mean().backward()
    return out.detach().float(), [p.grad.clone() for p in handle.trainable_parameters()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_channels_last_gives_the_same_output_and_gradients(method, one_torch_thread):
    unet, handle = _adapted(method)
    x, t, e = _inputs(unet)
    ref_out, ref_grads = _run(unet, handle, x, t, e)
    unet.to(memory_format=torch.channels_last)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) or method == "sara"
    out, grads = _run(unet, handle, x.to(memory_format=torch.channels_last), t, e)
    assert (out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    for got, ref in zip(grads, ref_grads):
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-8
    handle.detach()  # SaRA wrote into channels-last storage: the base comes back bit-exact
    for key, value in unet.state_dict().items():
        assert torch.equal(value, unet.base_snapshot[key]), key


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_half_base_keeps_the_adapter_in_fp32_and_matches_fp32(method, one_torch_thread):
    unet, handle = _adapted(method)
    x, t, e = _inputs(unet)
    ref_out, ref_grads = _run(unet, handle, x, t, e)
    cast_base(unet, torch.bfloat16)
    adapter_tensors = [*handle.trainable_parameters()]
    assert all(p.dtype == torch.float32 for p in adapter_tensors)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    with torch.autocast("cpu", torch.bfloat16):
        out, grads = _run(unet, handle, x.bfloat16(), t, e.bfloat16())
    assert (out - ref_out).abs().max() <= 0.05 * ref_out.abs().max()
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref_grads]), dim=0) > 0.99
    # Per tensor, errors are judged against the whole gradient: bf16 rounds activations to ~0.4%, which is noise
    # of about that size of the TOTAL gradient in every tensor. A tensor whose own gradient is far below that
    # (SaRA's 1-element selections, norm ~1e-6) can flip sign and still be right to bf16 precision.
    total = torch.cat([r.flatten() for r in ref_grads]).norm()
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got - ref).norm() <= 0.05 * total, method
        if ref.norm() >= 0.05 * total:  # well above bf16 resolution of the total: the direction must hold too
            assert cosine(got.flatten(), ref.flatten(), dim=0) > 0.9, method


def test_a_sara_adapter_from_fp32_weights_loads_onto_half_bases(tmp_path):
    unet = _unet()
    handle = attach(unet, AdapterConfig(method="sara", targets="all", options={"threshold": 0.02}), name="d")
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.01)
    x, t, e = _inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, e).sample
    save_adapter(unet, tmp_path / "sara", name="d")
    for dtype in (torch.bfloat16, torch.float16):
        half = _unet().to(dtype)
        # rounding moves some weights across θ: the selection from these weights differs from the saved one
        mags = torch.cat([p.detach().float().abs().reshape(-1) for p in half.parameters()])
        saved = sum(len(v) for k, v in load_file(tmp_path / "sara" / "adapter_model.safetensors").items()
                    if k.endswith("sara_indices"))
        if dtype == torch.bfloat16:
            assert int((mags < 0.02).sum()) != saved
        load_adapter(half, tmp_path / "sara", name="x")
        with torch.no_grad():
            out = half(x.to(dtype), t, e.to(dtype)).sample.float()
        assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    other = _unet(seed=1).to(torch.bfloat16)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(other, tmp_path / "sara", name="x")


@pytest.mark.parametrize("method", ["lora", "sara"])
def test_training_in_bf16_with_channels_last_and_sdpa(method, tiny_sd_dir, make_subject, tmp_path):
    from studio.train import TrainConfig, train

    images = make_subject(2, seed=3)
    options = {"adapter_options": {"fraction": 0.05}} if method == "sara" else {}
    config = TrainConfig(base=str(tiny_sd_dir), images=str(images), prompt="a photo of sks bag", method=method,
                         targets="attn+conv", rank=2, steps=2, lr=1e-3, batch_size=1, prior_preservation=False,
                         mixed_precision="bf16", channels_last=True,
                         attention="sdpa", validate_every=0, validation_steps=2, checkpoint_every=0, quiet=True,
                         out=str(tmp_path / "run"), **options)
    folder = train(config)
    info = json.loads((folder / "data.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["base_dtype"] == "bfloat16"
    assert info["attention"] == "sdpa" and info["channels_last"] is True and info["tf32"] is False  # CPU
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(v == v for v in losses)
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype in (torch.float32, torch.int32, torch.int64, torch.bool) for v in saved.values())
    load_adapter(_unet(), folder / "adapter", name="back")  # the fp32 base takes it: same selection
    assert list((folder / "samples").glob("step-000002/*.png"))


def test_generate_in_bf16_channels_last_with_a_sara_adapter_matches_fp32(tiny_sd_dir, tmp_path):
    import numpy as np

    from pipelines import GenerationSettings
    from studio.generate import get_pipeline, run_generate

    unet = _unet()
    handle = attach(unet, AdapterConfig(method="sara", targets="all", options={"threshold": 0.02}), name="d")
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.01)
    save_adapter(unet, tmp_path / "sara", name="d")
    images = {}
    for dtype, channels_last in ((None, False), ("bf16", True)):
        settings = GenerationSettings(prompt="a bag", steps=3, guidance=2.0, seed=0)
        out, _ = run_generate(settings, base=str(tiny_sd_dir), dtype=dtype, channels_last=channels_last,
                              adapters=[(tmp_path / "sara", 1.0)], device="cpu")
        images[dtype] = np.asarray(out[0], dtype=np.float32)
    pipe = get_pipeline(str(tiny_sd_dir), device="cpu", dtype="bf16", channels_last=True)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.channels_last
    assert np.abs(images["bf16"] - images[None]).mean() < 3  # of 255 (measured 0.45): bf16 rounding only


# -- the same on a CUDA device (`make test-gpu`; skipped without one) ------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_bf16_channels_last_matches_the_fp32_cpu_reference(method, attention):
    if attention == "xformers":
        pytest.importorskip("xformers.ops")
    unet, handle = _adapted(method)
    x, t, e = _inputs(unet)
    ref_out, ref_grads = _run(unet, handle, x, t, e)
    unet.to("cuda")
    cast_base(unet, torch.bfloat16)
    unet.to(memory_format=torch.channels_last)
    if attention == "xformers":
        from diffusers.models.attention_processor import XFormersAttnProcessor

        unet.set_attn_processor(XFormersAttnProcessor())
    with torch.autocast("cuda", torch.bfloat16):
        out, grads = _run(unet, handle, x.cuda().bfloat16().to(memory_format=torch.channels_last), t.cuda(),
                          e.cuda().bfloat16())
    assert (out.cpu() - ref_out).abs().max() <= 0.05 * ref_out.abs().max()
    flat = torch.cat([g.flatten().cpu() for g in grads])
    assert all(g.dtype == torch.float32 for g in grads)
    assert torch.nn.functional.cosine_similarity(flat, torch.cat([r.flatten() for r in ref_grads]), dim=0) > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "sara"])
def test_cuda_training_in_bf16_with_channels_last(method, tiny_sd_dir, make_subject, tmp_path):
    from studio.train import TrainConfig, train

    options = {"adapter_options": {"fraction": 0.05}} if method == "sara" else {}
    config = TrainConfig(base=str(tiny_sd_dir), images=str(make_subject(2, seed=3)), prompt="a photo of sks bag",
                         method=method, targets="attn+conv", rank=2, steps=2, lr=1e-3, batch_size=1,
                         prior_preservation=False, device="cuda",
                         mixed_precision="bf16", channels_last=True, validate_every=0, validation_steps=2,
                         checkpoint_every=0, quiet=True, out=str(tmp_path / "run"), **options)
    info = json.loads((train(config) / "data.json").read_text())
    assert info["base_dtype"] == "bfloat16" and info["tf32"] is True and info["device"].startswith("cuda")
