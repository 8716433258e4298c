"""DiffuseHigh (Kim et al., AAAI 2025): training-free generation above a model's native resolution.

Generate at the native size; then, per stage: upsample the previous image (bicubic), sharpen it (unsharp
mask), keep its wavelet low band as the structure reference, re-noise it SDEdit-style to `strength`
(the last strength*steps timesteps of the scheduler's own schedule) and denoise at the larger size. For
the first `guidance_steps` (a fraction) of a stage's denoising steps the predicted clean image's low band
is replaced by the reference's ("structure guidance"), so the layout stays the native image's and the
model only adds detail.

The guidance edits x̂0 and converts it back into a model output (ε, v or flow velocity), so any
scheduler's own `step` runs unchanged (DDIM, Euler, UniPC, DPM-Solver++, DC-Solver, flow matching).
Everything model-specific comes from the family layer (pipelines.families): text encoding, latents, the
model call and its guidance, the schedule for each stage's size. So it works on every family there
(SD 1.x/2.x, SDXL, PixArt, SD3, Flux), with a VAE or in pixel space.

Called as diffusers pipelines are: `diffusehigh(pipe, prompt, num_inference_steps=..., generator=...)`, or
`DiffuseHighPipeline.from_pipe(pipe)(prompt, ...)`, the same call as a pipeline sharing pipe's components.
"""
import inspect
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipelines.dwt import WAVELETS, dwt2, idwt2
from pipelines.families import family_of, output_for_x0, predicted_x0, take
from pipelines.grids import is_flow_config
from pipelines.text2image import (apply_model_defaults, check_call, family_pipeline_base, make_scheduler,
                                  model_defaults, seeded_generators, step_callback)

MIN_VAE_TILE = 512  # pixels; the smallest VAE tile used above native size (SD1.5's own tile size)
# guidance_steps is the guided share of a stage's denoising steps: the authors guide 5 of their 15
DEFAULTS = dict(strength=0.3, guidance_steps=1 / 3, wavelet="db4", sharpen=1.0, sharpen_sigma=(0.1, 2.0))
log = logging.getLogger("pipelines")


@dataclass
class HiresOutput:
    """stages[0] is the native image batch, stages[-1] the largest; sizes are (height, width);
    seconds[i] is the wall time from the start until stage i was decoded; steps[i] the denoising steps
    stage i ran and guided_steps[i] how many of them were structure-guided (0 for the native stage)."""
    stages: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    guided_steps: list = field(default_factory=list)

    @property
    def images(self):
        return self.stages[-1]


# ---------------------------------------------------------------------------------------------- inputs

def parse_scales(text) -> tuple:
    """'2' or '2,4' (or numbers) -> (2.0, 4.0)."""
    if isinstance(text, (int, float)):
        return (float(text),)
    if not isinstance(text, str):
        return tuple(float(s) for s in text)
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"hires scales must be numbers separated by commas, like 2 or 2,4; got '{text}'") from None


def stage_sizes(pipe, scales=(2, 4), sizes=None, base_size=None) -> list:
    """[(h, w) of the native stage, then of each high-resolution stage]; checks every size fits the model."""
    family = family_of(pipe)
    multiple = family.size_multiple()
    base = tuple(int(v) for v in (base_size or (family.native_size(),) * 2))
    if sizes is not None:
        targets = [(int(s), int(s)) if isinstance(s, (int, float)) else (int(s[0]), int(s[1])) for s in sizes]
    else:
        scales = parse_scales(scales)
        for scale in scales:
            if not scale >= 1:
                raise ValueError(f"hires scales must be >= 1 (the native size is 1), got {scale:g}")
        targets = [(round(base[0] * s), round(base[1] * s)) for s in scales]
        for scale, (h, w) in zip(scales, targets):
            if abs(h - base[0] * scale) > 1e-6 or abs(w - base[1] * scale) > 1e-6:
                raise ValueError(f"scale {scale:g} of {base[1]}x{base[0]} is not a whole number of pixels")
    if not targets:
        raise ValueError("give at least one hires scale or size")
    for h, w in [base] + targets:
        if h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"size {w}x{h} is not a multiple of {multiple}, which this model needs")
    return [base] + targets


def _check_position_limit(family, sizes):
    """SD3-style DiTs crop a fixed position-embedding table: larger images cannot be expressed at all."""
    config = family.denoiser.config
    limit = getattr(config, "pos_embed_max_size", None)
    if limit:
        largest = int(limit) * int(config.patch_size) * family.vae_factor
        for h, w in sizes:
            if max(h, w) > largest:
                raise ValueError(f"size {w}x{h} is beyond this model's position embeddings (at most {largest} px a side)")


def _per_stage(value, count, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} needs one value per hires stage ({count}), got {len(values)}")
    return values


def guided_count(fraction: float, steps: int) -> int:
    """Structure-guided steps of a stage with `steps` denoising steps: the fraction rounded half up,
    at least 1 when the fraction is above 0 (a short stage still gets its layout pinned)."""
    if fraction <= 0:
        return 0
    return min(steps, max(1, math.floor(fraction * steps + 0.5 + 1e-9)))


# ------------------------------------------------------------------------------ image-space operations

def sharpen(images: torch.Tensor, amount: float = 1.0, sigma_range=(0.1, 2.0), generator=None) -> torch.Tensor:
    """Unsharp mask (1 + a)·G − a·blur(G), 3x3 Gaussian with sigma drawn uniformly from sigma_range
    (as the authors' code does); not clamped. amount 0 is the identity; constant images are unchanged."""
    if amount == 0:
        return images
    low, high = float(sigma_range[0]), float(sigma_range[1])
    sigma = low + (high - low) * torch.rand((), generator=generator).item()
    taps = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None, :]).to(images)[None, None].repeat(images.shape[1], 1, 1, 1)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), kernel, groups=images.shape[1])
    return (1 + amount) * images - amount * blurred


class StructureGuidance:
    """Holds the reference image's wavelet low band and puts it into predicted clean images.

    decode: latents -> images in [0, 1]; encode: images in [0, 1] -> latents (identity-like in pixel space)."""

    def __init__(self, reference: torch.Tensor, decode, encode, wavelet: str = "db4"):
        self.size = tuple(reference.shape[-2:])
        self.wavelet = wavelet
        self.low = dwt2(reference, wavelet)[0]
        self.decode, self.encode = decode, encode

    def image(self, x0_latents: torch.Tensor) -> torch.Tensor:
        """The decoded x̂0 with its low band swapped for the reference's (pixels, fp32)."""
        pixels = self.decode(x0_latents).float().clamp(0, 1)
        _, highs = dwt2(pixels, self.wavelet)
        return idwt2(self.low, highs, self.size, self.wavelet)

    def __call__(self, x0_latents: torch.Tensor) -> torch.Tensor:
        return self.encode(self.image(x0_latents)).to(x0_latents.dtype)


class _Codec:
    """The family's latents as decode/encode to and from [0, 1] images (identity without a VAE: pixel-space
    models), and the VAE's memory and precision settings while DiffuseHigh runs."""

    def __init__(self, family):
        self.family = family
        self.vae = getattr(family.pipe, "vae", None)
        self.factor = family.vae_factor if self.vae is not None else 1
        self.channels = family.latent_channels if self.vae is not None else int(family.denoiser.config.in_channels)

    def decode(self, latents):
        if self.vae is None:
            return (latents.float() + 1) / 2
        return (self.family.decode_latents(latents).float() + 1) / 2

    def encode(self, images):
        if self.vae is None:
            return images * 2 - 1
        return self.family.encode_images(images * 2 - 1)  # the mode: no sampling noise

    @contextmanager
    def full_precision(self):
        """A half-precision VAE in fp32 for the run where the family's pipeline does that (SDXL's VAE
        overflows in fp16: black or NaN images), back to fp16 afterwards."""
        vae = self.vae
        if vae is None or not self.family.fp32_vae or vae.dtype != torch.float16 \
                or not getattr(vae.config, "force_upcast", False):
            yield
            return
        vae.to(torch.float32)
        try:
            yield
        finally:
            vae.to(torch.float16)

    @contextmanager
    def bounded_memory(self, enabled: bool):
        """VAE tiling and slicing while `enabled` (images above native size), restored afterwards. Tiles are
        at least MIN_VAE_TILE pixels: memory stays bounded by one such tile, and small models (32 px VAEs)
        are not cut into dozens of seamed tiles whose per-call overhead would dominate the run time."""
        vae = self.vae
        if vae is None or not enabled or not hasattr(vae, "enable_tiling"):
            yield
            return
        names = ("use_tiling", "use_slicing", "tile_sample_min_size", "tile_latent_min_size")
        before = {name: getattr(vae, name) for name in names if hasattr(vae, name)}
        vae.enable_tiling()
        if hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
        sample_tile = getattr(vae, "tile_sample_min_size", None)
        if isinstance(sample_tile, int) and sample_tile < MIN_VAE_TILE and hasattr(vae, "tile_latent_min_size"):
            factor = sample_tile / vae.tile_latent_min_size
            vae.tile_sample_min_size = MIN_VAE_TILE
            vae.tile_latent_min_size = int(MIN_VAE_TILE / factor)
        try:
            yield
        finally:
            for name, value in before.items():
                setattr(vae, name, value)


# ---------------------------------------------------- scheduler-agnostic x̂0 <-> model output conversion

def noise_level(scheduler, index: int, t):
    """(kind, alpha, sigma) at this step, in the coordinates of the model's input: "vp" means
    x_in = alpha·x0 + sigma·eps (DDIM, UniPC, DPM-Solver, and Euler after scale_model_input);
    "flow" means x = (1 - sigma)·x0 + sigma·eps (flow matching)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if is_flow_config(scheduler.config):  # FlowMatchEuler, or UniPC / DC-Solver in their flow mode
        sigma = float(sigmas[index])
        return "flow", 1.0 - sigma, sigma
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        s = float(sigmas[index])  # Karras/EDM sigma = sigma_t / alpha_t, read off the scheduler's own table
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return "vp", alpha, s * alpha
    abar = float(scheduler.alphas_cumprod[int(t)])
    return "vp", math.sqrt(abar), math.sqrt(1.0 - abar)


# ---------------------------------------------------------------------------------------- the sampler

def _denoise(family, x0, noise, strength, steps, guidance, cond, uncond, size, guide=None, guidance_steps=0.0,
             generator=None, on_step=None):
    """SDEdit from x0 (None = pure noise) over the last strength·steps timesteps of the schedule the family
    sets for this size, with structure guidance for the first guidance_steps (a fraction) of them.
    on_step(t, latents) after each step returns the latents to go on with. Returns (the final latents, i.e. the
    scheduler's last prev_sample; the number of denoising steps; how many were guided); stops early when the
    pipeline's interrupt flag is set."""
    pipe = family.pipe
    scheduler = pipe.scheduler
    family.set_timesteps(scheduler, steps, size[0], size[1], noise.device)
    count = steps if x0 is None else max(1, min(steps, int(steps * strength + 1e-6)))
    start = (steps - count) * getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if x0 is None:
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        kind, alpha, sigma = noise_level(scheduler, start, timesteps[0])
        if kind == "flow":  # x = (1 - σ) x0 + σ ε
            x = alpha * x0 + sigma * noise
        else:  # the scheduler's own forward process (Euler/EDM samples are not in model-input coordinates)
            x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if "generator" in accepted else {}
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    guided = guided_count(guidance_steps, len(timesteps)) if guide is not None else 0  # the loop's own count
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = family.sampling_output(x_in, t, cond, uncond, guidance)
        if i < guided:
            level = noise_level(scheduler, start + i, t)
            x0_hat = predicted_x0(out.float(), x_in.float(), level, prediction)
            out = output_for_x0(guide(x0_hat), x_in.float(), level, prediction).to(out.dtype)
        x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
        if on_step is not None:
            x = on_step(t, x)
        if getattr(pipe, "_interrupt", False):
            break
    return x, len(timesteps), guided


def _as_output(images: torch.Tensor, latents: torch.Tensor, output_type: str):
    """A stage's [0, 1] images (B, C, H, W) or its latents, as diffusers' output types."""
    from diffusers.image_processor import VaeImageProcessor

    if output_type == "latent":
        return latents
    if output_type == "pt":
        return images.cpu()
    arrays = VaeImageProcessor.pt_to_numpy(images)
    return arrays if output_type == "np" else VaeImageProcessor.numpy_to_pil(arrays)


def _conditioning(family, prompt, negative_prompt, count, size, device, negative: bool):
    """(cond, uncond or None) with one row per image, each prompt's images together as diffusers orders them,
    and the native stage's size conditioning."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) \
        else [negative_prompt or ""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} texts for {len(prompts)} prompts")
    rows = torch.arange(len(prompts)).repeat_interleave(count // len(prompts))
    cond = family.sized(take(family.encode_text(prompts, device), rows), *size)
    if not negative:
        return cond, None
    return cond, family.sized(take(family.encode_negative(negatives, device), rows), *size)


@torch.no_grad()
def diffusehigh(pipe, prompt=None, scales=(2, 4), sizes=None, *, negative_prompt=None, height=None, width=None,
                num_inference_steps=None, guidance_scale=None, num_images_per_prompt=1, generator=None, latents=None,
                output_type="pil", return_dict=True, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=None, stage_guidance=None, strength: float = DEFAULTS["strength"],
                guidance_steps: float = DEFAULTS["guidance_steps"], wavelet: str = DEFAULTS["wavelet"],
                sharpen_amount: float = DEFAULTS["sharpen"], sharpen_sigma=DEFAULTS["sharpen_sigma"],
                scheduler: str = None, vae_tiling="auto") -> HiresOutput:
    """Progressive high-resolution sampling (DiffuseHighPipeline's call; this function runs it on the pipeline
    itself). Returns a HiresOutput: `.images` the largest stage, `.stages` every stage (native first).

    diffusers' arguments: height/width are the native (first) stage's size (default: the model's); the stage
    draws what the pipeline itself would. num_inference_steps/guidance_scale default to the model's (studio.json,
    else 25 and 2.0). Without a generator, one CPU generator per image seeded 0, 1, ...; `latents` replaces the
    first stage's noise (the generator still draws the later stages'). output_type "pil", "np", "pt" ([0, 1]) or
    "latent" (B x C x h x w on every family). callback_on_step_end(pipe, i, t, {"latents": ...}) runs after each
    denoising step of every stage (i counts them all); setting pipe._interrupt ends after the current step and
    returns the stages finished so far.

    scales: factors of the native size, e.g. (2, 4); or sizes: target sizes (ints or (h, w)) instead. Each hires
    stage denoises the last strength·steps timesteps of a steps-long schedule with stage_guidance (default:
    guidance_scale; a number or one per stage), replacing the wavelet low band of x̂0 for the first
    guidance_steps of those steps: a fraction in [0, 1] (default 1/3, the authors' 5 of 15; a number or one per
    stage), rounded half up, at least one step when above 0. sharpen_amount: unsharp mask strength (0 = off).
    scheduler: a name from pipelines.SCHEDULERS (default: the pipeline's). vae_tiling: "auto" tiles and slices
    the VAE above the native size; True/False force it.

    Guidance is applied as the family's pipeline applies it: classifier-free guidance, except Flux, where the
    value feeds the distilled guidance embedding (dev) or is unused (schnell), one model call per step. SDXL's
    size conditioning stays the native stage's at every stage, as in the authors' code.
    """
    family = family_of(pipe)
    steps, guidance = model_defaults(pipe)
    steps = int(steps if num_inference_steps is None else num_inference_steps)
    guidance = float(guidance if guidance_scale is None else guidance_scale)
    count = check_call(prompt, steps, guidance, num_images_per_prompt, generator, output_type)
    if set(callback_on_step_end_tensor_inputs or ["latents"]) - {"latents"}:
        raise ValueError("DiffuseHigh gives its step callback only latents")
    if not 0 < float(strength) <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet '{wavelet}': choose one of {', '.join(WAVELETS)}")
    if float(sharpen_amount) < 0:
        raise ValueError(f"the sharpening amount must be >= 0, got {sharpen_amount}")
    native = family.native_size()
    base = (int(height or native), int(width or native)) if height or width else None
    sizes = stage_sizes(pipe, scales, sizes, base)
    _check_position_limit(family, sizes)
    stage_cfg = _per_stage(guidance if stage_guidance is None else stage_guidance, len(sizes) - 1, "stage_guidance")
    stage_guided = _per_stage(guidance_steps, len(sizes) - 1, "guidance_steps")
    for fraction in stage_guided:
        if not 0 <= float(fraction) <= 1:
            raise ValueError(f"guidance_steps is the guided fraction of each stage's denoising steps, in [0, 1]; "
                             f"got {float(fraction):g}")
    make_scheduler(pipe, scheduler, guidance=guidance)

    started = time.perf_counter()
    device = pipe._execution_device
    dtype = next(family.denoiser.parameters()).dtype
    codec = _Codec(family)
    generator = seeded_generators(0, count) if generator is None else generator
    # Sharpening draws from generators of its own, seeded as each image's (one for the batch with one generator):
    # it never shifts the noise, and an image is the same alone or in a batch.
    sharpen_rngs = [torch.Generator("cpu").manual_seed(g.initial_seed())
                    for g in (generator if isinstance(generator, (list, tuple)) else [generator])]
    cond, uncond = _conditioning(family, prompt, negative_prompt, count, sizes[0], device,
                                 max([guidance] + [float(g) for g in stage_cfg]) > 1)
    result = HiresOutput()
    pipe._interrupt = False
    done = 0  # denoising steps over all stages: the callback's step index

    def noise(stage, size):
        from diffusers.utils.torch_utils import randn_tensor

        shape = (count, codec.channels, size[0] // codec.factor, size[1] // codec.factor)
        if stage > 0 or latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        given = family.unpack(latents, *size)
        if tuple(given.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {count} image(s) of "
                             f"{size[1]}x{size[0]}: expected {shape}")
        return given.to(device, dtype)

    def on_step(t, x):
        nonlocal done
        if callback_on_step_end is not None:
            x = (callback_on_step_end(pipe, done, t, {"latents": x}) or {}).get("latents", x)
        done += 1
        return x

    images = None
    for stage, size in enumerate(sizes):
        with codec.full_precision(), \
                codec.bounded_memory(vae_tiling is True or (vae_tiling == "auto" and max(size) > native)):
            if stage == 0:
                x, steps_run, guided = _denoise(family, None, noise(stage, size), 1.0, steps, guidance, cond,
                                                uncond, size, generator=generator, on_step=on_step)
            else:
                upsampled = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
                reference = torch.cat([sharpen(part, float(sharpen_amount), sharpen_sigma, rng)
                                       for part, rng in zip(upsampled.chunk(len(sharpen_rngs)), sharpen_rngs)])
                guide = StructureGuidance(reference, codec.decode, codec.encode, wavelet)
                start = codec.encode(reference).to(dtype)
                x, steps_run, guided = _denoise(family, start, noise(stage, size), float(strength), steps,
                                                float(stage_cfg[stage - 1]), cond, uncond, size, guide=guide,
                                                guidance_steps=float(stage_guided[stage - 1]), generator=generator,
                                                on_step=on_step)
                log.info("DiffuseHigh stage %d (%dx%d): %d of %d denoising steps structure-guided",
                         stage, size[1], size[0], guided, steps_run)
            last = stage + 1 == len(sizes) or pipe._interrupt
            if not (last and output_type == "latent"):  # the next stage starts from these images
                images = codec.decode(x).float().clamp(0, 1)
        result.stages.append(_as_output(images, x, output_type))
        result.sizes.append(tuple(size))
        result.seconds.append(time.perf_counter() - started)
        result.steps.append(steps_run)
        result.guided_steps.append(guided)
        if pipe._interrupt:
            break
    return result if return_dict else (result.images,)


def __getattr__(name):
    # DiffusionPipeline takes seconds to import: the pipeline class is made on first use
    if name != "DiffuseHighPipeline":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    class DiffuseHighPipeline(family_pipeline_base()):
        """DiffuseHigh as a diffusers pipeline: `DiffuseHighPipeline.from_pipe(pipe)` shares pipe's components
        (any supported family); calling it is `diffusehigh` with the same arguments."""
        _callback_tensor_inputs = ["latents"]
        __qualname__ = "DiffuseHighPipeline"
        __call__ = diffusehigh

    globals()[name] = DiffuseHighPipeline
    return DiffuseHighPipeline


def generate_hires(pipe, settings, scales, preview=None, stop=None, **knobs):
    """diffusehigh() driven by a GenerationSettings (the CLI/UI path): returns the final stage's images and
    records the guided/denoising steps of each hires stage in settings.extra (so in the PNG).
    preview(step, total, latents) counts steps over all stages; stop() ends early."""
    apply_model_defaults(pipe, settings)
    settings.validate(pipe)
    count = len(parse_scales(scales))
    hires_steps = max(1, int(int(settings.steps) * knobs.get("strength", DEFAULTS["strength"]) + 1e-6))
    callback = step_callback(int(settings.steps) + count * hires_steps, preview, 1, stop)
    out = diffusehigh(pipe, scales=scales, **settings.call_arguments(), callback_on_step_end=callback, **knobs)
    settings.extra["Hires guided steps"] = ", ".join(f"{g}/{n}" for g, n in zip(out.guided_steps[1:], out.steps[1:]))
    return out.images
