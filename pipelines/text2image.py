"""Text-to-image generation on any loaded pipeline, called as diffusers pipelines are called.

`generate(pipe, prompt, num_inference_steps=..., guidance_scale=..., generator=...)` is the pipeline's own call
with what the studio knows filled in: the model's recommended steps and guidance, its native size, the arguments
its family needs, reproducible per-image seeds, a scheduler by name, and step callbacks on every family.
DiffuseHigh and one-step sampling are pipelines in diffusers' shape built on `family_pipeline_base()`.
GenerationSettings is the studio's own settings object (CLI, UI, PNG metadata); `generate_from` runs one.

Every door (CLI, UI, Python) ends here, so the same settings give the same image everywhere.
"""
import functools
import inspect
from dataclasses import asdict, dataclass, field

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What load_pipeline and make_scheduler put on a pipeline; from_pipe carries them to the new one.
STUDIO_ATTRIBUTES = ("source", "studio_defaults", "attention_backend", "tf32", "channels_last",
                     "_studio_default_scheduler")


class GenerationError(ValueError):
    """Settings a user got wrong; the message says what to change."""


# UniPC and DPM-Solver++ keep a model's "refined" spacing (pipelines/grids.py); DDIM and Euler, which cannot take
# it, start at the usable T with trailing spacing instead (stock_config). On a flow-matching model (SD3, Flux) UniPC,
# DPM-Solver++ and DC-Solver run in their flow mode on the model's own shifted sigmas (flow_solver_config) and Euler
# is diffusers' FlowMatchEulerDiscreteScheduler; DDIM has no flow form.

def _ddim(config, **_):
    from diffusers import DDIMScheduler

    from pipelines.grids import is_flow_config, stock_config
    if is_flow_config(config):
        raise GenerationError("'ddim' is a noise-prediction sampler; this flow-matching model takes euler, unipc, "
                              "dpm++ or dc-solver")
    return DDIMScheduler.from_config(stock_config(config))


def _euler(config, **_):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from pipelines.grids import is_flow_config, stock_config
    if is_flow_config(config):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return EulerDiscreteScheduler.from_config(stock_config(config))


def _solver_config(config):
    from pipelines.grids import flow_solver_config, is_flow_config
    return flow_solver_config(config) if is_flow_config(config) else config


def _unipc(config, **_):
    from pipelines.grids import RefinedUniPCScheduler
    return RefinedUniPCScheduler.from_config(_solver_config(config))


def _dpmpp(config, **_):
    from pipelines.grids import RefinedDPMSolverScheduler
    return RefinedDPMSolverScheduler.from_config(_solver_config(config), algorithm_type="dpmsolver++")


def _dc_solver(config, pipe=None, guidance=None):
    # The ratios depend on the model and the guidance: with the pipeline at hand, use its own fitted file.
    from pipelines.dcsolver import DCSolverScheduler, dc_solver_from_config, fitted_for
    config = _solver_config(config)
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
    if not hasattr(pipe, "_studio_default_scheduler"):
        pipe._studio_default_scheduler = pipe.scheduler
    pipe.scheduler = SCHEDULERS[name](pipe._studio_default_scheduler.config, pipe=pipe, guidance=guidance)
    return pipe.scheduler


@dataclass
class GenerationSettings:
    """The studio's settings for one generation (what the CLI and UI fill, recorded in each PNG); `generate_from`
    runs them through `generate` (call_arguments says how they map onto diffusers' names)."""
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
            check_size(pipe, self.height, self.width)

    def call_arguments(self) -> dict:
        """These settings as `generate`'s (diffusers') arguments: one CPU generator per image from `seed`."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt or None, num_inference_steps=self.steps,
                    guidance_scale=self.guidance, height=self.height, width=self.width,
                    num_images_per_prompt=int(self.num_images),
                    generator=seeded_generators(self.seed, self.num_images), scheduler=self.scheduler)

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


def model_defaults(pipe) -> tuple:
    """(steps, guidance) the model folder recommends (studio.json), else (25, 2.0)."""
    defaults = getattr(pipe, "studio_defaults", None) or {}
    return int(defaults.get("steps", 25)), float(defaults.get("guidance", 2.0))


def apply_model_defaults(pipe, settings):
    """Fill steps/guidance left unset with what the model folder recommends (studio.json), else 25 / 2.0."""
    steps, guidance = model_defaults(pipe)
    if settings.steps is None:
        settings.steps = steps
    if settings.guidance is None:
        settings.guidance = guidance
    return settings


def native_size(pipe) -> int:
    """The pixel size the model was trained at."""
    from pipelines.families import family_of

    return family_of(pipe).native_size()


def size_multiple(pipe) -> int:
    """Height/width must be a multiple of this (VAE factor times UNet downsampling or DiT patch)."""
    from pipelines.families import family_of

    return family_of(pipe).size_multiple()


def family_kwargs(pipe, max_length=None) -> dict:
    """Call arguments some pipeline classes need to run on small text encoders and small sizes."""
    from pipelines.families import family_of

    return family_of(pipe).call_kwargs(max_length)


# ------------------------------------------------------------------------------ diffusers' call arguments

def seeded_generators(seed: int, count: int) -> list:
    """One CPU generator per image, seeded seed, seed+1, ... (diffusers' advice: each image reproducible on its
    own). Every sampling entry draws from seeded_generators(0, batch) when given no generator."""
    return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(int(count))]


def check_size(pipe, height, width):
    """One-line errors for a height or width (None: the default) this model cannot draw."""
    multiple = size_multiple(pipe)
    for name, value in (("height", height), ("width", width)):
        if value is not None and (int(value) < multiple or int(value) % multiple):
            raise GenerationError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")


def check_call(prompt, num_inference_steps, guidance_scale, num_images_per_prompt, generator=None,
               output_type="pil", prompt_embeds=None) -> int:
    """One-line errors for call arguments a pipeline would fail on late or unclearly; returns the batch size
    (prompts x num_images_per_prompt)."""
    if isinstance(prompt, str):
        prompts = 1
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = len(prompt)
    elif prompt is None and prompt_embeds is not None:
        prompts = len(prompt_embeds)
    else:
        raise GenerationError("prompt must be text or a list of texts")
    if int(num_inference_steps) < 1:
        raise GenerationError(f"num_inference_steps must be a positive whole number, got {num_inference_steps}")
    if not (guidance_scale == guidance_scale) or guidance_scale < 0:  # NaN or < 0
        raise GenerationError(f"guidance_scale must be a number >= 0, got {guidance_scale}")
    if int(num_images_per_prompt) < 1:
        raise GenerationError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    if output_type not in OUTPUT_TYPES:
        raise GenerationError(f"unknown output_type '{output_type}': use {', '.join(OUTPUT_TYPES)}")
    batch = prompts * int(num_images_per_prompt)
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise GenerationError(f"{len(generator)} generators for {batch} images: give one per image, or one for all")
    return batch


class _Interrupted(Exception):
    """Ends a pipeline's loop from inside its legacy per-step callback (pipelines with no interrupt flag)."""


def call_pipeline(pipe, call, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, **kwargs):
    """call(**kwargs), a pipeline's own __call__, with diffusers' step callback also where the pipeline predates
    it: PixArt-α/Σ take only the legacy callback(step, t, latents), so the studio adapts to it ("latents" is the
    one tensor input; a returned dict may replace them) and an interrupt ends the loop with the latents so far
    decoded, as diffusers' other pipelines do."""
    parameters = inspect.signature(call).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:  # diffusers' pipelines would take them silently into **kwargs and ignore them
        raise GenerationError(f"{type(pipe).__name__} takes no argument {', '.join(unknown)}")
    if callback_on_step_end is None:
        return call(**kwargs)
    if "callback_on_step_end" in parameters:
        if callback_on_step_end_tensor_inputs is not None:
            kwargs["callback_on_step_end_tensor_inputs"] = callback_on_step_end_tensor_inputs
        return call(callback_on_step_end=callback_on_step_end, **kwargs)
    asked = set(callback_on_step_end_tensor_inputs or ["latents"]) - {"latents"}
    if asked:
        raise GenerationError(f"{type(pipe).__name__} gives its step callback only latents, "
                              f"not {', '.join(sorted(asked))}")
    last = {}

    def legacy(step, t, latents):
        returned = callback_on_step_end(pipe, step, t, {"latents": latents}) or {}
        if returned.get("latents") is not None and returned["latents"] is not latents:
            latents.copy_(returned["latents"])  # the loop goes on with this very tensor
        last["latents"] = latents
        if getattr(pipe, "_interrupt", False):
            raise _Interrupted

    pipe._interrupt = False
    try:
        return call(callback=legacy, callback_steps=1, **kwargs)
    except _Interrupted:
        return _decoded(pipe, last["latents"], parameters, kwargs)


@torch.no_grad()
def _decoded(pipe, latents, parameters, kwargs):
    """What the pipeline returns for these latents (an interrupted legacy loop)."""
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    from pipelines.families import family_of

    output_type = kwargs.get("output_type", "pil")
    images = latents
    if output_type != "latent":
        images = family_of(pipe).decode_latents(latents)
        binning = parameters.get("use_resolution_binning")
        if kwargs.get("use_resolution_binning", binning.default if binning else False):
            size = native_size(pipe)
            images = pipe.image_processor.resize_and_crop_tensor(images, int(kwargs.get("width") or size),
                                                                 int(kwargs.get("height") or size))
        images = pipe.image_processor.postprocess(images, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return ImagePipelineOutput(images=images) if kwargs.get("return_dict", True) else (images,)


def step_callback(total: int, preview=None, every: int = 1, stop=None):
    """A diffusers callback_on_step_end for the CLI/UI: preview(step, total, latents) every `every` steps (not
    after the last); stop() returning True interrupts after the current step. None when there is nothing to do."""
    if preview is None and stop is None:
        return None

    def on_step_end(pipe, i, t, tensors):
        if preview is not None and every and (i + 1) % every == 0 and i + 1 < total:
            preview(i + 1, total, tensors["latents"])
        if stop is not None and stop():
            pipe._interrupt = True
        return tensors

    return on_step_end


# ----------------------------------------------------------------------------------------------- generate

def generate(pipe, prompt=None, negative_prompt=None, *, height=None, width=None, num_inference_steps=None,
             guidance_scale=None, num_images_per_prompt=1, generator=None, latents=None, output_type="pil",
             return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None,
             scheduler="default", **kwargs):
    """The pipeline's own call, with diffusers' arguments and the studio's defaults for what is left out:
    num_inference_steps and guidance_scale the model recommends (studio.json, else 25 and 2.0), its native
    height/width, the arguments its family needs on small encoders (family_kwargs), and with no generator one CPU
    generator per image seeded 0, 1, ... (seeded_generators). scheduler: a name from SCHEDULERS ("default": the
    pipeline's own). callback_on_step_end works on every family. Other keywords go to the pipeline.
    Returns the pipeline's output (`.images`), or a tuple with return_dict=False."""
    steps, guidance = model_defaults(pipe)
    steps = steps if num_inference_steps is None else num_inference_steps
    guidance = guidance if guidance_scale is None else guidance_scale
    batch = check_call(prompt, steps, guidance, num_images_per_prompt, generator, output_type,
                       kwargs.get("prompt_embeds"))
    check_size(pipe, height, width)
    make_scheduler(pipe, scheduler, guidance=float(guidance))
    size = native_size(pipe)
    if negative_prompt is not None:  # PixArt's default is "", which None would replace
        kwargs["negative_prompt"] = negative_prompt
    return call_pipeline(
        pipe, pipeline_call(pipe), callback_on_step_end, callback_on_step_end_tensor_inputs, prompt=prompt,
        height=int(height or size), width=int(width or size), num_inference_steps=int(steps),
        guidance_scale=float(guidance), num_images_per_prompt=int(num_images_per_prompt),
        generator=seeded_generators(0, batch) if generator is None else generator, latents=latents,
        output_type=output_type, return_dict=return_dict, **{**family_kwargs(pipe), **kwargs})


def generate_from(pipe, settings: GenerationSettings, preview=None, preview_every: int = 0, stop=None,
                  output_type="pil"):
    """`generate` for a GenerationSettings (the CLI/UI path); fills the settings in (steps, guidance, size) so
    the PNG records what ran. preview(step, total, latents) is called every `preview_every` steps; stop()
    returning True interrupts after the current step. Returns the images."""
    apply_model_defaults(pipe, settings)
    settings.validate(pipe)
    size = native_size(pipe)
    settings.height = int(settings.height or size)
    settings.width = int(settings.width or size)
    callback = step_callback(int(settings.steps), preview, preview_every, stop)
    return generate(pipe, **settings.call_arguments(), output_type=output_type, callback_on_step_end=callback).images


def decode_preview(pipe, latents, height=None, width=None):
    """Latents as the pipeline's step callback holds them -> PIL images for a live preview (cheap: the embedded
    VAEs are tiny). height/width (pixels) are needed only for packed latents (Flux) of a non-square image."""
    from pipelines.families import family_of

    family = family_of(pipe)
    return family.preview(family.unpack(latents, height, width))


# ------------------------------------------------------------------------- samplers as diffusers pipelines

@functools.cache
def family_pipeline_base():
    """The base class of the studio's samplers as diffusers pipelines (DiffuseHighPipeline, OneStepPipeline),
    made on first use: DiffusionPipeline takes seconds to import."""
    from diffusers import DiffusionPipeline

    class FamilyPipeline(DiffusionPipeline):
        """A sampler for every supported family. `from_pipe(pipe)` is diffusers' own: the new pipeline holds the
        same component objects (nothing is copied or loaded). Its class derives from both the sampler and the
        loaded pipeline's class, so the family layer and the pipeline's own methods work on it."""
        __qualname__ = "FamilyPipeline"

        @classmethod
        def from_pipe(cls, pipeline, **kwargs):
            """dtype defaults to the pipeline's own: diffusers' default (float32) would convert the shared
            components of a half-precision pipeline in place."""
            from pipelines.families import family_of

            family_of(pipeline)  # an unsupported pipeline ends here, in one line
            sampler = next(c for c in cls.__mro__ if FamilyPipeline in c.__bases__)
            combined = _sampler_for(sampler, pipeline_class(pipeline))
            if "dtype" not in kwargs and "torch_dtype" not in kwargs:
                kwargs["dtype"] = pipeline.dtype
            new = super(FamilyPipeline, combined).from_pipe(pipeline, **kwargs)
            for name in STUDIO_ATTRIBUTES:
                if hasattr(pipeline, name):
                    setattr(new, name, getattr(pipeline, name))
            return new

    return FamilyPipeline


@functools.cache
def _sampler_for(sampler, base):
    """The class of `sampler` (a FamilyPipeline) on pipelines of class `base`."""
    return type(sampler.__name__, (sampler, base), {"__module__": sampler.__module__, "__doc__": sampler.__doc__})


def pipeline_class(pipe):
    """The loaded pipeline's own class, under any studio sampler made from it."""
    sampler = family_pipeline_base()
    return next(c for c in type(pipe).__mro__ if not issubclass(c, sampler))


def pipeline_call(pipe):
    """The loaded pipeline's own __call__, bound to `pipe` (also when pipe is a studio sampler)."""
    return pipeline_class(pipe).__call__.__get__(pipe)
