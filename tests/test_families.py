"""The family layer (pipelines.families) against diffusers' own pipelines and schedulers, and training on
every family with every method: SD, SDXL, PixArt, SD3 and Flux (dev- and schnell-style), tiny and random."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import tiny
from pipelines.families import FAMILIES, UnsupportedPipeline, family_of
from studio.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDERS = {"sd": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "pixart": tiny.tiny_pixart_pipeline,
            "sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline,
            "flux-schnell": lambda: tiny.tiny_flux_pipeline(guidance_embeds=False)}
METHODS = ("lora", "dora", "loldu", "flora", "sara", "tlora", "full")


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def folders(pipes, tmp_path_factory):
    out = {}
    for name, pipe in pipes.items():
        out[name] = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(out[name])
    return out


def test_each_tiny_pipeline_has_its_family_and_others_get_one_line(pipes):
    assert {family_of(p).name for p in pipes.values()} == {cls.name for cls in FAMILIES}

    class Other:
        pass

    with pytest.raises(UnsupportedPipeline, match="supports Stable Diffusion 1.x/2.x, SDXL, PixArt"):
        family_of(Other())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_predict_is_what_the_pipeline_itself_computes(pipes, name):
    """Reference: the first denoiser call inside the family's own diffusers pipeline (no CFG), captured
    with a hook. family.predict on the same latents and timestep, with family.encode_text, must match it."""
    pipe = pipes[name]
    family = family_of(pipe)
    seen = {}

    def record(module, args, kwargs, output):
        seen.setdefault("x", kwargs.get("hidden_states", args[0] if args else None))
        seen.setdefault("t", kwargs.get("timestep", args[1] if len(args) > 1 else None))
        seen.setdefault("out", output[0] if isinstance(output, tuple) else output.sample)

    hook = family.denoiser.register_forward_hook(record, with_kwargs=True)
    try:
        pipe("a photo of a bag", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0), **family.call_kwargs())
    finally:
        hook.remove()
    x = family.unpack(seen["x"], 32, 32)
    t = seen["t"].float() * (1000 if family.name == "flux" else 1)  # Flux's transformer takes σ, not σ·1000
    with torch.no_grad():
        got = family.predict(x, t, family.encode_text(["a photo of a bag"]), guidance=1.0)
    want = family.unpack(seen["out"], 32, 32)
    if want.shape[1] == 2 * x.shape[1]:  # learned variance: the pipeline keeps the prediction half, as predict does
        want = want.chunk(2, dim=1)[0]
    assert got.shape == x.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_latents_round_trip_through_the_vae_scale_and_shift(pipes, name):
    family = family_of(pipes[name])
    vae = family.pipe.vae
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(pixels)
        raw = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        torch.testing.assert_close(latents, (raw - shift) * vae.config.scaling_factor)
        torch.testing.assert_close(family.decode_latents(latents), vae.decode(raw).sample)
    assert latents.shape[1:] == family.latent_shape(32, 32)


def test_objectives_match_diffusers_schedulers(pipes):
    """ε/v targets against DDPMScheduler; flow noising against FlowMatchEulerDiscreteScheduler.scale_noise."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    sd = family_of(pipes["sd"]).objective()
    t = sd.sample_timesteps(4, torch.Generator().manual_seed(0))
    ddpm = DDPMScheduler.from_config(pipes["sd"].scheduler.config)
    torch.testing.assert_close(sd.noisy(x0, eps, t), ddpm.add_noise(x0, eps, t))
    torch.testing.assert_close(sd.x0(sd.target(x0, eps, t), sd.noisy(x0, eps, t), t), x0, rtol=1e-4, atol=1e-4)
    flow = family_of(pipes["sd3"]).objective()
    t = flow.sample_timesteps(4, torch.Generator().manual_seed(0))
    reference = FlowMatchEulerDiscreteScheduler.from_config(pipes["sd3"].scheduler.config)
    for i in range(4):
        want = reference.scale_noise(x0[i:i + 1], t[i:i + 1], eps[i:i + 1])
        torch.testing.assert_close(flow.noisy(x0, eps, t)[i:i + 1], want)
    noisy = flow.noisy(x0, eps, t)
    torch.testing.assert_close(flow.x0(flow.target(x0, eps, t), noisy, t), x0, rtol=1e-4, atol=1e-4)
    assert ((t > 0) & (t <= 1000)).all() and len(set(t.tolist())) == 4  # logit-normal over the training sigmas


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(0)
    for i in range(2):  # a smooth pattern the tiny models can fit in 20 steps, in two colours
        yy, xx = np.mgrid[0:32, 0:32] / 31.0
        image = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + i)], -1) * 255
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def _fixed_loss(family, latents, cond, denoiser=None, draws=6):
    """The training loss on fixed noise and timesteps (the same for every call)."""
    objective = family.objective()
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = objective.sample_timesteps(len(latents), gen)
            noise = torch.randn(latents.shape, generator=gen)
            out = family.predict(objective.noisy(latents, noise, t), t, cond, denoiser=denoiser)
            total += float(((out - objective.target(latents, noise, t)) ** 2).mean())
    return total / draws


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["sd", "sdxl", "pixart", "sd3", "flux"])
def test_every_method_trains_on_every_family(folders, subject, tmp_path, name, method):
    """20 steps lower the loss on fixed noise; the saved result loads and changes the output."""
    from adapters import load_adapter
    from pipelines import load_pipeline
    from pipelines.families import family_of as fam
    from studio.data import load_image

    lr = {"full": 2e-4}.get(method, 1e-2)
    run = train(dict(base=str(folders[name]), images=str(subject), prompt="a photo of sks bag", method=method, rank=2,
                     steps=20, lr=lr, batch_size=1, prior_preservation=False, validate_every=0, validation_seeds=[], checkpoint_every=0, device="cpu",
                     quiet=True, resolution=32, seed=0, out=str(tmp_path / "run")))
    pipe = load_pipeline(str(folders[name]), device="cpu")
    family = fam(pipe)
    pixels = torch.from_numpy(np.stack([load_image(p, 32) for p in sorted(subject.glob("*.png"))]))
    latents = family.encode_images(pixels)
    cond = family.encode_text(["a photo of sks bag"] * len(latents))
    before = _fixed_loss(family, latents, cond)
    if method == "full":
        trained = type(family.denoiser).from_pretrained(run / family.component)
    else:
        load_adapter(family.denoiser, run / "adapter", name="subject")
        trained = None
    after = _fixed_loss(family, latents, cond, denoiser=trained)
    assert after < before, (before, after)


@pytest.mark.parametrize("name", ["sdxl", "pixart", "sd3", "flux"])
def test_the_command_line_generates_and_trains_every_family(folders, subject, tmp_path, name, capsys):
    """The issue's table, as a new user types it: `studio generate` and `studio train` on a saved folder."""
    from studio.cli import main

    image = tmp_path / "out.png"
    assert main(["generate", "--base", str(folders[name]), "--prompt", "a photo of a bag", "--steps", "2",
                 "--width", "32", "--height", "32", "--out", str(image)]) == 0
    assert Image.open(image).size == (32, 32)
    run = tmp_path / "run"
    assert main(["train", "--base", str(folders[name]), "--images", str(subject), "--prompt", "a photo of sks bag",
                 "--method", "lora", "--steps", "2", "--batch-size", "1", "--no-prior-preservation", "--resolution", "32", "--validate-every", "0",
                 "--validation-steps", "2", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000", "step-000000.png", "step-000002",
                                                                   "step-000002.png"]  # each round, and its grid


@pytest.mark.parametrize("name, method", [("pixart", "loldu"), ("flux", "tlora"), ("sd3", "full")])
def test_what_training_sampled_is_what_generate_draws_from_the_saved_result(folders, subject, tmp_path, name, method):
    """Save, load, generate: the run's last validation image and `studio generate` with the saved adapter (or the
    saved denoiser) on the same seed are the same picture."""
    from pipelines import load_pipeline
    from pipelines.families import family_of as fam
    from pipelines.text2image import GenerationSettings, generate_from
    from studio.generate import apply_adapters

    run = train(dict(base=str(folders[name]), images=str(subject), prompt="a photo of sks bag", method=method, rank=2,
                     steps=4, lr=1e-2 if method != "full" else 1e-3, batch_size=1, prior_preservation=False,
                     validate_every=0, validation_seeds=[3],
                     validation_steps=2, checkpoint_every=0, device="cpu", quiet=True, resolution=32,
                     out=str(tmp_path / "run")))
    pipe = load_pipeline(str(folders[name]), device="cpu")
    family = fam(pipe)
    if method == "full":
        setattr(pipe, family.component, type(family.denoiser).from_pretrained(run / family.component))
    else:
        apply_adapters(pipe, [(run / "adapter", 1.0)])
    settings = GenerationSettings(prompt="a photo of sks bag", steps=2, guidance=2.0, seed=3, height=32, width=32)
    image = np.asarray(generate_from(pipe, settings)[0], dtype=np.int16)
    sampled = np.asarray(Image.open(run / "samples" / "step-000004" / "p0-seed3.png").convert("RGB"), dtype=np.int16)
    base = np.asarray(Image.open(run / "samples" / "step-000000" / "p0-seed3.png").convert("RGB"), dtype=np.int16)
    assert np.abs(image - sampled).max() <= 1
    assert np.abs(base - sampled).max() > 1  # and training changed what the model draws


def test_sara_on_every_tensor_of_a_dit_keeps_its_family(folders, subject, tmp_path):
    """SaRA on "all" parametrizes the transformer's own root tensors (PixArt's scale_shift_table), which
    renames its class; the family must still be found for validation samples and the result."""
    run = train(dict(base=str(folders["pixart"]), images=str(subject), prompt="a photo of sks bag", method="sara",
                     targets="all", steps=2, batch_size=1, prior_preservation=False, validate_every=0, validation_seeds=[0], validation_steps=2,
                     checkpoint_every=0, device="cpu", quiet=True, resolution=32, out=str(tmp_path / "run")))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "samples" / "step-000002" / "p0-seed0.png").is_file()
