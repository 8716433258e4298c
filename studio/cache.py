"""On-disk caches of what a run encodes once, shared by runs and processes: VAE latents and text embeddings.

    CACHE/latents/KE/KEY.safetensors   one image's latents; KEY hashes (VAE fingerprint, the file's bytes, the
                                       size it trains at, flipped or not)
    CACHE/text/KE/KEY.safetensors      one prompt's conditioning; KEY hashes (text-encoder fingerprint, the prompt)

CACHE is TrainConfig.cache_dir, else $STUDIO_CACHE, else ~/.cache/diffusion-studio; "none" turns caching off.
A fingerprint hashes each module's config and every byte of its state (once per run, about a second per GB) with
what else changes the output: the device kind, attention kernel and TF32 for both; the tokenizers, family and
sequence length for text. Files are safetensors (never pickle) written to a temporary name and renamed, so a
reader sees a whole file or none; one that cannot be read, or holds the wrong shape, is a miss: encoded again and
rewritten. Nothing random is cached except the horizontal flip, which is part of the key. A module whose folder
lacks some of its weights (drawn at random on every load, even unused ones) misses every time: slower, never wrong.
"""
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("studio.cache")

VERSION = 1  # part of every key: bump when preprocessing (resize, crop, encoding) changes what a key means
DEFAULT_DIR = "~/.cache/diffusion-studio"
OFF = ("none", "off", "false", "no", "")


def cache_root(setting=None):
    """The cache folder for a cache_dir setting (default $STUDIO_CACHE, else ~/.cache/diffusion-studio), or None
    when caching is off ("none")."""
    value = setting if setting is not None else (os.environ.get("STUDIO_CACHE") or DEFAULT_DIR)
    if str(value).strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_fingerprint(module) -> str:
    """A module's class, config (without path-like private keys) and every byte of its state_dict."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(_hash({k: v for k, v in values.items() if not str(k).startswith("_")}).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return _hash(type(tokenizer).__name__, getattr(tokenizer, "model_max_length", None),
                 getattr(tokenizer, "padding_side", None), sorted(vocab.items()))


class EncodeCache:
    """A run's latents and text conditioning through the cache folder (root None: everything is encoded).
    counts/seconds say what was encoded and what was read back (stats())."""

    def __init__(self, root, family, device, chunk: int = 1):
        self.root, self.family, self.device, self.chunk = (Path(root) if root else None), family, device, chunk
        self.counts = {"latents_encoded": 0, "latents_cached": 0, "embeddings_encoded": 0, "embeddings_cached": 0}
        self.seconds = 0.0  # encoding only
        self.fingerprint_seconds = 0.0
        self._fingerprints = {}

    def stats(self) -> dict:
        return {"dir": str(self.root) if self.root else None, **self.counts,
                "encode_seconds": round(self.seconds, 3), "fingerprint_seconds": round(self.fingerprint_seconds, 3)}

    def _fingerprint(self, kind: str) -> str:
        if kind not in self._fingerprints:
            tick = time.perf_counter()
            pipe = self.family.pipe
            context = [VERSION, torch.device(self.device).type, getattr(pipe, "attention_backend", None),
                       getattr(pipe, "tf32", None)]
            if kind == "latents":
                parts = [module_fingerprint(pipe.vae)]
            else:
                max_length = getattr(self.family, "max_length", None)
                parts = [self.family.name, max_length() if callable(max_length) else None,
                         *(module_fingerprint(m) for m in self.family.text_encoders()),
                         *(tokenizer_fingerprint(t) for t in (getattr(pipe, n, None) for n in
                                                              ("tokenizer", "tokenizer_2", "tokenizer_3")) if t is not None)]
            self._fingerprints[kind] = _hash(kind, context, parts)
            self.fingerprint_seconds += time.perf_counter() - tick
        return self._fingerprints[kind]

    def _path(self, kind: str, *key) -> Path:
        name = _hash(self._fingerprint(kind), *key)
        return self.root / kind / name[:2] / f"{name}.safetensors"

    def _read(self, path: Path):
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # torn, foreign or unreadable
            log.warning("ignoring unreadable cache file %s (%s): encoding it again", path, exc)
            return None

    def _write(self, path: Path, tensors: dict):
        from safetensors.torch import save_file

        from studio.files import atomic_path

        try:
            with atomic_path(path) as tmp:
                save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
        except OSError as exc:  # a full or read-only cache costs speed, never the run
            log.warning("could not write cache file %s: %s", path, exc)

    def latents(self, pixels: torch.Tensor, digests: list, flip: bool = False) -> torch.Tensor:
        """Latents of images of one size (pixels N x 3 x h x w in [-1, 1]; digests: their files' sha256),
        horizontally flipped where `flip`. Misses are encoded `chunk` images at a time, as ENCODE_CHUNK says."""
        height, width = pixels.shape[-2:]
        expected = tuple(self.family.latent_shape(height, width))
        out = [None] * len(pixels)
        paths = [self._path("latents", d, [width, height], bool(flip)) for d in digests] if self.root else []
        for i, path in enumerate(paths):
            found = (self._read(path) or {}).get("latents")
            if found is not None and tuple(found.shape) == expected and found.dtype == torch.float32:
                out[i] = found
            elif found is not None:
                log.warning("ignoring cache file %s: it holds %s, not %s", path, tuple(found.shape), expected)
        missing = [i for i, value in enumerate(out) if value is None]
        self.counts["latents_cached"] += len(out) - len(missing)
        self.counts["latents_encoded"] += len(missing)
        for start in range(0, len(missing), self.chunk):
            index = missing[start:start + self.chunk]
            tick = time.perf_counter()
            batch = pixels[index].flip(-1) if flip else pixels[index]
            encoded = self.family.encode_images(batch).cpu()
            self.seconds += time.perf_counter() - tick
            for i, row in zip(index, encoded):
                out[i] = row
                if self.root:
                    self._write(paths[i], {"latents": row})
        return torch.stack(out)

    def text(self, prompts: list) -> dict:
        """The conditioning of these prompts (a dict of batch-first tensors on the CPU, floats in fp32), misses
        encoded in one batch."""
        from pipelines.families import move

        unique = list(dict.fromkeys(prompts))
        rows = {}
        paths = {p: self._path("text", p) for p in unique} if self.root else {}
        for prompt, path in paths.items():
            found = self._read(path)
            if found:
                rows[prompt] = found
        missing = [p for p in unique if p not in rows]
        self.counts["embeddings_cached"] += len(unique) - len(missing)
        self.counts["embeddings_encoded"] += len(missing)
        if missing:
            tick = time.perf_counter()
            cond = move(self.family.encode_text(missing, self.device), "cpu", torch.float32)
            self.seconds += time.perf_counter() - tick
            for j, prompt in enumerate(missing):
                rows[prompt] = {k: v[j] for k, v in cond.items()}
                if self.root:
                    self._write(paths[prompt], rows[prompt])
        keys = rows[unique[0]].keys()
        return {k: torch.stack([rows[p][k] for p in prompts]) for k in keys}
