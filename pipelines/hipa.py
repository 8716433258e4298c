"""HiPA one-step generation (specs/sampling.md §3): high-frequency operators, the HiPA loss, the
differentiable one-step student, teacher targets, and `one_step` sampling on a loaded pipeline (also as a
diffusers pipeline: `OneStepPipeline.from_pipe(pipe)`).

The authors released no code; this follows the spec's reconstruction [R] and keeps every unverified
choice a knob (HiPALossConfig, the teacher's scheduler/steps/guidance, the adapter's method and rank).
Generator: ONE denoiser call on pure noise z, turned into an x0 prediction: at the terminal timestep T
for VP families (SD, SDXL, PixArt), one Euler step from σ = 1 (x0 = z − v) for flow families (SD3, Flux).
Classifier-free guidance is baked into the adapter (the teacher samples with CFG, the student runs
without), so inference costs exactly one model call per image. Everything that depends on the model
(text encoders, VAE scale and shift, Flux packing, the model call) goes through pipelines.families.
"""
from contextlib import contextmanager
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
# Flow families (SD3, Flux) start at pure noise, σ = 1: timestep σ·1000 in the model's units (pipelines.families).
FLOW_START = 1000.0


def default_timestep(scheduler, min_signal: float = MIN_SIGNAL) -> int:
    """The latest training timestep whose α_t = sqrt(ᾱ_t) is at least min_signal (999 for SD schedules)."""
    alpha = scheduler.alphas_cumprod.double().sqrt()
    keep = torch.nonzero(alpha >= min_signal).flatten()
    return int(keep.max()) if len(keep) else 0


def prediction_to_x0(prediction, sample, alpha_bar, prediction_type: str):
    """Data prediction from a model output at a VP timestep with ᾱ = alpha_bar (the same conversion
    DiffuseHigh's structure guidance uses)."""
    from pipelines.families import predicted_x0

    alpha, sigma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    return predicted_x0(prediction, sample, ("vp", alpha, sigma), prediction_type)


def base_scheduler(pipe):
    """The pipeline's own scheduler (not one `make_scheduler` swapped in): its noise tables define T."""
    return getattr(pipe, "_studio_default_scheduler", pipe.scheduler)


def one_step_timestep(family, timestep=None):
    """The student's timestep in the model's units: T for VP families (default_timestep unless given); σ = 1
    (1000) for flow families, the only start a one-step Euler student has."""
    if family.flow:
        if timestep is not None and float(timestep) != FLOW_START:
            raise ValueError(f"{family.label} takes its one step from σ = 1 (timestep {FLOW_START:g}), "
                             f"not timestep {timestep}")
        return FLOW_START
    return default_timestep(base_scheduler(family.pipe)) if timestep is None else int(timestep)


def student_x0(family, noise, cond, timestep=None, denoiser=None):
    """f_θ(z, c): ONE model call on pure noise z (B x C x h x w), as float32 x0 latents. VP families: the call
    at T, x0 from the ε/v/sample prediction. Flow families: one Euler step from σ = 1 to 0, x0 = z − v(z, 1)
    (Flux dev's distilled guidance at the family default). cond: family.encode_text's dict; denoiser: the
    (accelerate-prepared) module being trained, default the pipeline's own."""
    t = one_step_timestep(family, timestep)
    output = family.predict(noise, t, cond, denoiser=denoiser).float()
    if family.flow:
        return noise.float() - output
    scheduler = base_scheduler(family.pipe)
    alpha_bar = scheduler.alphas_cumprod[t].to(device=noise.device, dtype=torch.float32)
    return prediction_to_x0(output, noise.float(), alpha_bar, scheduler.config.prediction_type)


def latent_shape(pipe, height=None, width=None):
    """(C, h, w) of the denoiser's latents for a height x width image (default: the native size)."""
    from pipelines.families import family_of

    family = family_of(pipe)
    size = family.native_size()
    return family.latent_shape(int(height or size), int(width or size))


def seeded_noise(pipe, count: int, seed: int = 0, height=None, width=None):
    """Noise with one CPU generator per image (seed, seed+1, ...) — the same z `generate` draws, so a
    teacher image and its one-step student start from identical noise."""
    from diffusers.utils.torch_utils import randn_tensor

    from pipelines.text2image import seeded_generators

    return randn_tensor((count, *latent_shape(pipe, height, width)), generator=seeded_generators(seed, count),
                        device=torch.device("cpu"), dtype=torch.float32)


def teacher_sampler(pipe, scheduler="default", spacing=None):
    """(scheduler name, spacing) the teacher really uses. Flow families keep the pipeline's own flow-matching
    scheduler (dpm++, unipc, ... are noise-prediction samplers) and its own timesteps, which start at σ = 1
    where the student starts."""
    from pipelines.families import family_of

    if family_of(pipe).flow:
        return "default", None
    return scheduler or "default", spacing or None


@contextmanager
def teacher_scheduler(pipe, scheduler="default", guidance=None, spacing=None):
    """The pipeline with the teacher's sampler in place (yielded), its own scheduler restored afterwards.

    spacing: None keeps the scheduler's timestep spacing; "leading" (steps_offset 0) starts below t = 999,
    which a schedule with α_999 ≈ 0 needs (the embedded model: its x0 predictions at 999 blow up)."""
    from pipelines.text2image import make_scheduler

    scheduler, spacing = teacher_sampler(pipe, scheduler, spacing)
    previous = pipe.scheduler
    try:
        make_scheduler(pipe, scheduler, guidance=guidance)
        if spacing:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=spacing,
                                                              steps_offset=0)
        yield pipe.scheduler
    finally:
        pipe.scheduler = previous


@torch.no_grad()
def teacher_x0(pipe, prompts, noise, scheduler="dpm++", steps: int = 25, guidance: float = 2.0, spacing=None):
    """The frozen multi-step teacher: the pipeline itself samples from the given noise (B x C x h x w) with its
    guidance (CFG; Flux: the distilled guidance value); returns x0 latents (B, C, h, w) on the CPU.
    scheduler/spacing: see teacher_sampler and teacher_scheduler."""
    from pipelines.families import family_of

    family = family_of(pipe)
    height, width = (int(n) * family.vae_factor for n in noise.shape[-2:])
    with teacher_scheduler(pipe, scheduler, guidance, spacing):
        out = pipe(list(prompts), latents=family.pack(noise.to(pipe.device, family.denoiser.dtype)),
                   num_inference_steps=int(steps), guidance_scale=float(guidance), height=height, width=width,
                   output_type="latent", **family.call_kwargs())
    return family.unpack(out.images, height, width).float().cpu()


def teacher_images(pipe, prompt, num_images=1, seed=0, scheduler="default", steps=25, guidance=2.0, spacing=None):
    """The teacher's images for seeds seed, seed+1, ... (the same noise `generate` and `one_step` draw)."""
    from pipelines.families import family_of

    latents = teacher_x0(pipe, [prompt] * int(num_images), seeded_noise(pipe, int(num_images), seed), scheduler,
                         steps, guidance, spacing)
    return family_of(pipe).preview(latents)


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
            # (prev, x0) as DDIM's tuple: PixArt's pipeline reads [1] when it runs one step
            return DDIMSchedulerOutput(prev_sample=x0, pred_original_sample=x0) if return_dict else (x0, x0)

    return OneStepScheduler


def _flow_one_step_class():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FlowOneStepScheduler(FlowMatchEulerDiscreteScheduler):
        """Flow matching in one Euler step from σ = 1 to 0: timesteps = [1000]; step() returns z − v. The
        shift a pipeline asks for (mu, sigmas) changes nothing: every shift maps σ = 1 to 1."""

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            steps = len(sigmas) if sigmas is not None else int(num_inference_steps or 1)
            if steps != 1:
                raise ValueError(f"the one-step scheduler runs exactly 1 step, not {steps}")
            self.num_inference_steps = 1
            self.sigmas = torch.tensor([1.0, 0.0], device=device)
            self.timesteps = torch.tensor([FLOW_START], device=device)
            self._step_index = self._begin_index = None

    return FlowOneStepScheduler


def one_step_scheduler(pipe, timestep=None):
    """A scheduler whose single step turns one model call on pure noise into x0: at T for VP families
    (OneStepScheduler, ε/v/sample models), one Euler step from σ = 1 for flow families (FlowOneStepScheduler)."""
    from pipelines.families import family_of

    family, base = family_of(pipe), base_scheduler(pipe)
    if family.flow:
        one_step_timestep(family, timestep)  # any other timestep is a mistake: say so rather than ignore it
        return _flow_one_step_class().from_config(base.config)
    scheduler = _one_step_class().from_config(base.config, clip_sample=False, thresholding=False)
    scheduler.one_step_timestep = timestep
    return scheduler


def adapter_info(adapter) -> dict:
    """What a HiPA adapter records about its training (its hipa.json: timestep, size, teacher, ...), or {}."""
    import json
    from pathlib import Path

    if adapter is None or not (Path(adapter) / "hipa.json").is_file():
        return {}
    return json.loads((Path(adapter) / "hipa.json").read_text())


def denoiser(pipe):
    from pipelines.families import family_of

    return family_of(pipe).denoiser


def use_adapter(pipe, adapter, weight: float = 1.0):
    """Attach the HiPA adapter folder to the pipeline's denoiser once (kept across calls); None = use
    the denoiser as it is. Loading another folder replaces the previous HiPA adapter. The record of what is
    attached lives on the denoiser, which pipelines made with from_pipe share."""
    if adapter is None:
        return
    from pathlib import Path

    import adapters

    path = str(Path(adapter).resolve())
    model = denoiser(pipe)
    loaded = getattr(model, "_hipa_adapter", None)
    if loaded == (path, float(weight)):
        return
    if not (Path(path) / "adapter_config.json").is_file():
        raise ValueError(f"not an adapter folder (no adapter_config.json): {adapter}")
    if loaded is not None:
        adapters.remove_adapter(model, ADAPTER_NAME)
        model._hipa_adapter = None
    from pipelines.loading import inside_lora_layers

    # inside the layers a LoRA file loaded by diffusers wrapped (PEFT), where those exist
    adapters.load_adapter(model, path, name=ADAPTER_NAME, weight=float(weight), paths=inside_lora_layers(model))
    model._hipa_adapter = (path, float(weight))


def drop_adapter(pipe):
    """Remove the HiPA adapter use_adapter attached (the pipeline is the plain base again)."""
    model = denoiser(pipe)
    if getattr(model, "_hipa_adapter", None) is not None:
        import adapters

        adapters.remove_adapter(model, ADAPTER_NAME)
        model._hipa_adapter = None


@torch.no_grad()
def one_step(pipe, prompt=None, negative_prompt=None, *, height=None, width=None, num_inference_steps=1,
             guidance_scale=None, num_images_per_prompt=1, generator=None, latents=None, output_type="pil",
             return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, adapter=None,
             weight: float = 1.0, timestep=None, **kwargs):
    """One-step text-to-image (OneStepPipeline's call; this function runs it on the pipeline itself): exactly
    one denoiser call per image, from pure noise, CFG off. It is the pipeline's own call with one_step_scheduler
    (x0 at T for VP families, z − v from σ = 1 for flow families). Returns the pipeline's output (`.images`).

    diffusers' arguments as the pipeline takes them; num_inference_steps can only be 1. guidance_scale defaults
    to one conditional call (the family's single_call_scale: CFG is baked into a HiPA adapter; Flux dev's
    distilled guidance at its default). Without a generator, one CPU generator per image seeded 0, 1, ... (the
    noise `generate` and the teacher draw). height/width: default the size the adapter was trained at (its
    hipa.json), else the native size.
    adapter: a HiPA adapter folder (adapter_config.json + adapter_model.safetensors) attached with `weight`, or
    None for the denoiser as it is (the plain base gives a blurry 1-step image: the baseline HiPA fixes).
    timestep: the one-step timestep T (default: the adapter's hipa.json, else default_timestep).
    """
    from pipelines.families import family_of
    from pipelines.text2image import call_pipeline, check_call, check_size, pipeline_call, seeded_generators

    if num_inference_steps != 1:
        raise ValueError(f"one-step sampling runs exactly 1 step (num_inference_steps=1), not {num_inference_steps}")
    family = family_of(pipe)
    guidance = family.single_call_scale() if guidance_scale is None else guidance_scale
    batch = check_call(prompt, 1, guidance, num_images_per_prompt, generator, output_type,
                       kwargs.get("prompt_embeds"))
    check_size(pipe, height, width)
    use_adapter(pipe, adapter, weight)
    info = adapter_info(adapter)
    size = int(info.get("size") or family.native_size())
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    previous = pipe.scheduler
    pipe.scheduler = one_step_scheduler(pipe, info.get("timestep") if timestep is None else timestep)
    try:
        return call_pipeline(
            pipe, pipeline_call(pipe), callback_on_step_end, callback_on_step_end_tensor_inputs, prompt=prompt,
            height=int(height or size), width=int(width or size), num_inference_steps=1,
            guidance_scale=float(guidance), num_images_per_prompt=int(num_images_per_prompt),
            generator=seeded_generators(0, batch) if generator is None else generator, latents=latents,
            output_type=output_type, return_dict=return_dict, **{**family.call_kwargs(), **kwargs})
    finally:
        pipe.scheduler = previous


def __getattr__(name):
    # DiffusionPipeline takes seconds to import: the pipeline class is made on first use
    if name != "OneStepPipeline":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pipelines.text2image import family_pipeline_base

    class OneStepPipeline(family_pipeline_base()):
        """One-step sampling as a diffusers pipeline: `OneStepPipeline.from_pipe(pipe)` shares pipe's
        components (any supported family); calling it is `one_step` with the same arguments."""
        __qualname__ = "OneStepPipeline"
        __call__ = one_step

    globals()[name] = OneStepPipeline
    return OneStepPipeline
