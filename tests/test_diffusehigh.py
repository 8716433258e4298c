"""DiffuseHigh: structure guidance, scheduler-agnostic x̂0 edits, stage sizes, determinism, families, CLI."""
import pytest
import torch

from pipelines.diffusehigh import (StructureGuidance, diffusehigh, noise_level, output_for_x0, parse_scales,
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


def _identity_codec():
    return (lambda z: (z + 1) / 2), (lambda image: image * 2 - 1)


# ------------------------------------------------------------------------------------------ components

def test_sharpening_off_is_identity_and_constants_stay_constant():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(sharpen(x, 0.0), x)
    constant = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(sharpen(constant, 1.0, generator=torch.Generator().manual_seed(0)), constant, atol=1e-6)
    assert not torch.allclose(sharpen(x, 1.0), x)


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
    import pipelines.diffusehigh as dh

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
    diffusehigh(pixel_pipe, PROMPT, scales=(2,), steps=8, strength=0.5, guidance=1.0, guidance_steps=3,
                wavelet="haar", scheduler="default", output_type="pt")
    hires = [x0 for x0 in seen if x0.shape[-1] == 32]
    assert len(references) == 1 and len(hires) == 4
    lows = [dwt2((x0.float() + 1) / 2, "haar")[0] for x0 in hires]
    for low in lows[:3]:
        assert torch.allclose(low, references[0], atol=1e-4)
    assert not torch.allclose(lows[3], references[0], atol=1e-3)


def test_native_stage_is_the_pipeline_own_output(sd_pipe):
    from pipelines.text2image import GenerationSettings, generate

    out = diffusehigh(sd_pipe, PROMPT, scales=(1,), steps=3, seed=5, num_images=2, scheduler="default",
                      output_type="pt")
    direct = generate(sd_pipe, GenerationSettings(prompt=PROMPT, steps=3, seed=5, num_images=2), output_type="pt")
    assert torch.allclose(out.stages[0], direct.float().cpu(), atol=1e-6)


def test_stage_sizes_and_images(sd_pipe):
    out = diffusehigh(sd_pipe, PROMPT, scales=(2,), steps=3, guidance=1.0, num_images=2, guidance_steps=1)
    assert out.sizes == [(32, 32), (64, 64)]
    assert [[im.size for im in stage] for stage in out.stages] == [[(32, 32)] * 2, [(64, 64)] * 2]
    assert len(out.seconds) == 2 and out.seconds[1] >= out.seconds[0] > 0
    assert out.images is out.stages[-1]


def test_dit_family_progressive_non_square_and_deterministic(pixart_pipe):
    kwargs = dict(sizes=[(32, 48), (48, 64)], steps=3, guidance=1.0, guidance_steps=1, seed=3, output_type="pt")
    first = diffusehigh(pixart_pipe, PROMPT, **kwargs)
    assert [tuple(s.shape) for s in first.stages] == [(1, 3, 32, 32), (1, 3, 32, 48), (1, 3, 48, 64)]
    again = diffusehigh(pixart_pipe, PROMPT, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first.stages, again.stages))
    other = diffusehigh(pixart_pipe, PROMPT, **{**kwargs, "seed": 4})
    assert not torch.equal(first.stages[-1], other.stages[-1])


def test_vae_tiling_is_on_only_above_native_size(pixart_pipe, monkeypatch):
    from pipelines.diffusehigh import MIN_VAE_TILE

    vae = pixart_pipe.vae
    decode, seen = vae.decode, []
    tile = vae.tile_sample_min_size

    def spy(z, **kwargs):
        seen.append((z.shape[-1], vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size))
        return decode(z, **kwargs)

    monkeypatch.setattr(vae, "decode", spy)
    diffusehigh(pixart_pipe, PROMPT, scales=(2,), steps=3, guidance=1.0, guidance_steps=1, output_type="pt")
    assert (16, False, False, tile) in seen and (32, True, True, MIN_VAE_TILE) in seen
    assert all(tiled == (size > 16) for size, tiled, _, _ in seen)
    assert (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size) == (False, False, tile)  # restored


def test_works_with_dc_solver(sd_pipe):
    from pipelines.text2image import SCHEDULERS

    if "dc-solver" not in SCHEDULERS:
        pytest.skip("DC-Solver is not registered in pipelines.SCHEDULERS yet (pipelines/dcsolver.py)")
    out = diffusehigh(sd_pipe, PROMPT, scales=(2,), steps=4, guidance=1.0, guidance_steps=2, scheduler="dc-solver",
                      output_type="pt")
    assert type(sd_pipe.scheduler).__name__ == "DCSolverScheduler"
    assert out.stages[-1].shape == (1, 3, 64, 64) and torch.isfinite(out.stages[-1]).all()
    sd_pipe.scheduler = sd_pipe._studio_default_scheduler


def test_structure_guidance_keeps_the_layout(pixel_pipe):
    """Spec 2.6 #5: the result's low band agrees with the reference far better with guidance than without."""
    def agreement(steps):
        out = diffusehigh(pixel_pipe, PROMPT, scales=(2,), steps=6, strength=0.8, guidance=1.0, guidance_steps=steps,
                          sharpen_amount=0.0, scheduler="default", output_type="pt")
        upsampled = torch.nn.functional.interpolate(out.stages[0], size=(32, 32), mode="bicubic", align_corners=False)
        return float(low_band_psnr(out.stages[1], upsampled.clamp(0, 1)).mean())

    assert agreement(4) > agreement(0) + 3.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(scales=(0.5,)), "scales must be >= 1"),
    (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(sizes=[(30, 30)]), "not a multiple of 4"),
    (dict(scales=(1.1,)), "not a whole number of pixels"),
    (dict(wavelet="db9"), "unknown wavelet"),
    (dict(scales=(2, 4), stage_guidance=[3.0]), "one value per hires stage"),
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
    assert main(["generate", "--base", str(tiny_sd_dir), "--prompt", PROMPT, "--hires", "0.5", "--device", "cpu",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
