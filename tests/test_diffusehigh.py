"""DiffuseHigh: structure guidance, scheduler-agnostic x̂0 edits, stage sizes, determinism, families, CLI."""
import pytest
import torch
import torch.nn.functional as F

from pipelines.diffuse_high import (StructureGuidance, diffusehigh, noise_level, output_for_x0, parse_scales,
                                   sharpen)
from pipelines.dwt import dwt2
from pipelines.image_metrics import hf_energy_ratio, low_band_psnr

PROMPT = "a photo of a dress"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe():
    from pipelines.tiny import tiny_sd_pipeline

    return _quiet(tiny_sd_pipeline())


@pytest.fixture(scope="module")
def pixart_pipe():
    from pipelines.tiny import tiny_pixart_pipeline

    return _quiet(tiny_pixart_pipeline())


@pytest.fixture(scope="module")
def pixel_pipe():
    """A Stable Diffusion pipeline without a VAE: the UNet works on RGB pixels (16x16 native)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipelines.tiny import tiny_sd_pipeline

    base = tiny_sd_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=None, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.vae_scale_factor = 1
    return _quiet(pipe)


FAMILIES = ["sd", "sdxl", "pixart", "sd3", "flux", "flux-schnell"]


@pytest.fixture(scope="module")
def family_pipe():
    """family_pipe(name): the tiny pipeline of that family, built once per module, 32 px native. (The tiny Flux
    says so in studio_defaults, as a studio-trained model would: FluxPipeline's own default is 1024-class.)"""
    from pipelines import tiny

    builders = {"sd": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "pixart": tiny.tiny_pixart_pipeline,
                "sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline,
                "flux-schnell": lambda: tiny.tiny_flux_pipeline(guidance_embeds=False)}
    built = {}

    def get(name):
        if name not in built:
            built[name] = _quiet(builders[name]())
            built[name].studio_defaults = {"size": 32}
        return built[name]
    return get


def _identity_codec():
    return (lambda z: (z + 1) / 2), (lambda image: image * 2 - 1)


def _low_pass_vae(monkeypatch, pipe):
    """Swap the family's random tiny VAE for an ideal low-pass one (latents: the image average-pooled by the
    VAE factor in the first 3 channels; decode: bilinear upsampling), so pixel-space structure can be measured.
    The denoiser, conditioning, schedule and guidance stay the family's own."""
    from pipelines.families import family_of

    def encode(self, pixels):
        low = F.avg_pool2d(pixels.float(), self.vae_factor)
        return torch.cat([low, low.new_zeros(low.shape[0], self.latent_channels - 3, *low.shape[-2:])], 1)

    def decode(self, latents):
        return F.interpolate(latents[:, :3].float(), scale_factor=self.vae_factor, mode="bilinear", align_corners=False)

    family = type(family_of(pipe))
    monkeypatch.setattr(family, "encode_images", encode)
    monkeypatch.setattr(family, "decode_latents", decode)


# ------------------------------------------------------------------------------------------ components

def test_sharpening_off_is_identity_and_constants_stay_constant():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(sharpen(x, 0.0), x)
    constant = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(sharpen(constant, 1.0, generator=torch.Generator().manual_seed(0)), constant, atol=1e-6)
    # a blur that blurs (sigma 1): near sigma 0.1 the 3x3 kernel is the identity to ~1e-22, so an unseeded draw
    # from the global RNG made this pass or fail by test order
    assert not torch.allclose(sharpen(x, 1.0, sigma_range=(1.0, 1.0)), x)


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
def test_guidance_puts_the_reference_low_band_into_x0(wavelet):
    decode, encode = _identity_codec()
    reference = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    guide = StructureGuidance(reference, decode, encode, wavelet)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    guided_low, guided_high = dwt2(decode(guide(x0)), wavelet)
    _, own_high = dwt2(decode(x0), wavelet)
    ref_low = dwt2(reference, wavelet)[0]
    if wavelet == "haar":  # non-redundant: swapping the band is exact everywhere
        assert torch.allclose(guided_low, ref_low, atol=1e-5)
        assert torch.allclose(guided_high, own_high, atol=1e-5)
    else:  # db4's symmetric-padding coefficients are redundant near the border; the interior is exact
        assert torch.allclose(guided_low[..., 4:-4, 4:-4], ref_low[..., 4:-4, 4:-4], atol=1e-5)
        assert (guided_low - ref_low).abs().mean() < 0.1 * (dwt2(decode(x0), wavelet)[0] - ref_low).abs().mean()


def test_guidance_is_a_no_op_when_the_reference_is_x0_itself():
    decode, encode = _identity_codec()
    x0 = torch.rand(1, 3, 12, 12) * 2 - 1
    assert torch.allclose(StructureGuidance(decode(x0), decode, encode)(x0), x0, atol=1e-5)


def _scheduler(name, prediction_type):
    from diffusers import DDIMScheduler

    from pipelines.text2image import SCHEDULERS

    if name not in SCHEDULERS:
        pytest.skip(f"scheduler '{name}' is not registered in pipelines.SCHEDULERS yet")
    config = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           steps_offset=1, clip_sample=False, prediction_type=prediction_type).config
    return SCHEDULERS[name](config)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "euler", "unipc", "dpm++", "dc-solver"])
def test_edited_x0_is_what_the_scheduler_itself_sees(name, prediction_type):
    """The guidance's ε'/v' must make the scheduler's own formulas recover exactly the edited x̂0."""
    scheduler = _scheduler(name, prediction_type)
    scheduler.set_timesteps(10)
    index = 3
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    t = scheduler.timesteps[index]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator) * 3
    x_in = scheduler.scale_model_input(sample, t)
    x0 = torch.randn(1, 4, 8, 8, generator=generator)
    out = output_for_x0(x0, x_in, noise_level(scheduler, index, t), prediction_type)
    if hasattr(scheduler, "model_outputs"):  # multistep solvers keep the converted x̂0
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

        base = DPMSolverMultistepScheduler if isinstance(scheduler, DPMSolverMultistepScheduler) else UniPCMultistepScheduler
        scheduler._init_step_index(t)
        seen = base.convert_model_output(scheduler, out, sample=sample)
    else:
        seen = scheduler.step(out, t, sample).pred_original_sample
    assert torch.allclose(seen, x0, atol=1e-4)


# ------------------------------------------------------------------------------------ the whole sampler

def test_guided_steps_carry_the_reference_low_band(pixel_pipe, monkeypatch):
    """Pixel space + Haar: at each guided step the scheduler's own x̂0 has exactly the reference's low band;
    after the guided steps it is free again."""
    import pipelines.diffuse_high as dh

    references, seen = [], []

    class Spy(StructureGuidance):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            references.append(self.low)

    monkeypatch.setattr(dh, "StructureGuidance", Spy)
    step = pixel_pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.pred_original_sample if kwargs.get("return_dict", True) else None)
        return out

    monkeypatch.setattr(pixel_pipe.scheduler, "step", lambda *a, **k: recording_step(*a, **{**k, "return_dict": True}))
    diffusehigh(pixel_pipe, PROMPT, scales=(2,), num_inference_steps=8, strength=0.5, guidance_scale=1.0,
                guidance_steps=0.75, wavelet="haar", scheduler="default", output_type="pt")
    hires = [x0 for x0 in seen if x0.shape[-1] == 32]
    assert len(references) == 1 and len(hires) == 4
    lows = [dwt2((x0.float() + 1) / 2, "haar")[0] for x0 in hires]
    for low in lows[:3]:
        assert torch.allclose(low, references[0], atol=1e-4)
    assert not torch.allclose(lows[3], references[0], atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_native_stage_is_the_pipeline_own_output(family_pipe, name):
    """Conditioning, CFG (SDXL: zeros for an empty negative), Flux's distilled guidance and its shifted
    schedule all come from the family: the native stage is exactly what the pipeline itself draws."""
    from pipelines.text2image import generate, seeded_generators

    pipe = family_pipe(name)
    out = diffusehigh(pipe, PROMPT, scales=(1,), num_inference_steps=3, generator=seeded_generators(5, 2),
                      num_images_per_prompt=2, scheduler="default", output_type="pt")
    direct = generate(pipe, PROMPT, num_inference_steps=3, generator=seeded_generators(5, 2), num_images_per_prompt=2,
                      output_type="pt").images
    assert torch.allclose(out.stages[0], direct.float().cpu(), atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_stage_sizes_and_images(family_pipe, name):
    out = diffusehigh(family_pipe(name), PROMPT, scales=(2,), num_inference_steps=4, num_images_per_prompt=2)
    assert out.sizes == [(32, 32), (64, 64)]
    assert [[im.size for im in stage] for stage in out.stages] == [[(32, 32)] * 2, [(64, 64)] * 2]
    assert out.steps == [4, 1] and out.guided_steps == [0, 1]
    assert len(out.seconds) == 2 and out.seconds[1] >= out.seconds[0] > 0
    assert out.images is out.stages[-1]


def test_dit_family_progressive_non_square_and_deterministic(pixart_pipe):
    from pipelines.text2image import seeded_generators

    kwargs = dict(sizes=[(32, 48), (48, 64)], num_inference_steps=3, guidance_scale=1.0, guidance_steps=1.0,
                  output_type="pt")
    first = diffusehigh(pixart_pipe, PROMPT, generator=seeded_generators(3, 1), **kwargs)
    assert [tuple(s.shape) for s in first.stages] == [(1, 3, 32, 32), (1, 3, 32, 48), (1, 3, 48, 64)]
    again = diffusehigh(pixart_pipe, PROMPT, generator=seeded_generators(3, 1), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first.stages, again.stages))
    other = diffusehigh(pixart_pipe, PROMPT, generator=seeded_generators(4, 1), **kwargs)
    assert not torch.equal(first.stages[-1], other.stages[-1])


def test_vae_tiling_is_on_only_above_native_size(pixart_pipe, monkeypatch):
    from pipelines.diffuse_high import MIN_VAE_TILE

    vae = pixart_pipe.vae
    decode, seen = vae.decode, []
    tile = vae.tile_sample_min_size

    def spy(z, **kwargs):
        seen.append((z.shape[-1], vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size))
        return decode(z, **kwargs)

    monkeypatch.setattr(vae, "decode", spy)
    diffusehigh(pixart_pipe, PROMPT, scales=(2,), num_inference_steps=3, guidance_scale=1.0, guidance_steps=1.0,
                output_type="pt")
    assert (16, False, False, tile) in seen and (32, True, True, MIN_VAE_TILE) in seen
    assert all(tiled == (size > 16) for size, tiled, _, _ in seen)
    assert (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size) == (False, False, tile)  # restored


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_works_with_dc_solver(family_pipe, name):
    from pipelines.text2image import SCHEDULERS

    if "dc-solver" not in SCHEDULERS:
        pytest.skip("DC-Solver is not registered in pipelines.SCHEDULERS yet (pipelines/dcsolver.py)")
    pipe = family_pipe(name)
    try:
        out = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=4, guidance_scale=1.0, guidance_steps=1.0,
                          scheduler="dc-solver", output_type="pt")
        assert type(pipe.scheduler).__name__ == "DCSolverScheduler"
    finally:
        pipe.scheduler = pipe._studio_default_scheduler
    assert out.stages[-1].shape == (1, 3, 64, 64) and torch.isfinite(out.stages[-1]).all()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_models_take_dc_solver_in_its_flow_mode_and_ddim_is_one_clear_line(family_pipe, name):
    pipe = family_pipe(name)
    try:
        out = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=4, scheduler="dc-solver", output_type="pt")
        assert type(pipe.scheduler).__name__ == "DCSolverScheduler" and pipe.scheduler.config.use_flow_sigmas
        assert out.stages[-1].shape[-1] == 2 * out.stages[0].shape[-1] and torch.isfinite(out.stages[-1]).all()
        with pytest.raises(ValueError, match="'ddim' is a noise-prediction sampler") as info:
            diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=4, scheduler="ddim")
        assert "\n" not in str(info.value)
    finally:
        pipe.scheduler = getattr(pipe, "_studio_default_scheduler", pipe.scheduler)
    assert "FlowMatch" in type(pipe.scheduler).__name__


@pytest.mark.parametrize("name", ["pixel"] + FAMILIES)
def test_structure_guidance_keeps_the_layout(pixel_pipe, family_pipe, monkeypatch, name):
    """Spec 2.6 #5: the result's low band agrees with the reference far better with guidance than without,
    on every family (pixel space, or an ideal low-pass VAE: the tiny random VAEs do not keep structure)."""
    pipe = pixel_pipe if name == "pixel" else family_pipe(name)
    if name != "pixel":
        _low_pass_vae(monkeypatch, pipe)

    def agreement(fraction):
        out = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=6, strength=0.8, guidance_scale=1.0,
                          guidance_steps=fraction, sharpen_amount=0.0, scheduler="default", output_type="pt")
        size = out.sizes[1]
        upsampled = F.interpolate(out.stages[0], size=size, mode="bicubic", align_corners=False)
        return float(low_band_psnr(out.stages[1], upsampled.clamp(0, 1)).mean())

    assert agreement(1.0) > agreement(0.0) + 3.0


def test_flow_edit_lands_on_the_line_through_the_edited_x0():
    """Flow matching (Flux-dev-style shifted schedule): the velocity built for an edited x̂0 makes the
    scheduler's own Euler step land on (1 - σ') x̂0 + σ' ε, the straight line through x̂0 and the implied noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    scheduler.set_timesteps(8, mu=0.8)
    index = 3
    scheduler.set_begin_index(index)
    t = scheduler.timesteps[index]
    generator = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 16, 8, 8, generator=generator)
    level = noise_level(scheduler, index, t)
    kind, _, sigma = level
    out = output_for_x0(x0, x, level, "epsilon")
    after = scheduler.step(out, t, x, return_dict=False)[0]
    eps = (x - (1 - sigma) * x0) / sigma
    following = float(scheduler.sigmas[index + 1])
    assert kind == "flow" and torch.allclose(after, (1 - following) * x0 + following * eps, atol=1e-5)


def _record_calls(monkeypatch, module):
    """Every call's keyword arguments (and first positional one), in order."""
    calls = []
    forward = module.forward

    def spy(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", spy)
    return calls


def test_sdxl_size_conditioning_stays_the_native_stage(family_pipe, monkeypatch):
    """As the authors' code: every stage's UNet call carries the native stage's (original, crop, target)
    ids, with zeroed unconditional rows for the empty negative prompt under CFG."""
    pipe = family_pipe("sdxl")
    calls = _record_calls(monkeypatch, pipe.unet)
    diffusehigh(pipe, PROMPT, sizes=[(32, 48)], height=16, width=24, num_inference_steps=4, strength=0.5,
                guidance_scale=3.0, output_type="pt")
    assert {tuple(c["args"][0].shape[-2:]) for c in calls} == {(8, 12), (16, 24)}  # both stages ran
    for call in calls:
        assert call["args"][0].shape[0] == 2  # uncond + cond
        ids = call["added_cond_kwargs"]["time_ids"]
        assert ids.tolist() == [[16.0, 24.0, 0.0, 0.0, 16.0, 24.0]] * 2
        assert not call["encoder_hidden_states"][0].any() and call["encoder_hidden_states"][1].any()


def test_sdxl_half_precision_vae_runs_in_fp32(family_pipe, monkeypatch):
    """SDXL's VAE overflows in fp16; as its pipeline does (config force_upcast), it runs in fp32, then goes back."""
    pipe = family_pipe("sdxl")
    vae = pipe.vae
    decode, seen = vae.decode, []

    def spy(z, **kwargs):
        seen.append((vae.dtype, z.dtype))
        return decode(z, **kwargs)

    monkeypatch.setattr(vae, "decode", spy)
    vae.to(torch.float16)
    try:
        out = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=2, guidance_scale=1.0, output_type="pt")
        assert vae.dtype == torch.float16
    finally:
        vae.to(torch.float32)
    assert set(seen) == {(torch.float32, torch.float32)} and torch.isfinite(out.images).all()


@pytest.mark.parametrize("name", ["flux", "flux-schnell"])
def test_flux_stages_shift_their_schedule_and_use_distilled_guidance(family_pipe, monkeypatch, name):
    """One transformer call per image and step (no CFG); dev-style models get the guidance value in their
    embedding, schnell-style none. Each stage's schedule is FluxPipeline's for its own token count."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = family_pipe(name)
    calls = _record_calls(monkeypatch, pipe.transformer)
    diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=6, strength=0.5, guidance_scale=4.0,
                num_images_per_prompt=2, output_type="pt")
    assert [c["hidden_states"].shape[:2] for c in calls] == [(2, 64)] * 6 + [(2, 256)] * 3
    for call in calls:
        guidance = call.get("guidance")
        assert guidance is None if name == "flux-schnell" else guidance.tolist() == [4.0, 4.0]

    def tail(tokens):  # the last 3 of FluxPipeline's 6 sigmas at this token count
        reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
        c = reference.config
        reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift(
            tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
        return reference.timesteps[3:] / 1000

    hires = torch.stack([c["timestep"][0] for c in calls[6:]])
    assert torch.allclose(hires, tail(256))
    if name == "flux":  # dynamic shifting: the larger stage's schedule is its own, not the native one's
        assert not torch.allclose(hires, tail(64), atol=1e-3)


def test_guidance_steps_are_a_fraction_of_each_stage(pixel_pipe, monkeypatch, caplog):
    """The authors guide 5 of 15 steps: the default guides a third of each stage's own denoising steps,
    counted, logged and returned per stage."""
    import logging

    import pipelines.diffuse_high as dh

    calls = []

    class Spy(StructureGuidance):
        def __call__(self, x0):
            calls.append(self.size)
            return super().__call__(x0)

    monkeypatch.setattr(dh, "StructureGuidance", Spy)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        out = diffusehigh(pixel_pipe, PROMPT, sizes=[32, 48], num_inference_steps=25, guidance_scale=1.0,
                          scheduler="default", output_type="pt")
    assert out.steps == [25, 7, 7] and out.guided_steps == [0, 2, 2]  # 7/3 rounds to 2, not the old fixed 5
    assert calls == [(32, 32)] * 2 + [(48, 48)] * 2
    assert "stage 2 (48x48): 2 of 7 denoising steps structure-guided" in caplog.text
    per_stage = diffusehigh(pixel_pipe, PROMPT, sizes=[32, 48], num_inference_steps=25, strength=0.6,
                            guidance_scale=1.0, guidance_steps=[0.0, 0.5], scheduler="default", output_type="pt")
    assert per_stage.steps[1:] == [15, 15] and per_stage.guided_steps[1:] == [0, 8]  # 7.5 rounds up


@pytest.mark.parametrize("fraction, steps, guided", [(1 / 3, 15, 5), (1 / 3, 7, 2), (0.5, 7, 4), (0.01, 7, 1),
                                                     (0.0, 7, 0), (1.0, 7, 7), (1 / 3, 1, 1)])
def test_guided_count_rounds_half_up_and_keeps_one_step(fraction, steps, guided):
    from pipelines.diffuse_high import guided_count

    assert guided_count(fraction, steps) == guided


@pytest.mark.parametrize("kwargs, message", [
    (dict(scales=(0.5,)), "scales must be >= 1"),
    (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(sizes=[(30, 30)]), "not a multiple of 4"),
    (dict(scales=(1.1,)), "not a whole number of pixels"),
    (dict(wavelet="db9"), "unknown wavelet"),
    (dict(scales=(2, 4), stage_guidance=[3.0]), "one value per hires stage"),
    (dict(guidance_steps=5), r"guidance_steps is the guided fraction .* in \[0, 1\]; got 5"),
    (dict(guidance_steps=-0.1), r"in \[0, 1\]; got -0.1"),
    (dict(scales=(2, 4), guidance_steps=[0.5]), "one value per hires stage"),
])
def test_bad_input_is_one_clear_line(sd_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        diffusehigh(sd_pipe, PROMPT, **kwargs)
    assert "\n" not in str(info.value)


def test_parse_scales():
    assert parse_scales("2") == (2.0,) and parse_scales("2, 4") == (2.0, 4.0) and parse_scales(3) == (3.0,)
    with pytest.raises(ValueError, match="like 2 or 2,4"):
        parse_scales("2,x")


# ------------------------------------------------------------------------------------------- metrics

def test_high_frequency_energy_ratio():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    checker = checker.float().expand(1, 3, 16, 16)
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 16, 16)
    ratios = hf_energy_ratio(torch.cat([checker, ramp]), cutoff=0.5)
    assert ratios.shape == (2,) and ratios[0] > 0.99 and ratios[1] < 0.2
    with pytest.raises(ValueError, match="cutoff"):
        hf_energy_ratio(ramp, cutoff=2.0)


def test_low_band_psnr_rewards_the_same_structure():
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    detail = image + 0.05 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    other = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert low_band_psnr(detail.clamp(0, 1), image) > low_band_psnr(other, image) + 10


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_hires(tiny_sd_dir, tmp_path, capsys):
    from studio.cli import main
    from studio.images import read_settings

    out = tmp_path / "hires.png"
    assert main(["generate", "--base", str(tiny_sd_dir), "--prompt", PROMPT, "--steps", "3", "--hires", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert read_settings(out)["extra"]["Hires"] == "2"
    assert read_settings(out)["extra"]["Hires guided steps"] == "1/1"  # 3 steps x strength 0.3: one step, guided
    assert main(["generate", "--base", str(tiny_sd_dir), "--prompt", PROMPT, "--hires", "0.5", "--device", "cpu",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_cli_hires_on_sdxl(tmp_path):
    from PIL import Image

    from pipelines.tiny import tiny_sdxl_pipeline
    from studio.cli import main
    from studio.images import read_settings

    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    out = tmp_path / "hires.png"
    assert main(["generate", "--base", str(folder), "--prompt", PROMPT, "--steps", "3", "--hires", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert read_settings(out)["extra"]["Hires guided steps"] == "1/1"
