"""The Python door speaks diffusers: generate, diffusehigh and one_step (and DiffuseHighPipeline / OneStepPipeline
made with from_pipe) take diffusers' call arguments on the embedded UNet and DiT, a tiny SD3 and a tiny Flux."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import load_pipeline
from pipelines.diffuse_high import diffusehigh  # `from pipelines import diffusehigh` may be the submodule by now
from pipelines.hipa import one_step
from pipelines.text2image import generate, seeded_generators
from pipelines.families import family_of

PROMPT = "a photo of a dress"
MODELS = ["embedded", "embedded-dit", "sd3", "flux"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    """model(name): the shipped embedded models as load_pipeline gives them; tiny SD3 and Flux built in code (32 px,
    as a studio-trained model would say in studio_defaults)."""
    from pipelines import tiny

    builders = {"sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}
    built = {}

    def get(name):
        if name not in built:
            pipe = builders[name]() if name in builders else load_pipeline(name, device="cpu")
            if name in builders:
                pipe.studio_defaults = {"size": 32}
            pipe.set_progress_bar_config(disable=True)
            built[name] = pipe
        return built[name]
    return get


# Each entry with its cheapest arguments: steps of a (native) 32 px image, and where its images are.
ENTRIES = {
    "generate": (generate, dict(num_inference_steps=2), lambda out: out.images),
    "diffusehigh": (diffusehigh, dict(num_inference_steps=3, scales=(2,)), lambda out: out.images),
    "one_step": (one_step, {}, lambda out: out.images),
}
OUT_SIZE = {"generate": 32, "diffusehigh": 64, "one_step": 32}


def _run(entry, pipe, **kwargs):
    call, defaults, images = ENTRIES[entry]
    return images(call(pipe, PROMPT, **{**defaults, **kwargs}))


def _close(a, b, atol=1e-4):  # a batch of 2 and 2 batches of 1 differ in float rounding only
    return torch.allclose(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)), atol=atol)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_list_of_generators_draws_each_image_as_alone(model, entry, name):
    """num_images_per_prompt=2 with one generator per image gives the images two single calls give, and no
    generator at all means seeds 0 and 1."""
    pipe = model(name)
    pair = _run(entry, pipe, num_images_per_prompt=2, generator=seeded_generators(5, 2), output_type="np")
    alone = [_run(entry, pipe, generator=torch.Generator().manual_seed(seed), output_type="np")[0] for seed in (5, 6)]
    assert pair.shape[0] == 2 and not _close(pair[0], pair[1])
    assert _close(pair[0], alone[0]) and _close(pair[1], alone[1])
    assert _close(_run(entry, pipe, num_images_per_prompt=2, output_type="np"),
                  _run(entry, pipe, num_images_per_prompt=2, generator=seeded_generators(0, 2), output_type="np"))


@pytest.mark.parametrize("name", ["embedded", "embedded-dit"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_output_types(model, entry, name):
    pipe = model(name)
    family, size = family_of(pipe), OUT_SIZE[entry]
    pil, arrays, tensors, latents = (_run(entry, pipe, num_images_per_prompt=2, output_type=kind)
                                     for kind in ("pil", "np", "pt", "latent"))
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (size, size) for im in pil)
    assert isinstance(arrays, np.ndarray) and arrays.shape == (2, size, size, 3)
    assert 0 <= arrays.min() and arrays.max() <= 1
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (2, 3, size, size)
    assert _close(tensors.permute(0, 2, 3, 1), arrays)
    assert np.array_equal(np.asarray(pil[1]), (arrays[1] * 255).round().astype(np.uint8))
    assert latents.shape == (2, *family.latent_shape(size, size))
    with pytest.raises(ValueError, match="unknown output_type 'jpg'") as info:
        _run(entry, pipe, output_type="jpg")
    assert "\n" not in str(info.value)


def test_flux_latents_come_packed_from_the_pipeline_and_unpacked_from_diffusehigh(model):
    pipe = model("flux")
    family = family_of(pipe)
    packed = generate(pipe, PROMPT, num_inference_steps=2, output_type="latent").images
    assert packed.dim() == 3 and family.unpack(packed, 32, 32).shape == (1, *family.latent_shape(32, 32))
    hires = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=3, output_type="latent").images
    assert hires.shape == (1, *family.latent_shape(64, 64))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_latents_given_are_what_the_generator_would_draw(model, entry, name):
    from diffusers.utils.torch_utils import randn_tensor

    pipe = model(name)
    family = family_of(pipe)
    drawn = _run(entry, pipe, num_images_per_prompt=2, generator=seeded_generators(7, 2), output_type="np")
    generators = seeded_generators(7, 2)
    noise = randn_tensor((2, *family.latent_shape(32, 32)), generator=generators)
    # DiffuseHigh's later stages draw on from the same generators (diffusers: latents replace the first draw)
    more = dict(generator=generators) if entry == "diffusehigh" else {}
    given = _run(entry, pipe, num_images_per_prompt=2, latents=family.pack(noise), output_type="np", **more)
    assert _close(given, drawn)


@pytest.mark.parametrize("name", ["embedded", "embedded-dit"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_step_callback_runs_every_step_and_can_interrupt(model, entry, name):
    """callback_on_step_end(pipe, i, t, {"latents": ...}) after every denoising step (PixArt's pipeline has only a
    legacy callback: the studio adapts it); setting pipe._interrupt stops after the current step."""
    pipe = model(name)
    seen = []

    def record(p, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return tensors

    full = _run(entry, pipe, output_type="np", callback_on_step_end=record)
    total = {"generate": 2, "diffusehigh": 3 + 1, "one_step": 1}[entry]  # DiffuseHigh: 3 native + 0.3·3 → 1 hires
    assert [i for i, _ in seen] == list(range(total))
    assert _close(full, _run(entry, pipe, output_type="np"))  # the callback itself changes nothing
    if entry == "one_step":
        return
    calls = []

    def stop_at_first(p, i, t, tensors):
        calls.append(i)
        p._interrupt = True
        return tensors

    if entry == "generate":
        cut = generate(pipe, PROMPT, num_inference_steps=2, output_type="np", callback_on_step_end=stop_at_first)
        assert calls == [0] and cut.images.shape == full.shape and not _close(cut.images, full)
    else:  # the stages finished so far: here the native one, after its first step
        cut = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=3, output_type="np",
                          callback_on_step_end=stop_at_first)
        native = diffusehigh(pipe, PROMPT, scales=(2,), num_inference_steps=3, output_type="np").stages[0]
        assert calls == [0] and len(cut.stages) == 1 and cut.images.shape == native.shape
        assert not _close(cut.images, native)


def test_step_callback_can_replace_the_latents(model):
    pipe = model("embedded-dit")

    def zero(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}

    zeroed = generate(pipe, PROMPT, num_inference_steps=2, callback_on_step_end=zero, output_type="latent").images
    assert not zeroed.any()


@pytest.mark.parametrize("name", ["embedded", "embedded-dit", "sd3"])
def test_from_pipe_shares_the_components_and_calls_as_the_function(model, name):
    from pipelines import DiffuseHighPipeline, OneStepPipeline
    from pipelines.text2image import pipeline_class

    pipe = model(name)
    dtypes = {n: c.dtype for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    for sampler in (DiffuseHighPipeline, OneStepPipeline):
        made = sampler.from_pipe(pipe)
        assert isinstance(made, sampler) and isinstance(made, type(pipe)) and pipeline_class(made) is type(pipe)
        assert made.components.keys() == pipe.components.keys()
        assert all(made.components[n] is c for n, c in pipe.components.items())  # the same objects: no copy
        assert {n: c.dtype for n, c in made.components.items() if n in dtypes} == dtypes
        assert made.studio_defaults == pipe.studio_defaults and family_of(made).name == family_of(pipe).name
    def args(**more):  # fresh generators for every call: a call advances them
        return dict(num_images_per_prompt=2, generator=seeded_generators(3, 2), output_type="np", **more)

    hires = DiffuseHighPipeline.from_pipe(pipe)(PROMPT, **args(scales=(2,), num_inference_steps=3)).images
    assert _close(hires, diffusehigh(pipe, PROMPT, **args(scales=(2,), num_inference_steps=3)).images)
    made = OneStepPipeline.from_pipe(pipe)
    single = made(PROMPT, **args()).images
    assert _close(single, one_step(pipe, PROMPT, **args()).images)
    # a sampler made from a sampler is made from the loaded pipeline underneath
    again = OneStepPipeline.from_pipe(DiffuseHighPipeline.from_pipe(pipe))
    assert pipeline_class(again) is type(pipe) and _close(again(PROMPT, **args()).images, single)
    # generate on a sampler is the loaded pipeline's own call
    assert _close(generate(made, PROMPT, **args(num_inference_steps=2)).images,
                  generate(pipe, PROMPT, **args(num_inference_steps=2)).images)


def test_one_step_from_pipe_keeps_the_adapter_on_the_shared_denoiser(model):
    from pipelines import OneStepPipeline
    from pipelines.assets import shipped_hipa
    from pipelines.hipa import drop_adapter

    root = shipped_hipa("embedded")
    pipe = model("embedded")
    plain = one_step(pipe, PROMPT, output_type="np").images
    made = OneStepPipeline.from_pipe(pipe)
    with_adapter = made(PROMPT, adapter=root, output_type="np").images
    assert not _close(with_adapter, plain)
    drop_adapter(pipe)  # the adapter lives on the denoiser the two pipelines share
    assert _close(made(PROMPT, output_type="np").images, plain)


def test_the_embedded_dit_runs_with_plain_diffusers_defaults(model):
    image = load_pipeline("embedded-dit", device="cpu")("a photo of a dress", num_inference_steps=2).images[0]
    assert image.size == (32, 32)


def test_a_real_pixart_checkpoint_keeps_diffusers_defaults():
    from diffusers import PixArtAlphaPipeline

    from pipelines.loading import _plain_call_defaults
    from pipelines.tiny import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    pipe.transformer.register_to_config(sample_size=64)  # PixArt-α 512: the pipeline has bins for it
    _plain_call_defaults(pipe)
    assert type(pipe) is PixArtAlphaPipeline
    pipe.transformer.register_to_config(sample_size=16)
    _plain_call_defaults(pipe)
    assert type(pipe) is not PixArtAlphaPipeline and type(pipe).__name__ == "PixArtAlphaPipeline"


@pytest.mark.parametrize("entry, kwargs, message", [
    ("generate", dict(num_inference_steps=0), "num_inference_steps must be a positive whole number, got 0"),
    ("generate", dict(num_images_per_prompt=0), "num_images_per_prompt must be at least 1, got 0"),
    ("generate", dict(guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
    ("generate", dict(height=30), "height must be a positive multiple of"),
    ("generate", dict(num_images_per_prompt=2, generator=seeded_generators(0, 3)), "3 generators for 2 images"),
    ("generate", dict(steps=3), "StableDiffusionPipeline takes no argument steps"),
    ("diffusehigh", dict(num_images_per_prompt=2, generator=seeded_generators(0, 1)), "1 generators for 2 images"),
    ("diffusehigh", dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt has 1 texts for 2 prompts"),
    ("one_step", dict(num_inference_steps=4), r"exactly 1 step \(num_inference_steps=1\), not 4"),
    ("one_step", dict(prompt=3), "prompt must be text or a list of texts"),
])
def test_bad_arguments_are_one_clear_line(model, entry, kwargs, message):
    call, defaults, _ = ENTRIES[entry]
    kwargs = {"prompt": PROMPT, **defaults, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        call(model("embedded"), **kwargs)
    assert "\n" not in str(info.value)


def test_prompt_lists_order_images_as_diffusers(model):
    """Two prompts x two images each: each prompt's images together, in order; generator i draws image i."""
    pipe = model("embedded")
    prompts = ["a photo of a dress", "a photo of a sneaker"]
    for call, extra in ((generate, {}), (diffusehigh, dict(scales=(2,))), (one_step, {})):
        both = call(pipe, prompts, num_inference_steps=1 if call is one_step else 2, num_images_per_prompt=2,
                    generator=seeded_generators(4, 4), output_type="np", **extra).images
        second = call(pipe, prompts[1], num_inference_steps=1 if call is one_step else 2, num_images_per_prompt=2,
                      generator=seeded_generators(6, 2), output_type="np", **extra).images
        assert both.shape[0] == 4 and _close(both[2:], second), call.__name__


def test_the_exported_functions_are_not_shadowed_by_their_modules():
    """`from pipelines import diffusehigh` is the function even after its module was imported (it used to share
    the module's name, which the import system then put on the package)."""
    import pipelines.diffuse_high  # noqa: F401
    import pipelines.hipa  # noqa: F401
    from pipelines import diffusehigh, one_step

    assert callable(diffusehigh) and callable(one_step)
