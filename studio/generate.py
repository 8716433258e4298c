"""Generation as the application does it: cached pipelines, output files, the same path for CLI and UI."""
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


ADAPTER_PREFIX = "studio:"  # names of the adapters apply_adapters attaches (others are left alone)


def apply_adapters(pipe, adapters=None) -> list:
    """Make exactly `adapters` ([(adapter folder, weight), ...]) active on the pipeline's denoiser: load the
    ones not attached yet, set every weight, detach those no longer asked for. A folder whose weights file
    changed is loaded again. Returns the attached names."""
    import hashlib

    import adapters as adapter_lib

    model = getattr(pipe, "unet", None) or pipe.transformer
    wanted = {}
    for folder, weight in adapters or []:
        folder = Path(folder).expanduser().resolve()
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no adapter at {folder} (needs adapter_config.json + adapter_model.safetensors)")
        stamp = hashlib.sha1(f"{folder}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:10]
        name = f"{ADAPTER_PREFIX}{folder.name}:{stamp}"
        wanted[name] = (folder, wanted.get(name, (folder, 0.0))[1] + float(weight))
    attached = adapter_lib.list_adapters(model)
    for name in attached:
        if name.startswith(ADAPTER_PREFIX) and name not in wanted:
            adapter_lib.remove_adapter(model, name)
    for name, (folder, weight) in wanted.items():
        if name in attached:
            adapter_lib.set_weights(model, {name: weight})
        else:
            adapter_lib.load_adapter(model, folder, name=name, weight=weight)
    return list(wanted)


def run_generate(settings, base="embedded", out=None, device=None, dtype=None, attention="auto",
                 preview=None, preview_every=0, stop=None, pipe=None, adapters=None, channels_last=False):
    """Generate the images for `settings` (a pipelines.GenerationSettings); write PNGs if `out` is given.
    adapters: [(adapter folder, weight), ...] applied together (none: the plain base).
    Returns (images, paths)."""
    from pipelines.text2image import apply_model_defaults, generate

    pipe = pipe or get_pipeline(base, device=device, dtype=dtype, attention=attention, channels_last=channels_last)
    apply_model_defaults(pipe, settings)
    settings.extra.setdefault("Model", str(base))
    if adapters:
        settings.extra.setdefault("Adapters", ", ".join(f"{Path(f).name}:{float(w):g}" for f, w in adapters))
    apply_adapters(pipe, adapters)
    if settings.extra.get("Hires"):  # DiffuseHigh: progressive upscaling from the native size
        from pipelines.diffusehigh import generate_hires
        images = generate_hires(pipe, settings, settings.extra["Hires"], preview=preview, stop=stop)
    elif settings.extra.get("One-step"):  # HiPA: one denoiser call per image with the adapter
        from pipelines.hipa import drop_adapter, one_step

        settings.validate(pipe)
        try:
            images = one_step(pipe, settings.prompt, adapter=settings.extra["One-step"], num_images=settings.num_images,
                              seed=settings.seed, height=settings.height, width=settings.width)
        finally:
            drop_adapter(pipe)  # the cached pipeline stays the plain base
    else:
        images = generate(pipe, settings, preview=preview, preview_every=preview_every, stop=stop)
    paths = []
    if out is not None:
        from studio.images import save_png

        paths = output_paths(out, len(images))
        for i, (image, path) in enumerate(zip(images, paths)):
            # Each file records the seed that reproduces it alone.
            save_png(image, path, replace(settings, seed=int(settings.seed) + i, num_images=1))
    return images, paths
