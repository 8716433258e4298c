"""HiPA one-step generation (specs/sampling.md §3): high-frequency operators, the HiPA loss, the
differentiable one-step student, teacher targets, and `one_step` sampling on a loaded pipeline.

The authors released no code; this follows the spec's reconstruction [R] and keeps every unverified
choice a knob (HiPALossConfig, the teacher's scheduler/steps/guidance, the adapter's method and rank).
Generator: ONE denoiser call at the terminal timestep T on pure noise z, turned into an x0 prediction.
Classifier-free guidance is baked into the adapter (the teacher samples with CFG, the student runs
without), so inference costs exactly one model call per image.
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

ADAPTER_NAME = "hipa"
LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------------
# High-frequency operators. Images are (B, C, H, W) float tensors; any value range.

def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): Rec.601 luma for RGB, the channel mean otherwise."""
    if images.shape[1] == 3:
        weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    return images.mean(1, keepdim=True)


def radial_lowpass_mask(height: int, width: int, cutoff: float = 0.125, transition: float = 0.0,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """Centred-at-DC radial low-pass mask in FFT layout (no fftshift), values in [0, 1].

    cutoff: radius in cycles per pixel (0.5 = Nyquist along an axis; 0.125 = 1/8 of the side in
    frequency bins, the spec's suggestion). transition: width of a raised-cosine roll-off around the
    cutoff (0 = hard edge). The high-pass mask is 1 - this, so low + high reconstructs the input exactly.
    """
    if cutoff < 0:
        raise ValueError(f"the high-pass cutoff must be >= 0 cycles per pixel, got {cutoff}")
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.fftfreq(width, device=device, dtype=torch.float64).view(1, -1)
    radius = torch.sqrt(fy ** 2 + fx ** 2)
    if transition <= 0:
        mask = (radius <= cutoff).to(torch.float64)
    else:
        position = ((radius - (cutoff - transition / 2)) / transition).clamp(0, 1)
        mask = 0.5 * (1 + torch.cos(torch.pi * position))
    return mask.to(dtype)


def split_frequencies(images: torch.Tensor, cutoff: float = 0.125, transition: float = 0.0):
    """-> (low, high) with low + high == images (the masks are a partition of unity)."""
    spectrum = torch.fft.fft2(images.float())
    low_mask = radial_lowpass_mask(images.shape[-2], images.shape[-1], cutoff, transition, images.device)
    low = torch.fft.ifft2(spectrum * low_mask).real
    return low.to(images.dtype), (images.float() - low).to(images.dtype)


def highpass(images: torch.Tensor, cutoff: float = 0.125, transition: float = 0.0) -> torch.Tensor:
    """HP(x) = real(IFFT2(FFT2(x) * (1 - M_lowpass))), per channel."""
    spectrum = torch.fft.fft2(images.float())
    high_mask = 1 - radial_lowpass_mask(images.shape[-2], images.shape[-1], cutoff, transition, images.device)
    return torch.fft.ifft2(spectrum * high_mask).real.to(images.dtype)


def _filter3x3(images: torch.Tensor, kernel) -> torch.Tensor:
    gray = luminance(images)
    weight = torch.tensor(kernel, dtype=gray.dtype, device=gray.device).view(1, 1, 3, 3)
    # Reflect padding: a constant image stays exactly zero at the borders too.
    return F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), weight)


SOBEL_X = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
SOBEL_Y = [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]
LAPLACIAN = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]


def sobel_magnitude(images: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Sobel gradient magnitude of the luminance, (B, 1, H, W). Smoothed at zero so its gradient is
    finite on flat regions (sqrt(g² + eps) - sqrt(eps) is exactly 0 there)."""
    gx, gy = _filter3x3(images, SOBEL_X), _filter3x3(images, SOBEL_Y)
    return torch.sqrt(gx ** 2 + gy ** 2 + eps) - eps ** 0.5


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian of the luminance, (B, 1, H, W). Unlike Sobel it sees the Nyquist checkerboard."""
    return _filter3x3(images, LAPLACIAN)


def hf_energy(images: torch.Tensor, cutoff: float = 0.125) -> torch.Tensor:
    """Mean squared high-pass of the luminance, one value per image (B,)."""
    return highpass(luminance(images.float()), cutoff).pow(2).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------
# The HiPA loss: spatial term + high-frequency-promoting terms.

@dataclass
class HiPALossConfig:
    """Weights and operator settings. LPIPS cannot load here (no torchvision, no downloads), so the
    spatial term is a pixel L1/L2; `feature_weight` adds a perceptual-style term when a feature
    network is given (the studio passes its own evaluator classifier)."""
    spatial: str = "l1"            # "l1" or "l2" on decoded pixels
    spatial_weight: float = 1.0
    fft_weight: float = 1.0        # ‖HP(x̂) − HP(x*)‖₁, FFT radial high-pass
    edge_weight: float = 1.0       # ‖Sobel(x̂) − Sobel(x*)‖₁ on luminance
    laplacian_weight: float = 0.0  # ‖Lap(x̂) − Lap(x*)‖₁ (optional; catches checkerboard-scale detail)
    latent_weight: float = 0.1     # small latent L2 for stability (spec §3.2)
    feature_weight: float = 0.0    # L2 between feature_fn(x̂) and feature_fn(x*)
    cutoff: float = 0.125          # cycles per pixel
    transition: float = 0.05       # soft roll-off of the FFT mask
    hf_on_luminance: bool = False  # FFT term on luma instead of per RGB channel

    def __post_init__(self):
        if self.spatial not in ("l1", "l2"):
            raise ValueError(f"HiPA spatial loss must be 'l1' or 'l2', got '{self.spatial}'")
        for f in fields(self):
            if f.name.endswith("_weight") and getattr(self, f.name) < 0:
                raise ValueError(f"HiPA loss weight {f.name} must be >= 0, got {getattr(self, f.name)}")

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_dict(self):
        return asdict(self)


def hipa_loss(student: torch.Tensor, teacher: torch.Tensor, config: HiPALossConfig | None = None,
              student_latents=None, teacher_latents=None, feature_fn=None):
    """student/teacher: decoded images (B, C, H, W) in the same range. Returns (total, {term: float})."""
    config = config or HiPALossConfig()
    teacher = teacher.detach()
    terms = {}
    diff = student - teacher
    terms["spatial"] = (diff.abs().mean() if config.spatial == "l1" else diff.pow(2).mean(), config.spatial_weight)
    if config.fft_weight:
        s, t = (luminance(student), luminance(teacher)) if config.hf_on_luminance else (student, teacher)
        hp = highpass(s, config.cutoff, config.transition) - highpass(t, config.cutoff, config.transition)
        terms["fft"] = (hp.abs().mean(), config.fft_weight)
    if config.edge_weight:
        terms["edge"] = ((sobel_magnitude(student) - sobel_magnitude(teacher)).abs().mean(), config.edge_weight)
    if config.laplacian_weight:
        terms["laplacian"] = ((laplacian(student) - laplacian(teacher)).abs().mean(), config.laplacian_weight)
    if config.latent_weight and student_latents is not None and teacher_latents is not None:
        terms["latent"] = ((student_latents - teacher_latents.detach()).pow(2).mean(), config.latent_weight)
    if config.feature_weight and feature_fn is not None:
        with torch.no_grad():
            target = feature_fn(teacher)
        terms["feature"] = ((feature_fn(student) - target).pow(2).mean(), config.feature_weight)
    total = sum(value * weight for value, weight in terms.values())
    return total, {name: float(value.detach()) for name, (value, _) in terms.items()}


# ----------------------------------------------------------------------------------------------------
# The one-step student (differentiable; used by training and checked against the pipeline path).

# HiPA's SD setting has α_999 ≈ 0.068. Schedules that reach α ≈ 0 at the last step (cosine, zero-SNR)
# would amplify ε errors by 1/α (~20,000x for squaredcos_cap_v2 at t = 999), so the default one-step
# timestep is the latest one that keeps at least this signal scale. [R]; a knob (`timestep=`).
MIN_SIGNAL = 0.06


def default_timestep(scheduler, min_signal: float = MIN_SIGNAL) -> int:
    """The latest training timestep whose α_t = sqrt(ᾱ_t) is at least min_signal (999 for SD schedules)."""
    alpha = scheduler.alphas_cumprod.double().sqrt()
    keep = torch.nonzero(alpha >= min_signal).flatten()
    return int(keep.max()) if len(keep) else 0


def prediction_to_x0(prediction, sample, alpha_bar, prediction_type: str):
    """Data prediction from a model output at a VP timestep with ᾱ = alpha_bar (the same conversion
    DiffuseHigh's structure guidance uses)."""
    from pipelines.diffusehigh import predicted_x0

    alpha, sigma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    return predicted_x0(prediction, sample, ("vp", alpha, sigma), prediction_type)


def student_x0(unet, scheduler, noise, encoder_hidden_states, timestep=None):
    """f_θ(z, c) = D(z, T, c): one UNet call at timestep T (default_timestep) on pure noise, as x0 latents."""
    timestep = default_timestep(scheduler) if timestep is None else int(timestep)
    alpha_bar = scheduler.alphas_cumprod[timestep].to(device=noise.device, dtype=torch.float32)
    t = torch.full((noise.shape[0],), timestep, device=noise.device, dtype=torch.long)
    prediction = unet(noise, t, encoder_hidden_states=encoder_hidden_states).sample
    return prediction_to_x0(prediction.float(), noise.float(), alpha_bar, scheduler.config.prediction_type)


def decode_latents(vae, latents):
    """Latents (as the UNet sees them) -> images in [-1, 1]; differentiable through the decoder."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample


def encode_prompts(pipe, prompts, device=None):
    """Conditional text states (no CFG) for a list of prompts: (B, L, D)."""
    device = device or pipe.device
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return embeds


def latent_shape(pipe, height=None, width=None):
    from pipelines.text2image import native_size

    size = native_size(pipe)
    factor = int(getattr(pipe, "vae_scale_factor", 1))
    return (int(pipe.unet.config.in_channels), int(height or size) // factor, int(width or size) // factor)


def seeded_noise(pipe, count: int, seed: int = 0, height=None, width=None):
    """Noise with one CPU generator per image (seed, seed+1, ...) — the same z `generate` draws, so a
    teacher image and its one-step student start from identical noise."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(count)]
    return randn_tensor((count, *latent_shape(pipe, height, width)), generator=generators,
                        device=torch.device("cpu"), dtype=torch.float32)


@torch.no_grad()
def teacher_x0(pipe, prompts, noise, scheduler="dpm++", steps: int = 25, guidance: float = 2.0, spacing=None):
    """The frozen multi-step teacher: sample from the given noise with CFG; returns x0 latents (B, C, h, w).

    spacing: None keeps the scheduler's timestep spacing; "leading" (steps_offset 0) starts below t = 999,
    which a schedule with α_999 ≈ 0 needs (the embedded model: its x0 predictions at 999 blow up).
    The pipeline's scheduler is restored afterwards."""
    from pipelines.text2image import family_kwargs, make_scheduler

    previous = pipe.scheduler
    try:
        make_scheduler(pipe, scheduler, guidance=guidance)
        if spacing:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=spacing,
                                                              steps_offset=0)
        factor = int(getattr(pipe, "vae_scale_factor", 1))
        out = pipe(list(prompts), latents=noise.to(pipe.device, pipe.unet.dtype), num_inference_steps=int(steps),
                   guidance_scale=float(guidance), height=noise.shape[-2] * factor, width=noise.shape[-1] * factor,
                   output_type="latent", **family_kwargs(pipe))
    finally:
        pipe.scheduler = previous
    return out.images.float().cpu()


def teacher_images(pipe, prompt, num_images=1, seed=0, scheduler="default", steps=25, guidance=2.0, spacing=None):
    """The teacher's images for seeds seed, seed+1, ... (the same noise `generate` and `one_step` draw)."""
    latents = teacher_x0(pipe, [prompt] * int(num_images), seeded_noise(pipe, int(num_images), seed), scheduler,
                         steps, guidance, spacing)
    with torch.no_grad():
        images = decode_latents(pipe.vae, latents.to(pipe.device, pipe.vae.dtype))
    return pipe.image_processor.postprocess(images.float().cpu(), output_type="pil")


# ----------------------------------------------------------------------------------------------------
# One-step sampling on a loaded pipeline.

def _one_step_class():
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class OneStepScheduler(DDIMScheduler):
        """DDIM's noise tables with one step: timesteps = [T]; step() returns the x0 prediction at T
        (the spec's "tiny OneStepScheduler"). T is the attribute `one_step_timestep`."""
        one_step_timestep = None

        def set_timesteps(self, num_inference_steps=1, device=None, **kwargs):
            if int(num_inference_steps) != 1:
                raise ValueError(f"the one-step scheduler runs exactly 1 step, not {num_inference_steps}")
            t = default_timestep(self) if self.one_step_timestep is None else int(self.one_step_timestep)
            self.num_inference_steps = 1
            self.timesteps = torch.tensor([t], dtype=torch.long, device=device)

        def step(self, model_output, timestep, sample, return_dict=True, **kwargs):
            alpha_bar = self.alphas_cumprod[int(timestep)].to(sample.device, torch.float32)
            x0 = prediction_to_x0(model_output.float(), sample.float(), alpha_bar,
                                  self.config.prediction_type).to(sample.dtype)
            return DDIMSchedulerOutput(prev_sample=x0, pred_original_sample=x0) if return_dict else (x0,)

    return OneStepScheduler


def one_step_scheduler(pipe, timestep=None):
    """A scheduler whose single step maps the prediction at timestep T on pure noise to x0 (ε/v/sample
    models), or Euler from sigma 1 to 0 for flow-matching models (already one exact step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = getattr(pipe, "_studio_default_scheduler", pipe.scheduler)
    if "FlowMatch" in type(base).__name__:
        return FlowMatchEulerDiscreteScheduler.from_config(base.config)
    scheduler = _one_step_class().from_config(base.config, clip_sample=False, thresholding=False)
    scheduler.one_step_timestep = timestep
    return scheduler


def adapter_timestep(adapter):
    """The one-step timestep a HiPA adapter was trained at (its hipa.json), or None."""
    import json
    from pathlib import Path

    if adapter is None:
        return None
    info = Path(adapter) / "hipa.json"
    if info.is_file():
        value = json.loads(info.read_text()).get("timestep")
        return int(value) if value is not None else None
    return None


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def use_adapter(pipe, adapter, weight: float = 1.0):
    """Attach the HiPA adapter folder to the pipeline's denoiser once (kept across calls); None = use
    the denoiser as it is. Loading another folder replaces the previous HiPA adapter."""
    if adapter is None:
        return
    from pathlib import Path

    import adapters

    path = str(Path(adapter).resolve())
    model = denoiser(pipe)
    loaded = getattr(pipe, "_hipa_adapter", None)
    if loaded == (path, float(weight)):
        return
    if not (Path(path) / "adapter_config.json").is_file():
        raise ValueError(f"not an adapter folder (no adapter_config.json): {adapter}")
    if loaded is not None:
        adapters.remove_adapter(model, ADAPTER_NAME)
        pipe._hipa_adapter = None
    adapters.load_adapter(model, path, name=ADAPTER_NAME, weight=float(weight))
    pipe._hipa_adapter = (path, float(weight))


def drop_adapter(pipe):
    """Remove the HiPA adapter use_adapter attached (the pipeline is the plain base again)."""
    if getattr(pipe, "_hipa_adapter", None) is not None:
        import adapters

        adapters.remove_adapter(denoiser(pipe), ADAPTER_NAME)
        pipe._hipa_adapter = None


@torch.no_grad()
def one_step(pipe, prompt, adapter=None, num_images: int = 1, seed: int = 0, height=None, width=None,
             weight: float = 1.0, output_type: str = "pil", timestep=None):
    """One-step text-to-image: exactly one denoiser call per image, from pure noise, CFG off.

    adapter: a HiPA adapter folder (adapter_config.json + adapter_model.safetensors), or None for the
    pipeline as it is (the plain base gives a blurry 1-step image: the baseline HiPA fixes).
    Noise per image comes from seed, seed+1, ... as in `generate`, so results match the teacher's seeds.
    timestep: the one-step timestep T (default: the adapter's hipa.json, else default_timestep).
    """
    from pipelines.text2image import family_kwargs, native_size

    if int(num_images) < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images}")
    use_adapter(pipe, adapter, weight)
    size = native_size(pipe)
    height, width = int(height or size), int(width or size)
    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(int(num_images))]
    previous = pipe.scheduler
    if timestep is None:
        timestep = adapter_timestep(adapter)
    pipe.scheduler = one_step_scheduler(pipe, timestep)
    try:
        kwargs = family_kwargs(pipe)
        out = pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=height, width=width,
                   num_images_per_prompt=int(num_images), generator=generators, output_type=output_type, **kwargs)
    finally:
        pipe.scheduler = previous
    return out.images
