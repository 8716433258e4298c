"""Text-to-image generation on any loaded pipeline: settings, scheduler choice, per-image seeds, previews.

Every door (CLI, UI, Python) ends here, so the same settings give the same image everywhere.
"""
from dataclasses import asdict, dataclass, field

import torch


class GenerationError(ValueError):
    """Settings a user got wrong; the message says what to change."""


def _ddim(config, **_):
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(config)


def _euler(config, **_):
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler.from_config(config)


def _unipc(config, **_):
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler.from_config(config)


def _dpmpp(config, **_):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def _dc_solver(config, pipe=None, guidance=None):
    # The ratios depend on the model and the guidance: with the pipeline at hand, use its own fitted file.
    from pipelines.dcsolver import DCSolverScheduler, dc_solver_from_config, fitted_for
    if pipe is None:
        return dc_solver_from_config(config)
    return DCSolverScheduler.from_config(config, **fitted_for(pipe, "unipc", guidance))


# User-facing sampler name -> factory(scheduler config, pipe=..., guidance=...). "default" keeps the model's own.

SCHEDULERS = {"ddim": _ddim, "euler": _euler, "unipc": _unipc, "dpm++": _dpmpp, "dc-solver": _dc_solver}


def make_scheduler(pipe, name: str, guidance: float | None = None):
    """Swap the pipeline's scheduler by user-facing name (returns the pipeline's scheduler). `guidance` is the
    CFG scale the run will use (DC-Solver's fitted ratios depend on it)."""
    if name in (None, "", "default"):
        return pipe.scheduler
    if name not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler '{name}': choose one of default, {', '.join(SCHEDULERS)}")
    if "FlowMatch" in type(pipe.scheduler).__name__:
        raise GenerationError(f"'{name}' is a noise-prediction sampler; this flow-matching model needs --scheduler default")
    if not hasattr(pipe, "_studio_default_scheduler"):
        pipe._studio_default_scheduler = pipe.scheduler
    pipe.scheduler = SCHEDULERS[name](pipe._studio_default_scheduler.config, pipe=pipe, guidance=guidance)
    return pipe.scheduler


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's own default (studio.json), else 25
    guidance: float | None = None  # None: the model's own default (studio.json), else 2.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    scheduler: str = "default"
    extra: dict = field(default_factory=dict)  # recorded in the PNG (adapters, hires, one-step, base)

    def validate(self, pipe=None):
        if not isinstance(self.prompt, str):
            raise GenerationError("the prompt must be text")
        if self.steps is not None and int(self.steps) < 1:
            raise GenerationError(f"steps must be a positive whole number, got {self.steps}")
        if int(self.num_images) < 1:
            raise GenerationError(f"the number of images must be at least 1, got {self.num_images}")
        if self.guidance is not None and (not (self.guidance == self.guidance) or self.guidance < 0):  # NaN or < 0
            raise GenerationError(f"guidance must be a number >= 0, got {self.guidance}")
        if pipe is not None:
            multiple = size_multiple(pipe)
            for name in ("height", "width"):
                value = getattr(self, name)
                if value is None:
                    continue
                if int(value) < multiple or int(value) % multiple:
                    raise GenerationError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")

    def parameters_text(self) -> str:
        """A1111-style 'parameters' text: prompt line, negative line, then key: value pairs."""
        parts = [f"Steps: {self.steps}", f"Sampler: {self.scheduler}", f"CFG scale: {self.guidance}",
                 f"Seed: {self.seed}", f"Size: {self.width}x{self.height}"]
        parts += [f"{k}: {v}" for k, v in self.extra.items()]
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + "\n" + ", ".join(parts)

    def to_dict(self):
        return asdict(self)


def apply_model_defaults(pipe, settings):
    """Fill steps/guidance left unset with what the model folder recommends (studio.json), else 25 / 2.0."""
    defaults = getattr(pipe, "studio_defaults", None) or {}
    if settings.steps is None:
        settings.steps = int(defaults.get("steps", 25))
    if settings.guidance is None:
        settings.guidance = float(defaults.get("guidance", 2.0))
    return settings


def native_size(pipe) -> int:
    """The pixel size the model was trained at."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
    return int(denoiser.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1))


def size_multiple(pipe) -> int:
    """Height/width must be a multiple of this (VAE factor times UNet downsampling or DiT patch)."""
    vae = int(getattr(pipe, "vae_scale_factor", 1))
    if getattr(pipe, "unet", None) is not None:
        return vae * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae * int(pipe.transformer.config.patch_size)


def family_kwargs(pipe, max_length=None) -> dict:
    """Call arguments some pipeline classes need to run on small text encoders and small sizes."""
    name = type(pipe).__name__
    if name.startswith("PixArt"):
        return {"use_resolution_binning": False, "clean_caption": False,
                "max_sequence_length": max_length or pipe.tokenizer.model_max_length}
    return {}


def generate(pipe, settings: GenerationSettings, preview=None, preview_every: int = 0, stop=None, output_type="pil"):
    """Run the pipeline for `settings`. One CPU generator per image (seed, seed+1, ...) so each image is
    reproducible on its own. preview(step, total, images) is called every `preview_every` steps;
    stop() returning True interrupts after the current step. Returns the images (PIL by default)."""
    apply_model_defaults(pipe, settings)
    settings.validate(pipe)
    make_scheduler(pipe, settings.scheduler, guidance=settings.guidance)
    size = native_size(pipe)
    settings.height = int(settings.height or size)
    settings.width = int(settings.width or size)
    generators = [torch.Generator("cpu").manual_seed(int(settings.seed) + i) for i in range(int(settings.num_images))]
    steps = int(settings.steps)

    def on_step_end(p, i, t, tensors):
        if preview is not None and preview_every and (i + 1) % preview_every == 0 and i + 1 < steps:
            preview(i + 1, steps, tensors["latents"])
        if stop is not None and stop():
            p._interrupt = True
        return tensors

    kwargs = family_kwargs(pipe)
    if settings.negative_prompt:
        kwargs["negative_prompt"] = settings.negative_prompt
    out = pipe(settings.prompt, num_inference_steps=steps, guidance_scale=float(settings.guidance),
               height=settings.height, width=settings.width, num_images_per_prompt=int(settings.num_images),
               generator=generators, output_type=output_type, callback_on_step_end=on_step_end, **kwargs)
    return out.images


def decode_preview(pipe, latents):
    """Latents -> PIL images for a live preview (cheap: the embedded VAEs are tiny)."""
    with torch.no_grad():
        vae = pipe.vae
        scaled = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        images = vae.decode(scaled.to(vae.dtype)).sample
    return pipe.image_processor.postprocess(images, output_type="pil")
