"""Generation as the application does it: cached pipelines, output files, the same path for CLI and UI."""
import logging
import re
import sys
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

_PIPES: OrderedDict = OrderedDict()
MAX_CACHED = 2


def get_pipeline(base="embedded", device=None, dtype=None, attention="auto", channels_last=False):
    """Load a pipeline once per process (least-recently-used cache of MAX_CACHED)."""
    from pipelines import load_pipeline

    key = (str(base), str(device), str(dtype), attention, bool(channels_last))
    if key in _PIPES:
        _PIPES.move_to_end(key)
        return _PIPES[key]
    pipe = load_pipeline(base, device=device, dtype=dtype, attention=attention, channels_last=channels_last)
    pipe.set_progress_bar_config(disable=True)
    _PIPES[key] = pipe
    while len(_PIPES) > MAX_CACHED:
        _PIPES.popitem(last=False)
    return pipe


def output_paths(out, count: int):
    """out.png -> [out.png] for one image, [out-0.png, out-1.png, ...] for several; a folder -> numbered files."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        return [out / f"{i:04d}.png" for i in range(count)]
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


ADAPTER_PREFIX = "studio:"  # names of the studio adapters apply_adapters attaches (others are left alone)
LORA_PREFIX = "studio_lora_"  # diffusers adapter names of the LoRA files it loads (PEFT names take no '.' or ':')
log = logging.getLogger("studio.generate")


def apply_adapters(pipe, adapters=None) -> list:
    """Make exactly `adapters` ([(path, weight), ...]) active on the pipeline; returns the attached names.

    A path is a studio adapter folder (adapter_config.json + adapter_model.safetensors), attached to the denoiser by
    adapters.load_adapter, or a LoRA file made elsewhere (see studio.library.lora_file: kohya/A1111, diffusers/PEFT,
    ComfyUI or LyCORIS LoCon keys), loaded by the pipeline's own diffusers `load_lora_weights` (its converters) and
    weighted with `set_adapters`. Ones already attached only get their new weight, ones no longer asked for are
    removed, and one whose file changed on disk is loaded again."""
    import hashlib

    import adapters as adapter_lib

    from pipelines.families import family_of
    from pipelines.hipa import drop_adapter
    from pipelines.loading import inside_lora_layers
    from studio.library import WEIGHTS_NAME, lora_file

    model = family_of(pipe).denoiser
    studio_wanted, files_wanted = {}, {}
    for path, weight in adapters or []:
        path = Path(path).expanduser().resolve()
        file = lora_file(path)
        weights = file or path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no adapter at {path} (an adapter folder with adapter_config.json + {WEIGHTS_NAME}, "
                                    f"or a LoRA .safetensors file)")
        stamp = hashlib.sha1(f"{weights}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:10]
        if file is not None:
            name = f"{LORA_PREFIX}{re.sub(r'[^A-Za-z0-9_]+', '_', path.stem)[:40]}_{stamp}"
            files_wanted[name] = (file, files_wanted.get(name, (file, 0.0))[1] + float(weight))
        else:
            name = f"{ADAPTER_PREFIX}{path.name}:{stamp}"
            studio_wanted[name] = (path, studio_wanted.get(name, (path, 0.0))[1] + float(weight))
    loaded = _loaded_lora_files(pipe)
    if set(loaded) != set(files_wanted):
        # diffusers wraps the layers a LoRA changes (PEFT) and the studio's adapters sit inside those wrappers:
        # they come off before any wrapper changes and go back on below.
        for name in adapter_lib.list_adapters(model):
            if name.startswith(ADAPTER_PREFIX):
                adapter_lib.remove_adapter(model, name)
        drop_adapter(pipe)  # a HiPA adapter too: one_step attaches it again, inside the new wrappers
        stale = [name for name in loaded if name not in files_wanted]
        if stale:
            pipe.delete_adapters(stale)
            if not any(pipe.get_list_adapters().values()):
                pipe.unload_lora_weights()  # the plain layers back, not empty wrappers
        for name, (file, _) in files_wanted.items():
            if name not in loaded:
                _load_lora_file(pipe, file, name)
    if files_wanted:
        pipe.set_adapters(list(files_wanted), adapter_weights=[weight for _, weight in files_wanted.values()])
    attached = adapter_lib.list_adapters(model)
    for name in attached:
        if name.startswith(ADAPTER_PREFIX) and name not in studio_wanted:
            adapter_lib.remove_adapter(model, name)
    inside = inside_lora_layers(model)
    for name, (folder, weight) in studio_wanted.items():
        if name in attached:
            adapter_lib.set_weights(model, {name: weight})
        else:
            adapter_lib.load_adapter(model, folder, name=name, weight=weight, paths=inside)
    return list(files_wanted) + list(studio_wanted)


def _loaded_lora_files(pipe) -> list:
    """The LoRA files apply_adapters loaded into the pipeline (diffusers adapter names), on any component."""
    if not hasattr(pipe, "get_list_adapters"):
        return []
    return sorted({n for names in pipe.get_list_adapters().values() for n in names if n.startswith(LORA_PREFIX)})


def _lora_layers(module, name: str) -> int:
    """How many layers of `module` carry diffusers adapter `name`."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None or module is None:
        return 0
    return sum(1 for m in module.modules() if isinstance(m, tuners.BaseTunerLayer)
               and any(name in getattr(m, attr, {}) for attr in m.adapter_layer_names))


def _load_lora_file(pipe, file: Path, name: str):
    """Load one LoRA file as diffusers adapter `name` through the pipeline's own `load_lora_weights`. A text-encoder
    part diffusers cannot put on this pipeline is left out and named in a warning; a file that gives the denoiser
    nothing, or that diffusers refuses, is a LoraFileError (one line)."""
    from pipelines.families import family_of
    from studio.library import LORA_WEIGHTS, LoraFileError, describe_lora_file

    info = describe_lora_file(file)  # a file in no known layout ends here
    family = family_of(pipe)
    shown = f"{file.parent.name}/{file.name}" if file.name == LORA_WEIGHTS else file.name
    where = f"this {family.label} pipeline"
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraFileError(f"{shown}: diffusers has no LoRA loader for {type(pipe).__name__}; LoRA files load on "
                            f"Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines")
    text_parts = sorted(p for p in info["parts"] if p.startswith("text_encoder"))
    try:
        _diffusers_load(pipe, file, name)
    except Exception as exc:  # noqa: BLE001 - diffusers and peft raise many types for files they cannot map
        _unload(pipe, name)
        if not text_parts:
            raise LoraFileError(f"{shown} ({info['summary']}) does not load on {where}: {_first_line(exc)}") from None
        try:  # diffusers loads the denoiser part first: the text encoders may be what failed
            _diffusers_load(pipe, file, name, drop_text_encoders=True)
        except Exception as again:  # noqa: BLE001
            _unload(pipe, name)
            raise LoraFileError(f"{shown} ({info['summary']}) does not load on {where}: {_first_line(again)}") from None
        encoders = ", ".join(f"{p} ({type(getattr(pipe, p, None)).__name__})" for p in text_parts if hasattr(pipe, p))
        log.warning("%s: text-encoder part (%s) skipped: diffusers cannot put it on this pipeline's %s (%s)", shown,
                    ", ".join(text_parts), encoders or "text encoders", _first_line(exc))
    component = family.component
    counts = {part: _lora_layers(getattr(pipe, part, None), name)
              for part in (component, "text_encoder", "text_encoder_2", "text_encoder_3")}
    if not counts[component]:
        _unload(pipe, name)
        raise LoraFileError(f"{shown} ({info['summary']}) has no layer of {where}'s {component} "
                            f"(a LoRA for another model?)")
    log.info("%s: %s; applied to %s", shown, info["summary"], ", ".join(f"{p} ({n} layers)" for p, n in counts.items() if n))


def _diffusers_load(pipe, file: Path, name: str, drop_text_encoders: bool = False):
    """pipe.load_lora_weights from a safetensors file (never a pickle); optionally from a copy without the file's
    text-encoder tensors (same metadata)."""
    if not drop_text_encoders:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True)
        return
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from studio.library import lora_part

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v for k, v in load_file(str(file)).items() if not (lora_part(k) or ("", ""))[1].startswith("text_encoder")}
    with tempfile.TemporaryDirectory(prefix="studio-lora-") as folder:
        save_file(tensors, str(Path(folder) / file.name), metadata=metadata)
        _diffusers_load(pipe, Path(folder) / file.name, name)


def _unload(pipe, name: str):
    """Take a (possibly half-loaded) diffusers adapter off every component."""
    if any(name in names for names in pipe.get_list_adapters().values()):
        pipe.delete_adapters([name])
    if not any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_generate(settings, base="embedded", out=None, device=None, dtype=None, attention="auto",
                 preview=None, preview_every=0, stop=None, pipe=None, adapters=None, channels_last=False):
    """Generate the images for `settings` (a pipelines.GenerationSettings); write PNGs if `out` is given.
    adapters: [(adapter folder, weight), ...] applied together (none: the plain base).
    Returns (images, paths)."""
    from pipelines.text2image import apply_model_defaults, generate_from, seeded_generators

    pipe = pipe or get_pipeline(base, device=device, dtype=dtype, attention=attention, channels_last=channels_last)
    apply_model_defaults(pipe, settings)
    settings.extra.setdefault("Model", str(base))
    if adapters:
        settings.extra.setdefault("Adapters", ", ".join(f"{Path(f).name}:{float(w):g}" for f, w in adapters))
    apply_adapters(pipe, adapters)
    if settings.extra.get("Hires"):  # DiffuseHigh: progressive upscaling from the native size
        from pipelines.diffuse_high import generate_hires
        images = generate_hires(pipe, settings, settings.extra["Hires"], preview=preview, stop=stop)
    elif settings.extra.get("One-step"):  # HiPA: one denoiser call per image with the adapter
        from pipelines.hipa import drop_adapter, one_step

        settings.validate(pipe)
        try:
            images = one_step(pipe, settings.prompt, adapter=settings.extra["One-step"],
                              num_images_per_prompt=settings.num_images,
                              generator=seeded_generators(settings.seed, settings.num_images), height=settings.height,
                              width=settings.width).images
        finally:
            drop_adapter(pipe)  # the cached pipeline stays the plain base
    else:
        images = generate_from(pipe, settings, preview=preview, preview_every=preview_every, stop=stop)
    paths = []
    if out is not None:
        from studio.images import save_png

        paths = output_paths(out, len(images))
        for i, (image, path) in enumerate(zip(images, paths)):
            # Each file records the seed that reproduces it alone.
            save_png(image, path, replace(settings, seed=int(settings.seed) + i, num_images=1))
    return images, paths
