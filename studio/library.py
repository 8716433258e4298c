"""The studio's workspace on disk and its adapter library: list, inspect, rename, delete, export.

Workspace (STUDIO_HOME, default ~/.diffusion-studio):
    adapters/<name>/adapter_config.json + adapter_model.safetensors   one folder per adapter: trained here, or a
                                                                      LoRA file imported byte for byte (its config
                                                                      says "format": "lora-file" and what it holds)
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
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights (and our diffusers export) writes
LORA_FILE_FORMAT = "lora-file"  # adapter_config.json "format" of a LoRA file imported into the library
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LibraryError(ValueError):
    """A library request a user got wrong (unknown name, bad new name...)."""


class LoraFileError(LibraryError):
    """A LoRA file that cannot be used: not safetensors, no known layout, or not for this model."""


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
    method = str(_first(config, "method", "peft_type", default="?")).lower()
    lora = config.get("format") == LORA_FILE_FORMAT
    return {
        "name": path.name,
        "path": str(path),
        "method": f"{method} ({config.get('layout', '?')} file)" if lora else method,
        "lora_file": lora,
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
    """A library name, an adapter folder or a LoRA file (see lora_file) -> its path."""
    ref = str(ref)
    if _NAME.match(ref) and is_adapter_dir(adapters_dir(home) / ref):
        return adapters_dir(home) / ref
    path = Path(ref).expanduser()
    if is_adapter_dir(path) or lora_file(path) is not None:
        return path
    raise LibraryError(f"no adapter '{ref}': give a library name ({', '.join(adapter_names(home)) or 'the library is empty'}), "
                       f"a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, or a LoRA .safetensors file")


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
    """Copy an adapter folder (config + weights, notes in JSON, its model card and sample images) into the library
    under `name`. The copy is checked and complete before it replaces an existing adapter of that name, so a failed
    overwrite loses nothing."""
    source_dir = Path(source_dir)
    if not is_adapter_dir(source_dir):
        hint = "; a LoRA file comes in with `studio library import`" if lora_file(source_dir) else ""
        raise LibraryError(f"{source_dir} is not an adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}){hint}")
    check_adapter_files(source_dir)

    def fill(tmp):
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(source_dir / file, tmp / file)
        # notes beside the adapter (hipa.json, ...), the model card and its sample images: JSON, Markdown, PNG only
        for extra in [*source_dir.glob("*.json"), *source_dir.glob("README.md"), *source_dir.glob("samples/*.png")]:
            if extra.name != CONFIG_NAME and extra.is_file():
                (tmp / extra.relative_to(source_dir)).parent.mkdir(exist_ok=True)
                shutil.copy2(extra, tmp / extra.relative_to(source_dir))

    return _place(fill, name, home, overwrite)


def _place(fill, name: str, home=None, overwrite: bool = False) -> Path:
    """Build a library folder with fill(tmp folder), then rename it into place (replacing `name` if overwrite)."""
    target = adapters_dir(home) / check_name(name)
    if target.exists() and not overwrite:
        raise LibraryError(f"the library already has an adapter named '{name}'")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
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


# --- LoRA files made elsewhere (kohya/A1111, diffusers/PEFT, ComfyUI, LyCORIS) ----------------------------------

# A key's first part says the layout and which part of the pipeline it changes (first match wins: lora_te1_
# before lora_te_). diffusers' converters do the renaming; this only names what a file holds.
_KEY_PREFIXES = (
    ("lora_unet_", "kohya", "unet"), ("lora_transformer_", "kohya", "transformer"),
    ("lora_te1_", "kohya", "text_encoder"), ("lora_te2_", "kohya", "text_encoder_2"),
    ("lora_te3_", "kohya", "text_encoder_3"), ("lora_te_", "kohya", "text_encoder"),
    ("lycoris_", "lycoris", "transformer"),
    ("unet.", "diffusers", "unet"), ("transformer.", "diffusers", "transformer"),
    ("text_encoder.", "diffusers", "text_encoder"), ("text_encoder_2.", "diffusers", "text_encoder_2"),
    ("text_encoder_3.", "diffusers", "text_encoder_3"), ("base_model.model.", "peft", "transformer"),
    ("diffusion_model.", "comfyui", "diffusion_model"), ("text_encoders.clip_l.", "comfyui", "text_encoder"),
    ("text_encoders.clip_g.", "comfyui", "text_encoder_2"), ("text_encoders.t5xxl.", "comfyui", "text_encoder_t5"),
    ("double_blocks.", "xlabs", "transformer"), ("single_blocks.", "xlabs", "transformer"),
)
LAYOUTS = {"kohya": "kohya/A1111", "lycoris": "LyCORIS", "diffusers": "diffusers/PEFT", "peft": "PEFT",
           "comfyui": "ComfyUI", "xlabs": "XLabs"}
# Tensors that are one side of a low-rank pair (their first dimension is the rank) in the layouts above.
_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight", "_lora.down.weight",
         "hada_w1_a", "lokr_w1", "lokr_w1_a")


def lora_part(key: str):
    """(layout, pipeline part) of one tensor key of a LoRA file, or None."""
    return next(((layout, part) for prefix, layout, part in _KEY_PREFIXES if key.startswith(prefix)), None)


def lora_file(path):
    """The LoRA file behind `path`, or None for a studio adapter folder: a file itself, a folder holding only
    pytorch_lora_weights.safetensors (diffusers' save_lora_weights), or a library folder a file was imported into."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if (path / LORA_WEIGHTS).is_file() and not (path / CONFIG_NAME).is_file():
        return path / LORA_WEIGHTS
    if (path / WEIGHTS_NAME).is_file() and _read_config(path).get("format") == LORA_FILE_FORMAT:
        return path / WEIGHTS_NAME
    return None


def _key_group(key: str) -> str:
    """What a key starts with, up to its first block number: "model.layers", "lora_unet_down_blocks"."""
    return re.split(r"[._]\d", key, maxsplit=1)[0][:40]


def describe_lora_file(file) -> dict:
    """What a LoRA file holds, from its header alone (no torch, nothing unpickled): layout, kind (LoRA, LoCon, LoHa,
    LoKr, DoRA), the family its key names suggest, layers per pipeline part, rank, and a one-line summary.
    A file in no known layout raises LoraFileError naming the key prefixes it has."""
    from collections import Counter

    from safetensors import SafetensorError, safe_open

    file = Path(file)
    if file.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{file.name}: only .safetensors LoRA files are read (a .ckpt/.pt/.bin file is a pickle, "
                            f"which can run code when loaded)")
    try:
        with safe_open(str(file), framework="np") as handle:
            keys = list(handle.keys())
            shapes = {k: handle.get_slice(k).get_shape() for k in keys if k.endswith(_DOWN)}
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraFileError(f"{file.name} is not a readable safetensors file ({reason})") from None
    found = {k: lora_part(k) for k in keys}
    layouts = Counter(p[0] for p in found.values() if p)
    if not shapes or not layouts:
        groups = ", ".join(f"{g} ({n})" for g, n in Counter(map(_key_group, keys)).most_common(3)) or "nothing"
        hint = " (a studio adapter's weights: pass its folder)" if (file.parent / CONFIG_NAME).is_file() else ""
        raise LoraFileError(f"{file.name} is not a LoRA file in a layout the studio reads (kohya/A1111, diffusers/PEFT, "
                            f"ComfyUI, LyCORIS): its {len(keys)} tensors start with {groups}{hint}")
    layout = layouts.most_common(1)[0][0]
    parts = Counter(found[k][1] for k in shapes if found[k])
    text = " ".join(keys)
    kind = ("LoHa" if "hada_w1_a" in text else "LoKr" if "lokr_w" in text
            else "LoCon" if "lora_mid" in text or any(len(s) == 4 and s[2:] != [1, 1] for s in shapes.values())
            else "LoRA")
    if "dora_scale" in text or "lora_magnitude_vector" in text:
        kind += " (DoRA)"
    if any(m in text for m in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        family = "Flux"
    elif any(m in text for m in ("joint_blocks", "add_k_proj", "context_block")):
        family = "SD3"
    elif "unet" in parts:  # SDXL: a second text encoder, kohya's LDM block names, several layers per block
        sdxl = "text_encoder_2" in parts or any(m in text for m in ("input_blocks", "transformer_blocks.1.",
                                                                    "transformer_blocks_1_"))
        family = "SDXL" if sdxl else "SD1.x/2.x"
    elif "attn2" in text or "adaln_single" in text:
        family = "PixArt"
    else:
        family = None
    rank = Counter(s[0] for s in shapes.values()).most_common(1)[0][0]
    where = ", ".join(f"{part} {n} layers" for part, n in sorted(parts.items()))
    summary = f"{LAYOUTS[layout]} {kind}{' for ' + family if family else ''}: {where}, rank {rank}"
    return {"layout": layout, "kind": kind, "family": family, "parts": dict(parts), "rank": rank,
            "tensors": len(keys), "summary": summary}


def import_lora(source, name: str | None = None, home=None, overwrite: bool = False) -> Path:
    """Copy a LoRA file made elsewhere (or a folder with pytorch_lora_weights.safetensors) into the library, byte for
    byte, as <name>/adapter_model.safetensors beside an adapter_config.json saying what it holds. Generation loads it
    through diffusers' own loader. Default name: the file's name (made unique)."""
    source = Path(source).expanduser()
    file = lora_file(source)
    if file is None:
        raise LibraryError(f"no LoRA file at {source} (give a .safetensors file or a folder with {LORA_WEIGHTS})")
    info = describe_lora_file(file)
    if name is None:
        stem = file.parent.name if file.name == LORA_WEIGHTS else file.stem
        name = unique_name(re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:60] or "lora", home)
    config = {"format": LORA_FILE_FORMAT, "peft_type": "LORA", "method": "lora", "layout": info["layout"],
              "kind": info["kind"], "r": info["rank"], "targets": ", ".join(sorted(info["parts"])),
              "parts": info["parts"], "base_model_name_or_path": info["family"] or "?", "summary": info["summary"],
              "source_file": file.name}

    def fill(tmp):
        shutil.copy2(file, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return _place(fill, name, home, overwrite)


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
    if info["lora_file"]:
        raise LibraryError(f"'{name}' is an imported LoRA file ({info['config'].get('summary', 'a LoRA')}); "
                           f"other tools load it as it is: {path / WEIGHTS_NAME}")
    base = base or (info["base_model"] if info["base_model"] not in ("", "?", "None") else "embedded")
    try:
        rank = int(rank or info["rank"] or 8)
    except (TypeError, ValueError):
        rank = 8
    out = Path(out) if out else studio_home(home) / "exports" / f"{path.name}-{format}.safetensors"
    import adapters as adapter_lib

    from studio.generate import get_pipeline

    pipe = get_pipeline(base, device=device)
    from pipelines.families import family_of

    model = family_of(pipe).denoiser
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

UPLOAD_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
MAX_UPLOAD_PIXELS = 40_000_000
MAX_UPLOAD_IMAGES = 200


def subjects_dir() -> Path:
    """assets/subjects (pipelines.assets: torch-free, so the page lists the samples before any model loads)."""
    from pipelines.assets import assets_dir

    return assets_dir() / "subjects"


def sample_subjects() -> dict:
    """The subjects bundled under assets/subjects: name -> folder (only folders that hold images)."""
    subjects = subjects_dir()
    if not subjects.is_dir():
        return {}
    found = {}
    for folder in sorted(subjects.iterdir()):
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
