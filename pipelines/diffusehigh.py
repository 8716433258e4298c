"""DiffuseHigh (Kim et al., AAAI 2025): training-free generation above a model's native resolution.

Generate at the native size; then, per stage: upsample the previous image (bicubic), sharpen it (unsharp
mask), keep its wavelet low band as the structure reference, re-noise it SDEdit-style to `strength`
(the last strength*steps timesteps of the scheduler's own schedule) and denoise at the larger size. For
the first `guidance_steps` of a stage the predicted clean image's low band is replaced by the
reference's ("structure guidance"), so the layout stays the native image's and the model only adds detail.

The guidance edits x̂0 and converts it back into a model output (ε, v or flow velocity), so any
scheduler's own `step` runs unchanged (DDIM, Euler, UniPC, DPM-Solver++, DC-Solver, flow matching).
Works on Stable Diffusion (UNet), PixArt and SD3 (DiT) pipelines, with a VAE or in pixel space.
"""
import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipelines.dwt import WAVELETS, dwt2, idwt2
from pipelines.text2image import family_kwargs, make_scheduler, native_size, size_multiple

MIN_VAE_TILE = 512  # pixels; the smallest VAE tile used above native size (SD1.5's own tile size)
DEFAULTS = dict(strength=0.3, guidance_steps=5, wavelet="db4", sharpen=1.0, sharpen_sigma=(0.1, 2.0))


@dataclass
class HiresOutput:
    """stages[0] is the native image batch, stages[-1] the largest; sizes are (height, width);
    seconds[i] is the wall time from the start until stage i was decoded."""
    stages: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

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
    multiple = size_multiple(pipe)
    base = tuple(int(v) for v in (base_size or (native_size(pipe),) * 2))
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


def _check_position_limit(pipe, sizes):
    """SD3-style DiTs crop a fixed position-embedding table: larger images cannot be expressed at all."""
    transformer = getattr(pipe, "transformer", None)
    limit = getattr(getattr(transformer, "config", None), "pos_embed_max_size", None) if transformer is not None else None
    if limit:
        largest = int(limit) * int(transformer.config.patch_size) * int(getattr(pipe, "vae_scale_factor", 1))
        for h, w in sizes:
            if max(h, w) > largest:
                raise ValueError(f"size {w}x{h} is beyond this model's position embeddings (at most {largest} px a side)")


def _per_stage(value, count, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} needs one value per hires stage ({count}), got {len(values)}")
    return values


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
    """The pipeline's VAE as decode/encode between scaled latents and [0, 1] images; identity without one."""

    def __init__(self, pipe):
        self.vae = getattr(pipe, "vae", None)
        if self.vae is not None:
            self.scale = float(self.vae.config.scaling_factor)
            self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def decode(self, latents):
        if self.vae is None:
            return (latents.float() + 1) / 2
        images = self.vae.decode((latents / self.scale + self.shift).to(self.vae.dtype), return_dict=False)[0]
        return (images.float() + 1) / 2

    def encode(self, images):
        if self.vae is None:
            return images * 2 - 1
        encoded = self.vae.encode((images * 2 - 1).to(self.vae.dtype))
        dist = getattr(encoded, "latent_dist", None)
        latents = dist.mode() if dist is not None else encoded.latents  # the mode: no sampling noise
        return (latents.float() - self.shift) * self.scale

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


# ---------------------------------------------------------------- model families: conditioning and calls

def _family(pipe) -> str:
    unet = getattr(pipe, "unet", None)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) is None:
        return "unet"
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and type(pipe).__name__.startswith("PixArt"):
        return "pixart"
    if transformer is not None and "pooled_projection_dim" in transformer.config:
        return "sd3"
    raise ValueError(f"DiffuseHigh supports Stable Diffusion (UNet), PixArt and SD3 pipelines, not {type(pipe).__name__}")


def _encode_prompt(pipe, family, prompt, negative, count, device) -> dict:
    """Conditioning as (unconditional, conditional) pairs, so each stage can choose its own CFG."""
    if family == "unet":
        pos, neg = pipe.encode_prompt(prompt, device, count, True, negative or None)
        return {"embeds": (neg, pos)}
    if family == "pixart":
        length = family_kwargs(pipe)["max_sequence_length"]
        pos, mask, neg, neg_mask = pipe.encode_prompt(prompt, True, negative_prompt=negative or "",
                                                      num_images_per_prompt=count, device=device,
                                                      clean_caption=False, max_sequence_length=length)
        return {"embeds": (neg, pos), "mask": (neg_mask, mask)}
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, None, None, device=device, num_images_per_prompt=count,
                                                      do_classifier_free_guidance=True, negative_prompt=negative or None)
    return {"embeds": (neg, pos), "pooled": (neg_pooled, pooled)}


def _predict(pipe, family, x_in, t, cond, guidance, size):
    """One denoiser call with classifier-free guidance; returns the model output for the scheduler."""
    use_cfg = guidance > 1
    pick = (lambda pair: torch.cat(pair)) if use_cfg else (lambda pair: pair[1])
    model_in = torch.cat([x_in, x_in]) if use_cfg else x_in
    t_batch = t.reshape(1).to(x_in.device).expand(model_in.shape[0]) if torch.is_tensor(t) else t
    if family == "unet":
        out = pipe.unet(model_in, t, encoder_hidden_states=pick(cond["embeds"]), return_dict=False)[0]
    elif family == "pixart":
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(pipe.transformer, "use_additional_conditions", False):
            added = {"resolution": torch.tensor([size], dtype=x_in.dtype, device=x_in.device).repeat(model_in.shape[0], 1),
                     "aspect_ratio": torch.tensor([[size[0] / size[1]]], dtype=x_in.dtype,
                                                  device=x_in.device).repeat(model_in.shape[0], 1)}
        out = pipe.transformer(model_in, encoder_hidden_states=pick(cond["embeds"]),
                               encoder_attention_mask=pick(cond["mask"]), timestep=t_batch,
                               added_cond_kwargs=added, return_dict=False)[0]
        if out.shape[1] == 2 * x_in.shape[1]:  # learned variance: keep the noise half, as the pipeline does
            out = out.chunk(2, dim=1)[0]
    else:
        out = pipe.transformer(hidden_states=model_in, timestep=t_batch, encoder_hidden_states=pick(cond["embeds"]),
                               pooled_projections=pick(cond["pooled"]), return_dict=False)[0]
    if use_cfg:
        uncond, text = out.chunk(2)
        out = uncond + guidance * (text - uncond)
    return out


# ---------------------------------------------------- scheduler-agnostic x̂0 <-> model output conversion

def noise_level(scheduler, index: int, t):
    """(kind, alpha, sigma) at this step, in the coordinates of the model's input: "vp" means
    x_in = alpha·x0 + sigma·eps (DDIM, UniPC, DPM-Solver, and Euler after scale_model_input);
    "flow" means x = (1 - sigma)·x0 + sigma·eps (flow matching)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if "FlowMatch" in type(scheduler).__name__:
        sigma = float(sigmas[index])
        return "flow", 1.0 - sigma, sigma
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        s = float(sigmas[index])  # Karras/EDM sigma = sigma_t / alpha_t, read off the scheduler's own table
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return "vp", alpha, s * alpha
    abar = float(scheduler.alphas_cumprod[int(t)])
    return "vp", math.sqrt(abar), math.sqrt(1.0 - abar)


def predicted_x0(output, x_in, level, prediction_type):
    kind, alpha, sigma = level
    if kind == "flow":
        return x_in - sigma * output
    if prediction_type == "epsilon":
        return (x_in - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_in - sigma * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction type '{prediction_type}': expected epsilon, v_prediction or sample")


def output_for_x0(x0, x_in, level, prediction_type):
    """The model output under which the scheduler's own formulas recover exactly this x̂0."""
    kind, alpha, sigma = level
    if kind == "flow":
        return (x_in - x0) / sigma
    if prediction_type == "epsilon":
        return (x_in - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x_in - x0) / sigma
    return x0


# ---------------------------------------------------------------------------------------- the sampler

def _set_timesteps(scheduler, steps, device, latent_size, pipe):
    kwargs = {}
    if getattr(scheduler.config, "use_dynamic_shifting", False):  # SD3.5-style resolution-dependent shift
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = int(getattr(pipe.transformer.config, "patch_size", 1))
        c = scheduler.config
        kwargs["mu"] = calculate_shift((latent_size[0] // patch) * (latent_size[1] // patch),
                                       c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    scheduler.set_timesteps(steps, device=device, **kwargs)


def _denoise(pipe, family, x0, noise, strength, steps, guidance, cond, size, guide=None, guidance_steps=0,
             generators=None, on_step=None):
    """SDEdit from x0 (None = pure noise) over the last strength·steps timesteps, with structure guidance
    for the first guidance_steps. Returns the final latents (the scheduler's last prev_sample)."""
    scheduler = pipe.scheduler
    _set_timesteps(scheduler, steps, noise.device, noise.shape[-2:], pipe)
    count = steps if x0 is None else max(1, min(steps, int(steps * strength + 1e-6)))
    start = (steps - count) * getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if x0 is None:
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    elif hasattr(scheduler, "scale_noise"):  # flow matching
        x = scheduler.scale_noise(x0, timesteps[:1], noise)
    else:
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generators} if "generator" in accepted else {}
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = _predict(pipe, family, x_in, t, cond, guidance, size)
        if guide is not None and i < guidance_steps:
            level = noise_level(scheduler, start + i, t)
            x0_hat = predicted_x0(out.float(), x_in.float(), level, prediction)
            out = output_for_x0(guide(x0_hat), x_in.float(), level, prediction).to(out.dtype)
        x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
        if on_step is not None and on_step(i + 1, len(timesteps), x):
            break
    return x


def _to_pil(images: torch.Tensor):
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


@torch.no_grad()
def diffusehigh(pipe, prompt: str, scales=(2, 4), sizes=None, *, negative_prompt: str = "", steps: int = 25,
                guidance: float = 2.0, stage_guidance=None, strength: float = DEFAULTS["strength"],
                guidance_steps: int = DEFAULTS["guidance_steps"], wavelet: str = DEFAULTS["wavelet"],
                sharpen_amount: float = DEFAULTS["sharpen"], sharpen_sigma=DEFAULTS["sharpen_sigma"],
                seed: int = 0, num_images: int = 1, scheduler: str = None, base_size=None,
                vae_tiling="auto", output_type: str = "pil", progress=None) -> HiresOutput:
    """Progressive high-resolution sampling. Returns the images of every stage (native first).

    scales: factors of the native size, e.g. (2, 4); or sizes: target sizes (ints or (h, w)) instead.
    steps/guidance: the native stage; each hires stage denoises the last strength·steps timesteps of a
    steps-long schedule with stage_guidance (default: guidance; a number or one per stage), replacing the
    wavelet low band of x̂0 for its first guidance_steps. sharpen_amount: unsharp mask strength (0 = off).
    scheduler: a name from pipelines.SCHEDULERS (default: the pipeline's). vae_tiling: "auto" tiles and
    slices the VAE above the native size; True/False force it. progress(stage, step, total, latents)
    returning True stops early (the stages finished so far are returned).
    """
    family = _family(pipe)
    if not isinstance(prompt, str):
        raise ValueError("the prompt must be text")
    if not 0 < float(strength) <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if int(steps) < 1 or int(num_images) < 1 or int(guidance_steps) < 0:
        raise ValueError("steps and num_images must be >= 1 and guidance_steps >= 0")
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet '{wavelet}': choose one of {', '.join(WAVELETS)}")
    if float(sharpen_amount) < 0:
        raise ValueError(f"the sharpening amount must be >= 0, got {sharpen_amount}")
    sizes = stage_sizes(pipe, scales, sizes, base_size)
    _check_position_limit(pipe, sizes)
    stage_cfg = _per_stage(guidance if stage_guidance is None else stage_guidance, len(sizes) - 1, "stage_guidance")
    make_scheduler(pipe, scheduler, guidance=guidance)

    started = time.perf_counter()
    device = pipe._execution_device
    dtype = (getattr(pipe, "unet", None) or pipe.transformer).dtype
    codec = _Codec(pipe)
    factor = int(getattr(pipe, "vae_scale_factor", 1)) if codec.vae is not None else 1
    channels = (getattr(pipe, "unet", None) or pipe.transformer).config.in_channels
    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(int(num_images))]
    sharpen_rng = torch.Generator("cpu").manual_seed(int(seed))
    cond = _encode_prompt(pipe, family, prompt, negative_prompt, int(num_images), device)
    native = native_size(pipe)
    result = HiresOutput()
    stopped = []

    def draw(size):
        from diffusers.utils.torch_utils import randn_tensor

        shape = (int(num_images), channels, size[0] // factor, size[1] // factor)
        return randn_tensor(shape, generator=generators, device=device, dtype=dtype)

    def stepper(stage):
        def on_step(step, total, latents):
            if progress is not None and progress(stage, step, total, latents):
                stopped.append(stage)
                return True
            return False
        return on_step

    images = None
    for stage, size in enumerate(sizes):
        with codec.bounded_memory(vae_tiling is True or (vae_tiling == "auto" and max(size) > native)):
            if stage == 0:
                latents = _denoise(pipe, family, None, draw(size), 1.0, int(steps), float(guidance), cond, size,
                                   generators=generators, on_step=stepper(stage))
            else:
                upsampled = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
                reference = sharpen(upsampled, float(sharpen_amount), sharpen_sigma, sharpen_rng)
                guide = StructureGuidance(reference, codec.decode, codec.encode, wavelet)
                start = codec.encode(reference).to(dtype)
                latents = _denoise(pipe, family, start, draw(size), float(strength), int(steps),
                                   float(stage_cfg[stage - 1]), cond, size, guide=guide,
                                   guidance_steps=int(guidance_steps), generators=generators, on_step=stepper(stage))
            images = codec.decode(latents).float().clamp(0, 1)
        result.stages.append(_to_pil(images) if output_type == "pil" else images.cpu())
        result.sizes.append(tuple(size))
        result.seconds.append(time.perf_counter() - started)
        if stopped:
            break
    return result


def generate_hires(pipe, settings, scales, preview=None, stop=None, **knobs):
    """diffusehigh() driven by a GenerationSettings (the CLI/UI path): returns the final stage's images.
    preview(step, total, latents) counts steps over all stages; stop() ends early."""
    settings.validate(pipe)
    base = (settings.height, settings.width) if settings.height or settings.width else None
    if base is not None:
        base = (int(settings.height or native_size(pipe)), int(settings.width or native_size(pipe)))
    count = len(parse_scales(scales))
    hires_steps = max(1, int(int(settings.steps) * knobs.get("strength", DEFAULTS["strength"]) + 1e-6))
    total = int(settings.steps) + count * hires_steps

    def progress(stage, step, _total, latents):
        done = step if stage == 0 else int(settings.steps) + (stage - 1) * hires_steps + step
        if preview is not None:
            preview(min(done, total), total, latents)
        return bool(stop is not None and stop())

    out = diffusehigh(pipe, settings.prompt, scales, negative_prompt=settings.negative_prompt,
                      steps=int(settings.steps), guidance=float(settings.guidance), seed=int(settings.seed),
                      num_images=int(settings.num_images), scheduler=settings.scheduler, base_size=base,
                      progress=progress, **knobs)
    return out.images
