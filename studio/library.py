"""The studio's workspace on disk and its adapter library: list, inspect, rename, delete, export.

Workspace (STUDIO_HOME, default ~/.diffusion-studio):
    adapters/<name>/adapter_config.json + adapter_model.safetensors   one folder per trained adapter
    outputs/<YYYY-MM-DD>/<time>-<seed>.png                            generated images (settings in the PNG)
    exports/<name>-<format>.safetensors                               adapters exported as plain LoRA

The UI and the CLI both call these functions; nothing here imports torch unless exporting.
"""
import json
import os
import re
import shutil
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HIPA_NAME = "hipa.json"  # written beside a HiPA (one-step) adapter by studio.hipa
EXPORT_FORMATS = ("diffusers", "kohya")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LibraryError(ValueError):
    """A library request a user got wrong (unknown name, bad new name...)."""


def studio_home(home=None) -> Path:
    """The workspace folder: `home` if given, else $STUDIO_HOME, else ~/.diffusion-studio."""
    return Path(home or os.environ.get("STUDIO_HOME") or "~/.diffusion-studio").expanduser()


def adapters_dir(home=None) -> Path:
    return studio_home(home) / "adapters"


def outputs_dir(home=None) -> Path:
    return studio_home(home) / "outputs"


def check_name(name: str) -> str:
    """A library name is also a folder name: letters, digits, '.', '_', '-' (max 64), never a path."""
    name = str(name or "").strip()
    if not _NAME.match(name) or name in (".", ".."):
        raise LibraryError(f"'{name}' is not a valid adapter name: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def is_adapter_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _first(config: dict, *keys, default=""):
    for key in keys:
        value = config.get(key)
        if value not in (None, ""):
            return value
    return default


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def adapter_info(path) -> dict:
    """What the library shows for one adapter folder."""
    path = Path(path)
    config = _read_config(path)
    weights = path / WEIGHTS_NAME
    size = weights.stat().st_size if weights.is_file() else 0
    return {
        "name": path.name,
        "path": str(path),
        "method": str(_first(config, "method", "peft_type", default="?")).lower(),
        "rank": _first(config, "r", "rank", default=""),
        "targets": (config.get("adapter") or {}).get("targets") or _first(config, "targets", "target_modules", default=""),
        "base_model": str(_first(config, "base_model", "base_model_name_or_path", "base", default="?")),
        "one_step": (path / HIPA_NAME).is_file(),  # a HiPA adapter: one model call per image
        "size_bytes": size,
        "size": _human_size(size),
        "modified": weights.stat().st_mtime if weights.is_file() else 0.0,
        "config": config,
    }


def list_adapters(home=None) -> list:
    """Every adapter in the library (newest first)."""
    root = adapters_dir(home)
    if not root.is_dir():
        return []
    found = [adapter_info(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_adapter_dir(p)]
    return sorted(found, key=lambda a: (-a["modified"], a["name"]))


def adapter_names(home=None) -> list:
    return [a["name"] for a in list_adapters(home)]


def adapter_path(name: str, home=None) -> Path:
    """The folder of a library adapter by name (a ValueError if there is none)."""
    path = adapters_dir(home) / check_name(name)
    if not is_adapter_dir(path):
        raise LibraryError(f"no adapter named '{name}' in the library ({adapters_dir(home)})")
    return path


def resolve_adapter(ref, home=None) -> Path:
    """A library name or an adapter folder path -> the folder."""
    ref = str(ref)
    if _NAME.match(ref) and is_adapter_dir(adapters_dir(home) / ref):
        return adapters_dir(home) / ref
    path = Path(ref).expanduser()
    if is_adapter_dir(path):
        return path
    raise LibraryError(f"no adapter '{ref}': give a library name ({', '.join(adapter_names(home)) or 'the library is empty'}) "
                       f"or a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")


def unique_name(name: str, home=None) -> str:
    """`name`, or `name-2`, `name-3`... if the library already has it."""
    name = check_name(name)
    root = adapters_dir(home)
    candidate, i = name, 2
    while (root / candidate).exists():
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def check_adapter_files(folder) -> None:
    """A cheap check before a folder enters the library (no torch): the config is a non-empty JSON object.
    The weights are checked when the adapter is loaded (adapters.io.read_adapter: one-line errors)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise LibraryError(f"{folder / CONFIG_NAME} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict) or not config:
        raise LibraryError(f"{folder / CONFIG_NAME} is not an adapter config (empty or not an object)")


def add_adapter(source_dir, name: str, home=None, overwrite: bool = False) -> Path:
    """Copy an adapter folder (config + weights) into the library under `name`. The copy is checked and
    complete before it replaces an existing adapter of that name, so a failed overwrite loses nothing."""
    source_dir = Path(source_dir)
    if not is_adapter_dir(source_dir):
        raise LibraryError(f"{source_dir} is not an adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    target = adapters_dir(home) / check_name(name)
    if target.exists() and not overwrite:
        raise LibraryError(f"the library already has an adapter named '{name}'")
    check_adapter_files(source_dir)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(source_dir / file, tmp / file)
        for extra in source_dir.glob("*.json"):  # notes beside the adapter (hipa.json, ...); JSON only
            if extra.name != CONFIG_NAME and extra.is_file():
                shutil.copy2(extra, tmp / extra.name)
        if target.exists():
            trash = target.with_name(f".{target.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def rename_adapter(name: str, new_name: str, home=None) -> Path:
    old = adapter_path(name, home)
    new = adapters_dir(home) / check_name(new_name)
    if new.exists():
        raise LibraryError(f"the library already has an adapter named '{new_name}'")
    os.replace(old, new)
    return new


def delete_adapter(name: str, home=None) -> None:
    shutil.rmtree(adapter_path(name, home))


def export_adapter(name: str, format: str = "diffusers", out=None, home=None, rank=None, base=None, device=None) -> Path:
    """Export a library adapter as a plain LoRA file (diffusers or kohya keys) that other tools load.
    The adapter is attached to its base model (from its config, or `base`), its ΔW factorised by
    adapters.export_lora at `rank` (default: the adapter's rank). Default destination:
    <home>/exports/<name>-<format>.safetensors. Returns the file written."""
    if format not in EXPORT_FORMATS:
        raise LibraryError(f"unknown export format '{format}': use {' or '.join(EXPORT_FORMATS)}")
    path = adapter_path(name, home)
    info = adapter_info(path)
    base = base or (info["base_model"] if info["base_model"] not in ("", "?", "None") else "embedded")
    try:
        rank = int(rank or info["rank"] or 8)
    except (TypeError, ValueError):
        rank = 8
    out = Path(out) if out else studio_home(home) / "exports" / f"{path.name}-{format}.safetensors"
    import adapters as adapter_lib

    from studio.generate import get_pipeline

    pipe = get_pipeline(base, device=device)
    model = getattr(pipe, "unet", None) or pipe.transformer
    temp = "studio-export"
    adapter_lib.load_adapter(model, path, name=temp, weight=1.0)
    try:
        result = adapter_lib.export_lora(model, out, rank=rank, format=format, name=temp)
    finally:
        adapter_lib.remove_adapter(model, temp)
    return Path(result["path"] if isinstance(result, dict) else out)


def recent_outputs(home=None, limit: int = 24) -> list:
    """The newest generated PNGs (paths), newest first."""
    root = outputs_dir(home)
    if not root.is_dir():
        return []
    files = [p for p in root.glob("*/*.png") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


def new_output_path(seed: int, home=None) -> Path:
    """A fresh file name for a generated image: outputs/<date>/<time>-<seed>.png."""
    import time

    now = time.time()
    day = time.strftime("%Y-%m-%d", time.localtime(now))
    stamp = time.strftime("%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}"
    folder = outputs_dir(home) / day
    path = folder / f"{stamp}-{int(seed)}.png"
    i = 1
    while path.exists():
        path, i = folder / f"{stamp}-{int(seed)}-{i}.png", i + 1
    return path


# --- subject images uploaded through the page -------------------------------------------------------------

SUBJECTS_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "subjects"
UPLOAD_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
MAX_UPLOAD_PIXELS = 40_000_000
MAX_UPLOAD_IMAGES = 200


def sample_subjects() -> dict:
    """The subjects bundled under assets/subjects: name -> folder (only folders that hold images)."""
    if not SUBJECTS_ASSETS.is_dir():
        return {}
    found = {}
    for folder in sorted(SUBJECTS_ASSETS.iterdir()):
        if folder.is_dir() and any(p.suffix.lower() in UPLOAD_SUFFIXES for p in folder.iterdir()):
            found[folder.name] = folder
    return found


def save_subject_upload(files, home=None) -> Path:
    """Copy uploaded images into a fresh workspace folder as 000.png, 001.png, ... The uploaded names are
    never used as paths; each file must decode as an image (a ValueError names the first bad one by
    position). Returns the folder, ready for TrainConfig.images."""
    import secrets
    import time

    from PIL import Image, UnidentifiedImageError

    files = [f for f in (files or []) if f]
    if not files:
        raise LibraryError("upload at least one image of the subject (or pick the bundled sample subject)")
    if len(files) > MAX_UPLOAD_IMAGES:
        raise LibraryError(f"too many images ({len(files)}); at most {MAX_UPLOAD_IMAGES}")
    folder = studio_home(home) / "subjects" / f"upload-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True)
    try:
        for i, source in enumerate(files):
            source = getattr(source, "name", source)  # a gradio file object or a path
            try:
                with Image.open(source) as image:
                    if image.width * image.height > MAX_UPLOAD_PIXELS:
                        raise LibraryError(f"upload {i + 1} is too large ({image.width}x{image.height} pixels)")
                    image.load()
                    rgb = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA", "RGBA") else image.convert("RGB")
                    rgb.save(tmp / f"{i:03d}.png", format="PNG")
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise LibraryError(f"upload {i + 1} is not a readable image ({type(exc).__name__})") from None
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- finished training jobs become library adapters --------------------------------------------------------

LIBRARY_MARKER = "library.json"  # in a run folder: the library name its adapter was added under


def import_finished_jobs(store, home=None) -> list:
    """Every done job whose run folder holds an adapter and that is not yet in the library is added under
    the job's name (made unique). Idempotent; returns the new library names."""
    added = []
    for job in store.list(states=["done"]):
        run = Path(job.run_dir)
        marker = run / LIBRARY_MARKER
        adapter = run / "adapter"
        if marker.is_file() or not is_adapter_dir(adapter):
            continue
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", job.name or f"job-{job.id}").strip("-.") or f"job-{job.id}"
        name = unique_name(base[:60], home)
        add_adapter(adapter, name, home)
        from studio.files import write_json

        write_json(marker, {"name": name, "job": job.id})
        added.append(name)
    return added
