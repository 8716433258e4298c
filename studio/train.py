"""Subject fine-tuning: ONE training loop on accelerate, for every adapter method and for full fine-tuning.

    from studio.train import TrainConfig, train
    run_dir = train(TrainConfig(base="embedded", images="assets/subjects/bag", prompt="a photo of a bag",
                                method="lora", rank=4, steps=300, out="runs/bag"))

The same code runs on one CPU, one GPU, or several GPUs (`accelerate launch -m studio train ...`).

What a step optimises is an Objective (`prepare(run)`, `loss(run, step, micro)`): SubjectObjective is the
DreamBooth-style denoising loss with optional prior preservation; another objective (HiPA's one-step
distillation) plugs into the same loop and gets precision, accumulation, checkpoints, exact resume,
previews, logs and stop handling for free.

Run folder (RUN_DIR):
    config.yaml            the effective config (what --resume compares against)
    data.json              images used, files skipped and why, the buckets and the size samples are drawn at,
                           the step/epoch plan, what the encode cache (studio.cache) encoded and read back
    log.jsonl              one line per step: step, loss, lr, seconds, elapsed, peak_mem_mb (+ events)
    samples/step-NNNNNN/   validation images on fixed seeds, step 0 = the base model's baseline (at the size
                           of the bucket most images train in)
    checkpoints/step-NNNNNN/   weights + optimiser + scheduler + RNG + method/objective state (safetensors + JSON)
    adapter/               the final adapter (save_adapter format); `unet/` or `transformer/` (the denoiser,
                           as diffusers names it) instead for method "full"
    status.json            state (running / stopped / done), step, steps

Exact resume: everything random comes from RNG states stored in the checkpoint, and the batch of any step
is a pure function of (seed, step), so a resumed CPU run is bitwise identical to an uninterrupted one.
Every file is written to a temporary name and renamed; a checkpoint is a folder renamed into place.

Method hooks (generic, used by SaRA's progressive step; every one optional), looked up on each adapter
layer of the trained adapter:
    on_step(step, optimizer) -> bool   called once per optimiser step after gradients are ready and
                                       clipped, before optimizer.step(); may edit the optimiser state
                                       (e.g. reset moments); returning True skips that update.
    regularization_loss() -> tensor    added to the objective's loss (e.g. SaRA's nuclear norm).
    training_state() -> dict / load_training_state(dict)   extra non-buffer state kept in checkpoints
                                       (tensors and JSON-able values). Buffers are saved anyway.
"""
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from pipelines.families import concat, move, take, where
from studio.files import atomic_path, read_jsonl, write_json, write_text
from studio.model_card import write_model_card

log = logging.getLogger("studio.train")

FULL = "full"  # full fine-tuning of the denoiser: the upper reference, no adapter
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
PRODIGY_LR = 1.0  # Prodigy finds its own step size; lr multiplies it (its authors' and diffusers' scripts' 1.0)
# Images through the VAE encoder at once while a run prepares. One at a time: at 1024 px the encoder's
# activations are ~2.5 GB per image, which made preparing, not training, the peak of a run (studio plan);
# encoding happens once per run, so the lost batching costs seconds.
ENCODE_CHUNK = 1
PRECISIONS = ("auto", "no", "fp16", "bf16")
TRACKERS = {"none": None, "tensorboard": "tensorboard (or tensorboardX)", "wandb": "wandb"}  # --report-to: what it needs
# Keys that may differ on --resume without changing what the run trains (kernels and layouts: float rounding at most).
# "identifier" only matters through the class prompt it derives (compared itself); runs recorded before it existed resume.
RESUME_FREE = {"resume", "force", "out", "cache_dir", "validate_every", "checkpoint_every", "keep_checkpoints", "quiet",
               "max_nan_steps", "identifier",
               "attention", "channels_last", "tf32", "cpu_threads", "report_to",
               "validation_prompts", "validation_prompts_file", "validation_seeds", "validation_steps",
               "validation_guidance"}


def _f(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


def _fl(default, help_text, **extra):
    return field(default_factory=lambda: list(default), metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """Everything a run depends on. Every field is a `studio train` flag (--lr-scheduler) and a YAML key."""
    base: str = _f("embedded", "base model: embedded, a diffusers folder, or a hub id")
    images: str = _f(None, "folder of subject images (+ optional same-name .txt captions)")
    prompt: str = _f(None, "instance prompt for images without a caption, e.g. 'a photo of sks bag'")
    method: str = _f("lora", "adapter method (lora, dora, sara, loldu, flora, tlora, ...) or 'full'")
    rank: int = _f(None, "adapter rank", table=True)
    alpha: float = _f(None, "adapter alpha (scale = alpha / rank; default alpha = rank)")
    rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(rank) (TLoRA's paper: --alpha 1 --rslora)")
    targets: str = _f(None, "adapter targets: a preset (attn, ff, conv, all, joined by '+') or module patterns",
                      table=True)
    adapter_dropout: float = _f(0.0, "dropout inside the adapter")
    adapter_options: dict = field(default_factory=dict, metadata={"help": "method options, KEY=VALUE", "kv": True})
    steps: int = _f(None, "optimiser steps", table=True)
    batch_size: int = _f(None, "examples per process per micro-batch", table=True)
    grad_accum: int = _f(1, "micro-batches per optimiser step (gradient accumulation)")
    lr: float = _f(None, "learning rate (with --optimizer prodigy: 1.0, a multiplier of Prodigy's own step size)",
                   table=True)
    lr_scheduler: str = _f("constant", f"learning-rate schedule: {', '.join(LR_SCHEDULES)}")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    optimizer: str = _f("adamw", "adamw, adamw8bit (needs bitsandbytes) or prodigy (needs prodigyopt; it finds its "
                                 "own step size: --lr is a multiplier, 1.0 unless given)")
    weight_decay: float = _f(1e-2, "AdamW weight decay (not on tensors whose neutral value is not zero: TLoRA "
                                   "transforms, DoRA magnitudes, LoLDU scalars)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    mixed_precision: str = _f("auto", "auto (bf16/fp16 on GPU, fp32 on CPU), no, fp16, bf16")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    budget: str = _f(None, "device memory the run must fit in (24GB, 24GiB): the fastest memory savers that fit are "
                           "applied (studio plan shows the choice)")
    attention: str = _f("auto", "attention kernel: auto (xformers on CUDA where installed, else PyTorch SDPA), xformers, sdpa")
    channels_last: bool = _f(False, "UNet and VAE in channels-last memory order (faster convolutions on GPUs)")
    tf32: bool = _f(True, "TF32 matmuls and convolutions on CUDA (no effect on a CPU)")
    snr_gamma: float = _f(None, "min-SNR loss weighting gamma (5.0 is usual; default off)")
    ema_decay: float = _f(None, "keep an EMA of the trained weights with this decay (e.g. 0.999); saved as the result")
    resolution: int = _f(None, "training size in pixels (default: the model's native size)")
    buckets: bool = _f(True, "aspect-ratio buckets: each image trains at about resolution^2 pixels in the shape "
                             "nearest its own (1:2 to 2:1); --no-buckets centre-crops every image to a square")
    cache_dir: str = _f(None, "folder caching VAE latents and text embeddings across runs (default: $STUDIO_CACHE, "
                              "else ~/.cache/diffusion-studio); none turns it off")
    flip: bool = _f(False, "random horizontal flips")
    masked_loss: bool = _f(False, "weight the loss by each image's mask: a same-name IMG.mask.png (or IMG-masklabel.png), "
                                  "else its alpha channel; white trains, black is ignored; images with neither train everywhere")
    repeats: int = _f(1, "how often each image appears per epoch")
    caption_dropout: float = _f(0.0, "probability of training a step on the empty prompt")
    prior_preservation: bool = _f(None, "also train on class images the base model generates itself (on by default "
                                        "when a class prompt is given or can be derived from --prompt)", table=True,
                                  kind=bool)
    class_prompt: list = _f(None, "prompt(s) for the class images, e.g. 'a photo of a bag'; several prompts "
                                  "preserve several concepts at once (default: --prompt without its identifier "
                                  "token: 'a photo of sks bag' -> 'a photo of a bag')", kind=list)
    identifier: str = _f(None, "the rare token that names the subject in --prompt (default: the first of "
                               "sks, ohwx, zwx, ... found in it); the class prompt is the prompt without it")
    class_images: int = _f(None, "class images per class prompt for prior preservation", table=True)
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss")
    class_sampling_steps: int = _f(25, "sampling steps for generating class images")
    class_cache: str = _f(None, "folder that caches class images (default: RUN_DIR/class_images)")
    report_to: str = _f("none", "also log the losses through accelerate's trackers: tensorboard (into RUN_DIR/logs) or "
                                "wandb, where that package is installed; none")
    seed: int = _f(0, "seed for initialisation, data order, noise and timesteps")
    validate_every: int = _f(100, "write validation samples every N steps (0 = only step 0 and the end)")
    validation_prompts: list = _fl([], "prompts for validation samples (default: the instance prompt)")
    validation_prompts_file: str = _f(None, "a text file of validation prompts, one per line (after --validation-prompts)")
    validation_seeds: list = _fl([0, 1], "fixed seeds for validation samples", item=int)
    validation_steps: int = _f(20, "sampling steps for validation samples")
    validation_guidance: float = _f(2.0, "guidance scale for validation samples")
    max_nan_steps: int = _f(5, "a step whose loss is NaN/inf is skipped (no update); stop after this many in a row")
    checkpoint_every: int = _f(100, "write a resumable checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _f(2, "keep only the newest N checkpoints")
    device: str = _f(None, "cpu or cuda (default: what accelerate picks)")
    cpu_threads: int = _f(None, "torch CPU threads for this run (on a busy machine 1 can be far faster than 2)")
    out: str = _f(None, "the run folder")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    force: bool = _f(False, "resume even though the config changed")
    quiet: bool = _f(False, "no progress bar")
    objective_options: dict = field(default_factory=dict, metadata={"help": "options for a custom objective", "yaml_only": True})

    def __post_init__(self):
        if isinstance(self.class_prompt, str):  # one prompt, as older configs and the UI give it
            self.class_prompt = [self.class_prompt] if self.class_prompt.strip() else []
        self.sources, self.notes = self._resolve_defaults()

    def _resolve_defaults(self):
        """Fill the fields left None from the method table (studio.defaults: the family's entry for the method,
        else the method's, else the generic one) and derive the class prompt. Returns ({field: where its value
        came from}, [notes for the run's start]). Values already set (flags, YAML, keywords) are kept."""
        from studio import defaults

        sources, notes = {}, []
        for name, (value, source) in defaults.resolve(self.method, self.base).items():
            if getattr(self, name) is not None:
                sources[name] = "set"
                continue
            if name == "lr" and self.optimizer == "prodigy":  # AdamW's rate would shrink Prodigy's step size
                value, source = PRODIGY_LR, "Prodigy's own step size (x1)"
            setattr(self, name, value)
            sources[name] = source
        if self.identifier is None:
            found = defaults.find_identifier(self.prompt)
            if found is not None:
                self.identifier, sources["identifier"] = found, "found in the prompt"
        if self.class_prompt is None:
            derived = defaults.class_prompts_for(self.prompt, self.base, self.identifier)
            if not self.prior_preservation:
                self.class_prompt = []
            elif derived:
                self.class_prompt = derived
                sources["class_prompt"] = "derived from the prompt" + (
                    f" + the base's own {len(derived) - 1} prompts" if len(derived) > 1 else "")
            elif sources.get("prior_preservation") != "set":
                # No identifier: the prompt itself names the class, so there is nothing to preserve it against.
                self.prior_preservation, self.class_prompt = False, []
                sources["prior_preservation"] = "off: no identifier token in the prompt"
                if self.images:
                    notes.append(f"prior preservation is off: no identifier token ({', '.join(defaults.IDENTIFIERS[:3])}, "
                                 f"...) in the prompt {self.prompt!r} to derive a class prompt from; name it with "
                                 f"--identifier TOKEN, or give --class-prompt")
            else:
                self.class_prompt = []  # validate() asks for --class-prompt
        return sources, notes

    def defaults_line(self) -> str:
        """One line for the start of a run: the values that came from the method table, and from where."""
        used = {k: s for k, s in self.sources.items() if s != "set"}
        if not used:
            return ""
        groups = {}
        for name, source in used.items():
            value = getattr(self, name)
            shown = (f"{value:g}" if isinstance(value, float) else
                     "; ".join(value) if isinstance(value, list) else str(value))
            groups.setdefault(source, []).append(f"{name.replace('_', '-')} {shown}")
        text = "; ".join(f"{', '.join(items)} ({source})" for source, items in groups.items())
        return f"defaults for {self.method}: {text}; flags override them (studio train --show-defaults {self.method})"

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = {str(k).replace("-", "_"): v for k, v in dict(data or {}).items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting {unknown[0]!r} (see `studio train --help`)")
        for f in fields(cls):  # YAML 1.1 reads "1e-4" as a string: take it as the number it spells
            if "float" in str(f.type) and isinstance(data.get(f.name), str):
                try:
                    data[f.name] = float(data[f.name])
                except ValueError:
                    pass  # validate() names the field
        config = cls(**data)
        config.validate()
        return config

    @classmethod
    def coerce(cls, config) -> "TrainConfig":
        if isinstance(config, cls):
            config.validate()
            return config
        return cls.from_dict(config)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self):
        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
                raise ValueError(f"{name.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'} whole number, got {value!r}")

        for name in ("steps", "batch_size", "grad_accum", "repeats", "rank", "class_images", "validation_steps",
                     "class_sampling_steps", "max_nan_steps"):
            positive(name)
        for name in ("warmup_steps", "validate_every", "checkpoint_every", "keep_checkpoints", "seed"):
            positive(name, allow_zero=True)
        if self.cpu_threads is not None:
            positive("cpu_threads")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ValueError(f"unknown lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
        if self.optimizer == "prodigy" and self.lr < 0.1:
            raise ValueError(f"with --optimizer prodigy, --lr multiplies the step size Prodigy finds itself: use about "
                             f"{PRODIGY_LR:g} (or leave it out), not {self.lr:g}")
        if self.validation_prompts_file and not Path(self.validation_prompts_file).expanduser().is_file():
            raise FileNotFoundError(f"validation prompts file not found: {self.validation_prompts_file}")
        if self.report_to not in TRACKERS:
            raise ValueError(f"unknown report-to {self.report_to!r}: choose one of {', '.join(TRACKERS)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"unknown mixed-precision {self.mixed_precision!r}: choose one of {', '.join(PRECISIONS)}")
        from pipelines.loading import ATTENTION_BACKENDS

        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention {self.attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        for name in ("alpha", "adapter_dropout", "weight_decay", "max_grad_norm", "snr_gamma", "ema_decay",
                     "caption_dropout", "prior_loss_weight", "validation_guidance"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name.replace('_', '-')} must be a number, got {value!r}")
        if not 0.0 <= float(self.caption_dropout) < 1.0:
            raise ValueError(f"caption-dropout must be in [0, 1), got {self.caption_dropout!r}")
        if self.ema_decay is not None and not 0.0 < float(self.ema_decay) < 1.0:
            raise ValueError(f"ema-decay must be between 0 and 1, got {self.ema_decay!r}")
        if self.snr_gamma is not None and not float(self.snr_gamma) > 0:
            raise ValueError(f"snr-gamma must be positive, got {self.snr_gamma!r}")
        if not isinstance(self.prior_preservation, bool):
            raise ValueError(f"prior-preservation must be true or false, got {self.prior_preservation!r}")
        from studio.defaults import find_identifier

        if self.identifier is not None and self.prompt and find_identifier(self.prompt, self.identifier) is None:
            raise ValueError(f"identifier {self.identifier!r} is not a word of the prompt {self.prompt!r}")
        if self.prior_preservation and not self.class_prompt:
            raise ValueError("prior preservation needs --class-prompt (e.g. 'a photo of a bag'), or an identifier "
                             "token in --prompt to derive it from (sks, ohwx, ...; --identifier names another)")
        if not isinstance(self.class_prompt, list):
            raise ValueError(f"class-prompt must be one or more prompts, got {self.class_prompt!r}")
        if not all(isinstance(p, str) and p.strip() for p in self.class_prompt):
            raise ValueError(f"class-prompt must be one or more non-empty prompts, got {self.class_prompt!r}")
        if not self.out:
            raise ValueError("name the run folder with --out RUN_DIR")
        if not isinstance(self.validation_seeds, list) or not all(isinstance(s, int) for s in self.validation_seeds):
            raise ValueError("validation-seeds must be a list of whole numbers")

    def adapter_config(self):
        from adapters import AdapterConfig
        from adapters.core import method_class

        options = dict(self.adapter_options)
        # Methods whose schedule depends on the run's length (SaRA's progressive step) learn it here.
        if "total_steps" in method_class(self.method).options and options.get("total_steps") is None:
            options["total_steps"] = int(self.steps)
        return AdapterConfig(method=self.method, rank=int(self.rank), alpha=self.alpha, rslora=bool(self.rslora),
                             targets=self.targets,
                             dropout=float(self.adapter_dropout), options=options, base_model=str(self.base))


def load_config_file(path) -> dict:
    """A YAML (or JSON) file of TrainConfig keys."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------
# state on disk without pickle: tensors into safetensors, everything else into JSON

def pack(obj, tensors: dict, prefix: str = "t"):
    """Replace every tensor in a nested structure by a reference; collect the tensors. Keeps int keys and tuples."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": pack(torch.from_numpy(obj.copy()), tensors, prefix)}
    if isinstance(obj, dict):
        return {"__dict__": [[pack(k, tensors, prefix), pack(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors, prefix) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unpack(obj, tensors: dict):
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return unpack(obj["__ndarray__"], tensors).numpy()
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state(folder: Path, name: str, obj):
    """obj -> folder/name.json + folder/name.safetensors (both in a folder that is renamed into place later)."""
    from safetensors.torch import save_file

    tensors = {}
    structure = pack(obj, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_state(folder: Path, name: str):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    return unpack(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state(generator=None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator=None):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path):
    """Move a finished folder into place; an existing one is moved aside first and then deleted."""
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# the run folder

class RunFolder:
    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.config = self.path / "config.yaml"
        self.log = self.path / "log.jsonl"
        self.status = self.path / "status.json"
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def list_checkpoints(self) -> list:
        """Completed checkpoints, oldest first (temporary and half-deleted folders start with a dot)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    continue
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self):
        found = self.list_checkpoints()
        return found[-1] if found else None

    def clean_leftovers(self):
        """Temporary folders of a run that was killed while writing."""
        for parent in (self.checkpoints, self.path):
            if parent.is_dir():
                for p in parent.iterdir():
                    if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
        # Temp files of atomic writes (studio.files.atomic_path: '.<name>.<random>.tmp') cut off by a kill.
        if self.path.is_dir():
            for p in self.path.rglob(".*.tmp"):
                if p.is_file():
                    p.unlink(missing_ok=True)

    def read_config(self):
        import yaml

        return yaml.safe_load(self.config.read_text()) if self.config.is_file() else None

    def write_config(self, config: TrainConfig):
        import yaml

        write_text(self.config, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def write_status(self, **status):
        write_json(self.status, {**status, "updated": time.time()})

    def read_status(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {}

    def result(self, method: str, component: str = "unet") -> Path:
        return self.path / (component if method == FULL else "adapter")


def run_status(run_dir) -> dict:
    """status.json of a run folder: {"state": running|stopped|done|failed, "step": n, "steps": N, ...}."""
    return RunFolder(run_dir).read_status()


class JsonlLog:
    """Append-only JSON lines; each line goes out in one write() so a kill never leaves half a line
    (and readers skip one that somehow is)."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict):
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> list:
        return read_jsonl(self.path)

    def truncate_after(self, step: int):
        """On resume: forget what happened after the checkpoint (it is about to happen again)."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; whole process peak RSS


# ---------------------------------------------------------------------------------------------------
# what is trained: an adapter from adapters/, or the whole denoiser (UNet or transformer)

class Trainable:
    """The trained tensors and how they are saved, for an adapter method or full fine-tuning."""

    def __init__(self, model, config: TrainConfig, base_dtype=None):
        """base_dtype (bf16/fp16 mixed precision): the frozen base is stored in it after the adapter is built
        from the full-precision weights (SaRA's selection must not depend on rounding); full fine-tuning
        keeps fp32 master weights."""
        self.model, self.method = model, config.method
        self.handle = None
        if config.method == FULL:
            model.requires_grad_(True)
            self.params = [p for p in model.parameters()]
        else:
            from adapters import METHODS, attach

            if config.method not in METHODS:
                raise ValueError(f"unknown method {config.method!r}: choose one of {', '.join(sorted(METHODS))}, {FULL}")
            model.requires_grad_(False)
            self.handle = attach(model, config.adapter_config(), name="default")
            if base_dtype is not None:
                from adapters import cast_base

                cast_base(model, base_dtype)
            self.params = self.handle.trainable_parameters()
            # Trainable tensors stay fp32 whatever the base's dtype (mixed precision casts at compute).
            for p in self.params:
                p.data = p.data.float()
        if not self.params:
            raise ValueError(f"method {config.method!r} with targets {config.targets!r} has nothing to train")

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def parameter_groups(self, weight_decay: float) -> list:
        """Optimizer groups: the method's no-decay tensors (AdapterLayer.no_decay) get none. One group when
        there are none, so checkpoints of such runs keep their layout."""
        if self.handle is None:
            return [{"params": self.params, "weight_decay": weight_decay}]
        decayed, kept = self.handle.parameter_groups()
        groups = [{"params": decayed, "weight_decay": weight_decay}] if decayed else []
        return groups + ([{"params": kept, "weight_decay": 0.0}] if kept else [])

    def layers(self) -> list:
        return list(self.handle.layers.values()) if self.handle is not None else []

    def state_dict(self) -> dict:
        if self.handle is not None:
            return dict(self.handle.state_dict())
        return dict(self.model.state_dict())

    def load_state_dict(self, tensors: dict):
        if self.handle is not None:
            self.handle.load_state_dict(tensors)
        else:
            self.model.load_state_dict(tensors, strict=True)

    # --- method hooks (see the module docstring)
    def on_step(self, step: int, optimizer) -> bool:
        skip = False
        hook = getattr(self.handle, "on_step", None)
        if hook is not None:
            return bool(hook(step, optimizer))
        for layer in self.layers():
            if hasattr(layer, "on_step"):
                skip = bool(layer.on_step(step, optimizer)) or skip
        return skip

    def regularization_loss(self):
        total = None
        for layer in self.layers():
            if hasattr(layer, "regularization_loss"):
                term = layer.regularization_loss()
                if term is not None:
                    total = term if total is None else total + term
        return total

    def training_state(self) -> dict:
        return {str(i): layer.training_state() for i, layer in enumerate(self.layers()) if hasattr(layer, "training_state")}

    def load_training_state(self, state: dict):
        for i, layer in enumerate(self.layers()):
            if str(i) in state and hasattr(layer, "load_training_state"):
                layer.load_training_state(state[str(i)])

    def save_result(self, folder: Path, base: str):
        """The final adapter (or UNet), written to a temporary folder and renamed into place."""
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        if self.handle is not None:
            from adapters import save_adapter

            save_adapter(self.model, tmp, name="default", base_model=str(base))
        else:
            self.model.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, folder)
        return folder

    def adapter_bytes(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


class EMA:
    """Exponential moving average of the trained tensors (kept in fp32 beside them)."""

    def __init__(self, params, decay: float):
        self.decay = float(decay)
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        # Warm-up like diffusers' EMAModel: early averages do not drag the initial weights along.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def swap(self):
        """Exchange live and averaged weights (call twice to undo)."""
        for s, p in zip(self.shadow, self.params):
            live = p.detach().clone()
            p.copy_(s.to(p.dtype))
            s.copy_(live.float())

    def state_dict(self):
        return {"updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)


# ---------------------------------------------------------------------------------------------------
# objectives: what one step optimises

class Objective:
    """What the loop optimises. prepare() builds data (called once per process, before the method is
    attached, so the base model is pristine); loss() returns (loss tensor, {name: float}) for micro-batch
    `micro` of optimiser step `step`, drawing randomness only from run.generator (restored on resume)."""
    name = "objective"

    def prepare(self, run) -> dict:
        return {}

    def plan(self):
        return None  # a studio.data.StepPlan, printed before the run starts

    def loss(self, run, step: int, micro: int):
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


def training_size(family, resolution=None) -> int:
    """The square size a run trains at: --resolution, else the model's native size; a multiple of its latent and
    patch size, or a one-line error that names one."""
    size = int(resolution or family.native_size())
    if size % family.size_multiple():
        raise ValueError(f"resolution {size} is not a multiple of {family.size_multiple()} (this model's latent "
                         f"and patch size); pick e.g. {size - size % family.size_multiple()}")
    return size


def masked_mean(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-example weighted mean of B x C x h x w errors under B x 1 x h x w weights: a masked image's loss is
    the mean over what its mask keeps, so a small subject is not learned more weakly than a large one."""
    weights = weights.expand_as(errors)
    return (errors * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1e-8)


class SubjectObjective(Objective):
    """DreamBooth-style: denoise the subject's VAE latents conditioned on their captions (MSE on the family's
    target: ε, v or flow velocity), optionally plus the same loss on class images generated by the base model
    (prior preservation). Latents and text are encoded once, here, through the on-disk cache (studio.cache); the
    loop never runs an encoder. Subject images train in aspect-ratio buckets (studio.data.Bucket); the square class
    images are their own bucket and join a step through the loss (in the same model call when the sizes agree)."""
    name = "subject"

    @torch.no_grad()
    def prepare(self, run) -> dict:
        import torch.nn.functional as F

        from studio.cache import EncodeCache, cache_root, file_digest
        from studio.data import (StepPlan, bucket_shares, bucket_sizes, class_cache_folder, ensure_class_images,
                                 load_image, load_subject)

        cfg, pipe, family = run.config, run.pipe, run.family
        if not cfg.images:
            raise ValueError("name the subject's image folder with --images DIR")
        size = training_size(family, cfg.resolution)
        sizes = bucket_sizes(size, family.size_multiple()) if cfg.buckets else [(size, size)]
        data = load_subject(cfg.images, size, cfg.prompt, masks=cfg.masked_loss, buckets=sizes)
        self.size = size
        cache = EncodeCache(cache_root(cfg.cache_dir), family, run.device, ENCODE_CHUNK)
        self.buckets = data.buckets()
        for bucket in self.buckets:  # each bucket's tensors: latents (flipped too), masks on its latent grid
            examples = [data.examples[i] for i in bucket.members]
            pixels = torch.from_numpy(np.stack([e.pixels for e in examples]))
            digests = [e.digest for e in examples]
            bucket.latents = cache.latents(pixels, digests)
            bucket.flipped = cache.latents(pixels, digests, flip=True) if cfg.flip else None
            bucket.masks = None
            if cfg.masked_loss:  # pixel masks -> the latent grid (the share of each latent cell's pixels that train)
                full = torch.from_numpy(np.stack([e.mask if e.mask is not None else np.ones(e.pixels.shape[1:], np.float32)
                                                  for e in examples]))[:, None]
                bucket.masks = F.interpolate(full, size=tuple(bucket.latents.shape[-2:]), mode="area")
            bucket.index = torch.tensor(bucket.members)
        # Validation draws at the size most images train at (ties: the squarer), so samples keep their framing.
        common = max(self.buckets, key=lambda b: len(b.members))
        run.sample_size = (common.height, common.width)
        captions = sorted({e.caption for e in data.examples})
        self.caption_index = torch.tensor([captions.index(e.caption) for e in data.examples])
        self.embeds = cache.text(captions)
        self.empty = cache.text([""])
        self.class_latents = None
        class_report = {}
        if cfg.prior_preservation:
            root = cfg.class_cache or (run.folder.path / "class_images")
            latents, index, folders = [], [], []
            for k, prompt in enumerate(cfg.class_prompt):
                folder = class_cache_folder(root, str(cfg.base), f"{prompt}|{cfg.class_sampling_steps}", size)
                if run.accelerator.is_main_process:
                    run.say(f"class images: {cfg.class_images} for '{prompt}' in {folder}")
                    ensure_class_images(pipe, prompt, cfg.class_images, folder, size,
                                        steps=cfg.class_sampling_steps, seed=cfg.seed)
                run.accelerator.wait_for_everyone()
                paths = [folder / f"class-{i:04d}.png" for i in range(cfg.class_images)]
                latents.append(cache.latents(torch.from_numpy(np.stack([load_image(p, size) for p in paths])),
                                             [file_digest(p) for p in paths]))
                index += [k] * cfg.class_images
                folders.append(str(folder))
            self.class_latents, self.class_index = torch.cat(latents), torch.tensor(index)
            self.class_embeds = cache.text(list(cfg.class_prompt))
            class_report = {"class_prompt": list(cfg.class_prompt), "class_images": cfg.class_images,
                            "class_folders": folders}
        processes = run.accelerator.num_processes
        counts, step_batch = [len(b.members) for b in self.buckets], cfg.batch_size * processes
        padding = 0 if len(counts) == 1 else \
            sum(bucket_shares(counts, cfg.repeats, step_batch)) * step_batch - len(data.examples) * cfg.repeats
        self._plan = StepPlan(images=len(data.examples), repeats=cfg.repeats, batch_size=cfg.batch_size,
                              grad_accum=cfg.grad_accum, processes=processes, steps=cfg.steps,
                              class_images=len(self.class_latents) if cfg.prior_preservation else 0,
                              padding=padding, buckets={b.name: len(b.members) for b in self.buckets})
        self.objective = family.objective()
        return {**data.report(), **class_report, "size": size, "plan": self._plan.to_dict(), "family": family.name,
                "objective": self.objective.prediction, "validation_size": common.name, "cache": cache.stats()}

    def plan(self):
        return self._plan

    def loss(self, run, step, micro):
        from studio.data import bucket_batch, example_indices

        cfg, gen = run.config, run.generator
        batch = cfg.batch_size
        processes, rank = run.accelerator.num_processes, run.accelerator.process_index
        # The global micro-batch (all processes) comes from one bucket, chosen with its examples from the step
        # alone; this process keeps its share. start: the global example counter of that share (class rows).
        k = step * cfg.grad_accum + micro
        start = (k * processes + rank) * batch
        which, positions = bucket_batch(cfg.seed, [len(b.members) for b in self.buckets], cfg.repeats,
                                        batch * processes, k)
        bucket = self.buckets[which]
        picks = positions[rank * batch:(rank + 1) * batch]

        def draw(make, *shape):
            """Draw for the whole global micro-batch (the generator is the same on every process) and keep
            this process's share, so N processes see exactly the randomness of one process with N x the batch."""
            return make((batch * processes, *shape), generator=gen)[rank * batch:(rank + 1) * batch]

        latents = bucket.latents[picks]
        masks = bucket.masks[picks] if bucket.masks is not None else None
        if bucket.flipped is not None:
            flip = draw(torch.rand) < 0.5
            latents = torch.where(flip[:, None, None, None], bucket.flipped[picks], latents)
            if masks is not None:
                masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
        cond = take(self.embeds, self.caption_index[bucket.index[picks]])
        if cfg.caption_dropout:
            drop = draw(torch.rand) < cfg.caption_dropout
            cond = where(drop, self.empty, cond)
        objective = self.objective
        noise = draw(torch.randn, *latents.shape[1:])
        timesteps = draw(lambda shape, generator: objective.sample_timesteps(shape[0], generator))
        groups = [(latents, noise, timesteps, cond, masks)]
        if self.class_latents is not None:
            cpicks = example_indices(cfg.seed + 1, len(self.class_latents), start, batch)
            class_latents = self.class_latents[cpicks]
            class_cond = take(self.class_embeds, self.class_index[cpicks])
            class_noise = draw(torch.randn, *class_latents.shape[1:])
            class_t = draw(lambda shape, generator: objective.sample_timesteps(shape[0], generator))
            if class_latents.shape[1:] == latents.shape[1:]:  # the square bucket: one model call, as before buckets
                ones = None if masks is None else torch.ones(len(class_latents), *masks.shape[1:])  # class rows: everywhere
                groups = [(torch.cat([latents, class_latents]), torch.cat([noise, class_noise]),
                           torch.cat([timesteps, class_t]), concat(cond, class_cond),
                           None if masks is None else torch.cat([masks, ones]))]
            else:  # another size: its own model call; the rows meet only in the loss
                groups.append((class_latents, class_noise, class_t, class_cond, None))
        per_example = torch.cat([self._per_example(run, *group) for group in groups])
        logs = {}
        if self.class_latents is not None:
            instance, prior = per_example[:batch].mean(), per_example[batch:].mean()
            logs = {"instance_loss": instance.item(), "prior_loss": prior.item()}
            return instance + cfg.prior_loss_weight * prior, logs
        return per_example.mean(), logs

    def _per_example(self, run, latents, noise, timesteps, cond, masks):
        """Each row's loss for one model call: a masked mean where masks are given, min-SNR weighted where asked."""
        import torch.nn.functional as F

        objective = self.objective
        latents, noise, timesteps = latents.to(run.device), noise.to(run.device), timesteps.to(run.device)
        noisy = objective.noisy(latents, noise, timesteps)
        prediction = run.family.predict(noisy, timesteps, move(cond, run.device), denoiser=run.denoiser)
        target = objective.target(latents, noise, timesteps)
        errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_example = masked_mean(errors, masks.to(errors.device)) if masks is not None else errors.mean(dim=(1, 2, 3))
        return per_example * objective.weights(timesteps.cpu(), run.config.snr_gamma).to(per_example.device)


# ---------------------------------------------------------------------------------------------------
# the loop

class Run:
    """What an objective sees: config, accelerator, pipeline, its family (pipelines.families), the (prepared)
    denoiser, the noise generator."""

    def __init__(self, config, folder, accelerator, pipe, say):
        from pipelines.families import family_of

        self.config, self.folder, self.accelerator, self.pipe, self.say = config, folder, accelerator, pipe, say
        self.device = accelerator.device
        self.family = family_of(pipe)
        self.denoiser = self.family.denoiser
        # The same stream on every process: objectives draw for the global batch and keep their share.
        self.generator = torch.Generator().manual_seed(int(config.seed) * 7919)
        self.sample = None  # an objective may set sample(settings) -> PIL image for its validation images (HiPA: one step)
        self.sample_size = None  # (height, width) an objective asks validation images at; default --resolution

    def park_encoders(self, parked: bool):
        """Text encoders and the VAE encoder on the CPU (parked) or back on the run's device. A no-op on a CPU."""
        if self.device.type == "cpu":
            return
        target = torch.device("cpu") if parked else self.device
        for module in [*self.family.text_encoders(), getattr(self.pipe.vae, "encoder", None)]:
            if module is not None:
                module.to(target)
        if parked and self.device.type == "cuda":
            torch.cuda.empty_cache()


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: allow another run in the same process with other settings (tests, the job worker).
        AcceleratorState._reset_state(True)
    cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    precision = config.mixed_precision
    if precision == "auto":
        if cpu:
            precision = "no"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cpu and precision == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; on CPU use --mixed-precision bf16 or no")
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=config.grad_accum,
                       **tracking(config))


def tracking(config: TrainConfig) -> dict:
    """The Accelerator arguments for --report-to (nothing for none); a missing package is a one-line error."""
    if config.report_to == "none":
        return {}
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[config.report_to]():
        raise ValueError(f"--report-to {config.report_to} needs {TRACKERS[config.report_to]} "
                         f"(pip install {config.report_to}); or leave --report-to out")
    out = Path(config.out or ".")
    return {"log_with": config.report_to,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))}


def _finish_trackers(accelerator):
    """Flush and close --report-to's trackers (main process). Not accelerator.end_training(): that also tears
    down the process group, which the run's last barrier still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def tracker_config(config: TrainConfig) -> dict:
    """The run's settings as trackers take hyper-parameters (numbers, strings and booleans)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in asdict(config).items()}


def optimizer_factory(config: TrainConfig):
    """groups -> the optimiser, its package imported now: a missing one is one line before anything loads."""
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes); use adamw") from None
        return lambda groups: bnb.optim.AdamW8bit(groups, lr=config.lr)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("--optimizer prodigy needs prodigyopt (pip install prodigyopt); use adamw") from None
        # As diffusers' training scripts set it: decoupled decay, bias correction, and no step-size growth
        # before the warm-up is over.
        return lambda groups: Prodigy(groups, lr=config.lr, decouple=True, use_bias_correction=True,
                                      safeguard_warmup=True)
    return lambda groups: torch.optim.AdamW(groups, lr=config.lr)


def make_optimizer(config: TrainConfig, groups):
    """groups: Trainable.parameter_groups (each group carries its own weight decay)."""
    return optimizer_factory(config)(groups)


def make_schedule(config: TrainConfig, optimizer):
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)


# What a run recorded before a setting existed trained with: an older config.yaml without "buckets" cropped squares.
RECORDED_BEFORE = {"buckets": False}


def config_differences(saved: dict, new: dict) -> list:
    saved = {**RECORDED_BEFORE, **saved}
    keys = sorted((set(saved) | set(new)) - RESUME_FREE)
    return [k for k in keys if saved.get(k) != new.get(k)]


def _checkpoint_processes(folder: RunFolder) -> int | None:
    """How many processes wrote the checkpoint a resume would continue from."""
    latest = folder.latest_checkpoint()
    if latest is None or not (latest / "state.json").is_file():
        return None
    return int(json.loads((latest / "state.json").read_text()).get("processes", 1))


def _prepare_folder(folder: RunFolder, config: TrainConfig, is_main: bool, processes: int = 1):
    """New run: refuse to overwrite another one. Resume: refuse a changed config unless forced. A new process
    count with the same global batch (batch-size x processes) is not a change: the run continues exactly."""
    saved = folder.read_config()
    if saved is not None and not config.resume:
        raise ValueError(f"{folder.path} already holds a run: add --resume to continue it, or choose another --out")
    if saved is not None:
        changed = config_differences(saved, config.to_dict())
        before = _checkpoint_processes(folder)
        if "batch_size" in changed and before and int(saved["batch_size"]) * before == config.batch_size * processes:
            changed.remove("batch_size")
        if changed and not config.force:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.to_dict().get(k)!r}" for k in changed[:3])
            raise ValueError(f"the config changed since this run started ({shown}); resume with the saved config "
                             f"or add --force")
    if is_main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.clean_leftovers()
        folder.write_config(config)


def _resolve_paths(config: TrainConfig) -> TrainConfig:
    """Absolute paths in the effective config, so a resume from another directory means the same data."""
    from dataclasses import replace

    changes = {}
    from studio.cache import cache_root

    for name in ("images", "class_cache", "cache_dir"):
        value = getattr(config, name)
        if value and (name != "cache_dir" or cache_root(value) is not None):  # "none" stays a word
            changes[name] = str(Path(value).expanduser().resolve())
    base = str(config.base)
    if base not in ("embedded", "embedded-dit") and Path(base).expanduser().exists():
        changes["base"] = str(Path(base).expanduser().resolve())
    resolved = replace(config, **changes)
    resolved.sources, resolved.notes = config.sources, config.notes  # where the values came from, for the log
    return resolved


class _Progress:
    """A tqdm bar with loss and ETA, opened only when steps begin (errors before that stay one clean line)."""

    def __init__(self, enabled, total):
        self.enabled, self.total, self.bar = enabled, total, None

    def start(self, initial):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc="training", unit="step", dynamic_ncols=True)

    def update(self, loss, lr):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(config, objective: Objective = None, progress=None, stop=None) -> Path:
    """Run (or resume) one training run; returns the run folder.

    config: TrainConfig or a dict of its keys. objective: default SubjectObjective.
    progress(event: dict): called with {"type": "plan"|"step"|"samples"|"checkpoint"|"done"|"stopped", ...}.
    stop(): polled every step; when it returns True the run writes a checkpoint and ends in state "stopped"
    (resumable with resume=True)."""
    config = _resolve_paths(TrainConfig.coerce(config))
    objective = objective or SubjectObjective()
    folder = RunFolder(config.out)
    accelerator = make_accelerator(config)
    is_main = accelerator.is_main_process
    _prepare_folder(folder, config, is_main, accelerator.num_processes)
    accelerator.wait_for_everyone()
    threads = torch.get_num_threads()
    if config.cpu_threads:
        torch.set_num_threads(int(config.cpu_threads))
    bar = _Progress(is_main and not config.quiet, config.steps)
    say = bar.write if is_main else (lambda text: None)
    for line in [config.defaults_line(), *config.notes]:
        if line:
            say(line)
    emit = (lambda event: progress(event)) if (progress is not None and is_main) else (lambda event: None)
    try:
        return _train(config, objective, folder, accelerator, say, emit, stop, bar)
    except BaseException as exc:
        if is_main and not isinstance(exc, KeyboardInterrupt):
            status = folder.read_status()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            try:
                folder.write_status(**{**status, "state": "failed", "error": message})
            except OSError:
                pass
        raise
    finally:
        bar.close()
        torch.set_num_threads(threads)


def _train(config, objective, folder, accelerator, say, emit, stop, bar):
    from pipelines import load_pipeline
    from studio.plan import fit_budget

    sources = {k: v for k, v in config.sources.items() if v != "set"}  # data.json: what the method table filled in
    config, accelerator = fit_budget(config, accelerator, say)  # --budget: before anything is loaded
    new_optimizer = optimizer_factory(config)
    is_main = accelerator.is_main_process
    log_file = JsonlLog(folder.log)
    pipe = load_pipeline(config.base, device=accelerator.device, attention=config.attention, tf32=config.tf32)
    pipe.set_progress_bar_config(disable=True)
    run = Run(config, folder, accelerator, pipe, say)
    for module in [pipe.vae, *run.family.text_encoders()]:
        module.requires_grad_(False).eval()
    report = objective.prepare(run)
    plan = objective.plan()
    # Prompts and latents are encoded: the encoders leave the accelerator while the denoiser trains (a Flux
    # run must not hold T5 there); validation brings them back for its few samples.
    run.park_encoders(True)
    denoiser = run.family.denoiser
    torch.manual_seed(config.seed)  # adapter initialisation does not depend on what prepare() did
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    trainable = Trainable(denoiser, config, base_dtype=half if config.method != FULL else None)
    if config.channels_last:
        from pipelines.loading import set_channels_last

        set_channels_last(pipe, True)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = new_optimizer(trainable.parameter_groups(config.weight_decay))
    schedule = make_schedule(config, optimizer)
    # The schedule is stepped once per optimiser step by the loop itself (not prepared: accelerate would
    # step it once per process), so warm-up and decay mean the same on 1 or 8 GPUs.
    prepared, optimizer = accelerator.prepare(denoiser, optimizer)
    run.denoiser = prepared
    ema = EMA(trainable.params, config.ema_decay) if config.ema_decay else None

    start, elapsed = 0, 0.0
    checkpoint = folder.latest_checkpoint() if config.resume else None
    if config.resume and checkpoint is None and is_main:
        say("no checkpoint yet: starting from step 0")
    if checkpoint is not None:
        start, elapsed = _load_checkpoint(checkpoint, run, trainable, optimizer, schedule, ema, objective, accelerator)
        say(f"resumed from {checkpoint.name} (step {start} of {config.steps})")
    if is_main:
        log_file.truncate_after(start) if start else write_text(folder.log, "")
        info = {"trainable_params": trainable.num_trainable(), "method": config.method,
                "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
                "base_dtype": str(next(denoiser.parameters()).dtype).replace("torch.", ""),
                "attention": pipe.attention_backend, "channels_last": bool(config.channels_last), "tf32": pipe.tf32,
                "processes": accelerator.num_processes, "defaults": sources, **report}
        write_json(folder.path / "data.json", info)
        if start == 0:
            for skipped in report.get("skipped", []):
                log_file.append({"step": 0, "event": "skipped", **skipped})
        if "cache" in report:  # what this process encoded and what it read back from the cache
            log_file.append({"step": start, "event": "cache", **report["cache"]})
        if plan is not None:
            say(plan.describe())
        say(f"method {config.method}: {trainable.num_trainable():,} trainable parameters; "
            f"precision {accelerator.mixed_precision} (base {info['base_dtype']}); attention {info['attention']}; "
            f"device {accelerator.device}")
        emit({"type": "plan", "text": plan.describe() if plan else "", "start": start, "steps": config.steps, **info})
        folder.write_status(state="running", step=start, steps=config.steps, pid=os.getpid())
    if config.report_to != "none":
        accelerator.init_trackers("studio", config=tracker_config(config))
    accelerator.wait_for_everyone()

    if start == 0:
        _validate(run, trainable, ema, 0, emit)
    bar.start(start)

    step, nan_in_a_row = start, 0
    run_started = time.time() - elapsed
    while step < config.steps:
        if _should_stop(stop, accelerator):
            _save_checkpoint(run, trainable, optimizer, schedule, ema, objective, step, time.time() - run_started)
            if is_main:
                folder.write_status(state="stopped", step=step, steps=config.steps)
                emit({"type": "stopped", "step": step})
                say(f"stopped at step {step}; continue with --resume")
                _finish_trackers(accelerator)
            return folder.path
        tick = time.time()
        lr = schedule.get_last_lr()[0]  # the rate this step's update uses
        losses, extra, bad_grad = [], {}, False
        for micro in range(config.grad_accum):
            with accelerator.accumulate(prepared):
                loss, logs = objective.loss(run, step, micro)
                regular = trainable.regularization_loss()
                if regular is not None:
                    loss = loss + regular
                accelerator.backward(loss)
                losses.append(loss.detach().float())
                for k, v in logs.items():
                    extra[k] = extra.get(k, 0.0) + v / config.grad_accum
                if accelerator.sync_gradients:
                    # NaN guard: a non-finite loss (on any process) skips this update; the weights stay good.
                    finite = torch.isfinite(torch.stack(losses)).all().to(accelerator.device).float()
                    finite = bool(accelerator.reduce(finite, "sum").item() == accelerator.num_processes)
                    if finite and config.max_grad_norm:
                        norm = accelerator.clip_grad_norm_(trainable.params, config.max_grad_norm)
                        # A finite loss with NaN/inf gradients is skipped too (fp16's scaler handles its own).
                        if norm is not None and accelerator.scaler is None and not torch.isfinite(torch.as_tensor(norm)).all():
                            finite, bad_grad = False, True
                    skip = (not finite) or trainable.on_step(step, optimizer)
                    if not skip:
                        optimizer.step()
                    with warnings.catch_warnings():  # a skipped update (method hook) is deliberate
                        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                        schedule.step()
                    optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = accelerator.reduce(torch.stack(losses).mean().to(accelerator.device), "mean").item()
        if not math.isfinite(loss_value) or bad_grad:
            nan_in_a_row += 1
            if is_main:
                log_file.append({"step": step, "event": "nan_loss", "loss": str(loss_value), "skipped": True,
                                 "in_a_row": nan_in_a_row, **({"grad_norm": "nan"} if bad_grad else {})})
                say(f"step {step}: loss is {loss_value}; update skipped ({nan_in_a_row} in a row)")
            if nan_in_a_row >= config.max_nan_steps:
                last = folder.latest_checkpoint()
                raise NonFiniteLoss(f"the loss was NaN/inf for {nan_in_a_row} steps in a row (up to step {step}): "
                                    f"lower --lr, or use --mixed-precision bf16/no instead of fp16; last good "
                                    f"checkpoint: {last.name if last else 'none'}")
            continue
        nan_in_a_row = 0
        if ema is not None:
            ema.update()
        seconds = time.time() - tick
        if is_main:
            record = {"step": step, "loss": loss_value, "lr": lr, "seconds": round(seconds, 4),
                      "elapsed": round(time.time() - run_started, 3),
                      "peak_mem_mb": round(peak_memory_mb(accelerator.device), 1), **extra}
            log_file.append(record)
            if config.report_to != "none":
                accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                                step=step)
            bar.update(loss_value, lr)
            emit({"type": "step", "steps": config.steps, **record})
        if step == config.steps or (config.validate_every and step % config.validate_every == 0):
            _validate(run, trainable, ema, step, emit)
        if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
            _save_checkpoint(run, trainable, optimizer, schedule, ema, objective, step, time.time() - run_started)
            if is_main:
                folder.write_status(state="running", step=step, steps=config.steps, pid=os.getpid())

    result = folder.result(config.method, run.family.component)
    if is_main:
        if ema is not None:
            ema.swap()
        trainable.save_result(result, config.base)
        # the card names each sample by the prompts validation used (a --validation-prompts-file's lines too)
        write_model_card(result, {**asdict(config), "validation_prompts": validation_prompts(config)}, folder.path)
        if ema is not None:
            ema.swap()
        total = time.time() - run_started
        folder.write_status(state="done", step=step, steps=config.steps, result=str(result), seconds=round(total, 3),
                            trainable_params=trainable.num_trainable(), result_bytes=trainable.adapter_bytes(result))
        emit({"type": "done", "step": step, "result": str(result)})
        say(f"done: {result}")
        _finish_trackers(accelerator)
    accelerator.wait_for_everyone()
    return folder.path


class NonFiniteLoss(ValueError, FloatingPointError):
    """Training stopped because the loss stayed NaN/inf (a ValueError: the CLI prints one line)."""


def _should_stop(stop, accelerator) -> bool:
    flag = bool(stop()) if (stop is not None and accelerator.is_main_process) else False
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        tensor = broadcast(torch.tensor([int(flag)], device=accelerator.device), from_process=0)
        flag = bool(tensor.item())
    return flag


def validation_prompts(config: TrainConfig) -> list:
    """--validation-prompts, then the lines of --validation-prompts-file; the instance prompt when both are empty."""
    prompts = list(config.validation_prompts)
    if config.validation_prompts_file:
        text = Path(config.validation_prompts_file).expanduser().read_text(errors="replace")  # validate() checked it
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts or [config.prompt or ""]


def _sample_grid(path: Path, rows: list, seeds, prompts) -> str:
    """One image per validation round: a row per prompt, a column per seed (step 0 is the base model)."""
    from studio.compare import make_grid
    from studio.files import atomic_path

    grid = make_grid(rows, [f"seed {s}" for s in seeds], [p if len(p) <= 32 else p[:29] + "..." for p in prompts])
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return str(path)


@torch.no_grad()
def _validate(run, trainable, ema, step, emit):
    """Samples on fixed seeds; global RNG untouched so validation never changes the training result."""
    config, accelerator = run.config, run.accelerator
    if not accelerator.is_main_process or not config.validation_seeds:
        accelerator.wait_for_everyone()
        return
    from dataclasses import replace

    from pipelines.text2image import GenerationSettings, generate_from
    from studio.images import save_png

    prompts = validation_prompts(config)
    height, width = run.sample_size or (config.resolution, config.resolution)
    if ema is not None:
        ema.swap()
    run.family.denoiser.eval()
    run.park_encoders(False)
    paths, rows = [], []
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), accelerator.autocast():  # a half base with fp32 adapters
        state = (random.getstate(), np.random.get_state())
        for p_index, prompt in enumerate(prompts):
            rows.append([])
            for seed in config.validation_seeds:
                settings = GenerationSettings(prompt=prompt, steps=config.validation_steps,
                                              guidance=config.validation_guidance, seed=int(seed),
                                              height=height, width=width,
                                              extra={"Model": str(config.base), "Method": config.method, "Step": step})
                image = run.sample(settings) if run.sample is not None else generate_from(run.pipe, settings)[0]
                path = run.folder.samples / f"step-{step:06d}" / f"p{p_index}-seed{seed}.png"
                save_png(image, path, replace(settings))
                paths.append(str(path))
                rows[-1].append(image)
        random.setstate(state[0])
        np.random.set_state(state[1])
    run.park_encoders(True)
    run.family.denoiser.train()
    if ema is not None:
        ema.swap()
    grid = _sample_grid(run.folder.samples / f"step-{step:06d}.png", rows, config.validation_seeds, prompts)
    JsonlLog(run.folder.log).append({"step": step, "event": "samples", "paths": paths, "grid": grid})
    emit({"type": "samples", "step": step, "paths": paths, "prompts": prompts, "grid": grid})
    accelerator.wait_for_everyone()


def _save_checkpoint(run, trainable, optimizer, schedule, ema, objective, step, elapsed):
    """Write checkpoints/step-N atomically: a temporary folder, then one rename. Old ones rotate out."""
    from safetensors.torch import save_file

    accelerator, folder, config = run.accelerator, run.folder, run.config
    final = folder.checkpoint(step)
    tmp = folder.checkpoints / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(tmp, f"rng-{accelerator.process_index}", rng_state(run.generator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.state_dict().items()},
                  str(tmp / "weights.safetensors"))
        save_state(tmp, "optimizer", optimizer.state_dict())
        extra = {"schedule": schedule.state_dict(), "method": trainable.training_state(),
                 "objective": objective.state_dict(), "ema": ema.state_dict() if ema is not None else None}
        if accelerator.scaler is not None:
            extra["scaler"] = accelerator.scaler.state_dict()
        save_state(tmp, "extra", extra)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed": elapsed, "processes": accelerator.num_processes,
                                                   "method": config.method, "time": time.time()}))
        replace_dir(tmp, final)
        for old in folder.list_checkpoints()[:-config.keep_checkpoints or None] if config.keep_checkpoints else []:
            trash = old.with_name(f".trash-{old.name}")
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        JsonlLog(folder.log).append({"step": step, "event": "checkpoint", "path": str(final)})
    accelerator.wait_for_everyone()


def _load_checkpoint(path, run, trainable, optimizer, schedule, ema, objective, accelerator):
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state.get("method") != run.config.method:
        raise ValueError(f"checkpoint {path} was made with method {state.get('method')!r}, not {run.config.method!r}")
    trainable.load_state_dict(load_file(str(path / "weights.safetensors"), device="cpu"))
    extra = load_state(path, "extra")
    trainable.load_training_state(extra.get("method") or {})  # before the optimiser: it may reshape what trains
    optimizer.load_state_dict(load_state(path, "optimizer"))
    schedule.load_state_dict(extra["schedule"])
    if ema is not None and extra.get("ema") is not None:
        ema.load_state_dict(extra["ema"])
    if accelerator.scaler is not None and extra.get("scaler") is not None:
        accelerator.scaler.load_state_dict(extra["scaler"])
    objective.load_state_dict(extra.get("objective") or {})
    # The noise/timestep generator is the same on every process (each draws the global batch and keeps its
    # share), so process 0's copy continues the run on any process count. The global torch/numpy/python
    # streams (adapter dropout) are per process: this process's own where it existed, else process 0's.
    rank = accelerator.process_index
    own = (path / f"rng-{rank}.json").is_file() and int(state.get("processes", 1)) == accelerator.num_processes
    set_rng_state(load_state(path, f"rng-{rank}" if own else "rng-0"), run.generator)
    if not own:
        run.say(f"resuming on {accelerator.num_processes} process(es) a checkpoint written by "
                f"{state.get('processes')}: the same data order and noise; dropout streams restart from process 0's")
    return int(state["step"]), float(state.get("elapsed", 0.0))
