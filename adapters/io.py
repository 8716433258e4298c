"""Adapters on disk: a folder with adapter_config.json + adapter_model.safetensors. Never pickle.

adapter_config.json is shaped like PEFT's (peft_type, r, lora_alpha, target_modules,
base_model_name_or_path) plus our fields: the full AdapterConfig, the resolved site paths, per-site
info from the method, the model class and the library version.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from adapters.core import AdapterConfig, _install, _records, build_layers, get_adapter, load_into_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LIBRARY = "diffusion-studio-adapters"


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusion-studio")
    except Exception:  # not installed as a distribution
        return "0+unknown"


def _atomic_write(path: Path, write):
    """write(tmp_path) into a temp file beside `path`, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pick_name(model, name):
    if name is not None:
        return name
    names = list(_records(model))
    if len(names) != 1:
        raise ValueError(f"name which adapter to save: attached are {', '.join(names) or 'none'}")
    return names[0]


def save_adapter(model, path, name: str | None = None, base_model: str | None = None) -> Path:
    """Write adapter `name` (default: the only one attached) to the folder `path`."""
    from safetensors.torch import save_file

    handle = get_adapter(model, _pick_name(model, name))
    cfg, record = handle.config, handle.record
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
    base_model = base_model or cfg.base_model
    config = {
        "peft_type": cfg.method.upper(), "method": cfg.method, "r": cfg.rank,
        "lora_alpha": cfg.rank if cfg.alpha is None else cfg.alpha, "use_rslora": cfg.rslora,
        "target_modules": sorted(record.sites), "base_model_name_or_path": base_model,
        "adapter": {**cfg.to_dict(), "base_model": base_model}, "model_class": type(model).__name__,
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else None,
        "layers": record.info, "library": LIBRARY, "library_version": library_version(),
    }
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "method": cfg.method}))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return folder


def read_adapter(path) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, raw config JSON, tensors) from an adapter folder, with one-line errors for bad files."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {folder}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(config_path.read_text())
        cfg = AdapterConfig.from_dict(raw["adapter"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path} is not a valid adapter config ({type(err).__name__}: {err})") from None
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupted files
        raise ValueError(f"{weights_path} is corrupted or truncated ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                         f"save the adapter again") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path} holds NaN or infinite values (tensor {key!r}); the adapter is broken: "
                             f"train or save it again")
    return cfg, raw, tensors


def load_adapter(model, path, name: str | None = None, weight: float = 1.0, paths=None):
    """Attach the adapter saved in folder `path` as `name` (default: the folder name) with `weight`.
    Every check (architecture, shapes, fingerprints) runs before the model is touched.
    paths: a function from a saved site path to where that layer is in `model` now (e.g. inside the wrapper
    another library put around it); default: the same path."""
    cfg, raw, tensors = read_adapter(path)
    name = name or Path(path).name
    if name in _records(model):
        raise ValueError(f"an adapter named {name!r} is already attached; pass another name")
    sites = list(raw.get("target_modules", []))
    if paths is not None:
        moved = {site: paths(site) for site in sites}
        tensors = {_moved_key(key, moved): tensor for key, tensor in tensors.items()}
        sites = list(moved.values())
    layers = build_layers(model, cfg, exact=sites, saved=tensors)
    load_into_layers(layers, tensors)
    return _install(model, name, cfg, layers, weight)


def _moved_key(key: str, moved: dict) -> str:
    """A tensor key "<site path>.<tensor name>" with its site path replaced (the longest site that prefixes it:
    tensor names may hold dots themselves)."""
    cut = max((i for i, c in enumerate(key) if c == "." and key[:i] in moved), default=None)
    return key if cut is None else moved[key[:cut]] + key[cut:]
