"""Memory plans: the peak memory of a training run, predicted before it starts, and the fastest memory savers
that make it fit a budget (`studio plan`, `studio train --budget`, the Train tab).

    from studio.plan import Planner, parse_size
    planner = Planner("sdxl", device="cuda")
    planner.predict(config)                     # Prediction: the step's breakdown and the run's phases
    planner.search(config, parse_size("24GB"))  # Search: the configurations that fit, fastest first

How: the pipeline is built from its configs under torch's FakeTensorMode (tensors with shapes, dtypes and a
device but no memory behind them); the training code attaches the method (studio.train.Trainable: a half-precision
frozen base, fp32 trainables); one training step as the loop runs it (noise, the family's model call and target,
the loss, backward, clipping, the optimiser) runs under studio.bench.live_memory's accounting, which adds up
every storage an operator returns and takes it off when it is freed. The resident tensors (weights, adapter state,
optimiser state) plus the step's peak is the prediction: what torch.cuda.max_memory_allocated reports for that
step. `Planner.measure` runs the same step for real with the accounting `studio bench gpu` uses, so a prediction
can be checked against the step itself.

A run has three phases, and a plan fits only when all three do:
  prepare     the loop loads the whole pipeline onto the device (fp32) and encodes the subject images with the VAE
  step        the text encoders and the VAE encoder are parked on the CPU (on CUDA); the denoiser trains
  validation  the encoders come back for the preview samples, beside the training state

What fake tensors cannot see: kernel workspaces (cuDNN, cuBLAS), the CUDA context and the caching allocator's
slack: `Planner.usable` keeps a reserve for them. The step runs on CPU kernels and CPU autocast (where CUDA would pick its
own attention kernel and upcast norms under autocast). SaRA chooses its entries by value: with the weights on disk
it counts them; on a config alone it assumes SARA_ASSUMED_FRACTION (or options fraction=F). 8-bit AdamW
(bitsandbytes) is counted from its state layout: the step runs with an in-place update.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from studio.bench.gpu import SD15_UNET  # runwayml/stable-diffusion-v1-5 unet/config.json

GIB = 2**30
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What `fits` keeps free beside the tensors on CUDA: the context and kernels (~0.5-1 GiB) and the caching
# allocator's fragmentation. Not measured here (no GPU): an allowance, printed with every plan.
CUDA_RESERVE, CUDA_SLACK = 1 * GIB, 0.05
# SaRA on a config without weights: θ = 2e-3 on pretrained SD1.5 selects ~50M of 860M (the paper's count, the
# fraction studio.bench.gpu uses on random-init UNets).
SARA_ASSUMED_FRACTION = 0.058
EXACT_FRACTION_LIMIT = 1 << 26  # targeted scalars up to which a fraction's θ is found over the weights in memory
TYPICAL_IMAGES = 5  # subject images assumed when --images is not given
LOWER_RESOLUTIONS = (7 / 8, 3 / 4, 5 / 8, 1 / 2)  # lower buckets, as fractions of the asked resolution
OPTIMIZER_STATE = {"adamw": "AdamW: 2 moments", "adamw8bit": "8-bit AdamW", "prodigy": "Prodigy: 2 moments, s, x0"}
PROMPT = "a"  # every family pads prompts to its maximum length; a short one never truncates


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def encode_chunk() -> int:
    """Images the training loop encodes at once while preparing (studio.train.ENCODE_CHUNK)."""
    from studio.train import ENCODE_CHUNK

    return ENCODE_CHUNK


def parse_size(text) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '800MB', '1.5 TB' -> bytes; anything else is a one-line error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)\s*", str(text or ""), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"budget must be a size like 24GB, 24GiB or 800MB, got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    if abs(n) >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 / 10 else f"{n / 2**10:.1f} KiB"


# --------------------------------------------------------------------------------- published configs, in code

# The fields of each hub repo's config.json (metadata dropped) that shape the model; the tokenizers are character
# stand-ins at the real maximum lengths (77 for CLIP, 512 for T5): only the sequence lengths matter here.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # openai/clip-vit-large-patch14
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)  # laion CLIP-ViT-bigG-14
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl (the encoder)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

PUBLISHED = {
    "sd15": dict(label="Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5)", pipeline="StableDiffusionPipeline",
                 denoiser=("unet", "UNet2DConditionModel", SD15_UNET), vae=dict(SD_VAE, sample_size=512),
                 text=[("text_encoder", "CLIPTextModel", CLIP_L, "tokenizer", "clip")],
                 scheduler=("PNDMScheduler", dict(SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False,
                                                  steps_offset=1)),
                 extra=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    "sdxl": dict(label="SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0)", pipeline="StableDiffusionXLPipeline",
                 denoiser=("unet", "UNet2DConditionModel", SDXL_UNET),
                 vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                 text=[("text_encoder", "CLIPTextModel", CLIP_L, "tokenizer", "clip"),
                       ("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G, "tokenizer_2", "clip")],
                 scheduler=("EulerDiscreteScheduler", dict(SCALED_LINEAR, steps_offset=1, timestep_spacing="leading")),
                 extra=dict(add_watermarker=False)),
    "sd35-medium": dict(label="SD3.5 medium (stabilityai/stable-diffusion-3.5-medium)",
                        pipeline="StableDiffusion3Pipeline",
                        denoiser=("transformer", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
                        vae=dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                                 shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
                        text=[("text_encoder", "CLIPTextModelWithProjection", CLIP_L, "tokenizer", "clip"),
                              ("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G, "tokenizer_2", "clip"),
                              ("text_encoder_3", "T5EncoderModel", T5_XXL, "tokenizer_3", "t5")],
                        scheduler=("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)), extra={}),
    "flux-dev": dict(label="FLUX.1-dev (black-forest-labs/FLUX.1-dev)", pipeline="FluxPipeline",
                     denoiser=("transformer", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
                     vae=dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611,
                              shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
                     text=[("text_encoder", "CLIPTextModel", CLIP_L, "tokenizer", "clip"),
                           ("text_encoder_2", "T5EncoderModel", T5_XXL, "tokenizer_2", "t5")],
                     scheduler=("FlowMatchEulerDiscreteScheduler",
                                dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                     base_image_seq_len=256, max_image_seq_len=4096)), extra={}),
}
_TOKENIZERS = {}


def _stand_in_tokenizer(kind: str):
    """Character tokenizers from pipelines.tiny at the published maximum lengths (built once per process)."""
    if kind not in _TOKENIZERS:
        from pipelines import tiny

        tokenizer = tiny._char_clip_tokenizer() if kind == "clip" else tiny._tiny_t5_tokenizer()
        tokenizer.model_max_length = 77 if kind == "clip" else 512
        _TOKENIZERS[kind] = tokenizer
    return _TOKENIZERS[kind]


def _assemble(pipeline_cls, components: dict):
    """The pipeline from its components; slots its __init__ has but the components lack are None."""
    import inspect

    params = inspect.signature(pipeline_cls.__init__).parameters
    return pipeline_cls(**{n: components.get(n) for n, p in params.items()
                           if n != "self" and (n in components or p.default is inspect.Parameter.empty)})


def _published_pipeline(name: str, overrides: dict):
    import diffusers
    import transformers

    spec = PUBLISHED[name]
    slot, cls_name, config = spec["denoiser"]
    components = {slot: getattr(diffusers, cls_name)(**{**config, **overrides}),
                  "vae": diffusers.AutoencoderKL(**spec["vae"])}
    for encoder_slot, cls_name, config, tokenizer_slot, kind in spec["text"]:
        cls = getattr(transformers, cls_name)
        components[encoder_slot] = cls(cls.config_class(**config)).eval()
        components[tokenizer_slot] = _stand_in_tokenizer(kind)
    scheduler, scheduler_config = spec["scheduler"]
    with _real():
        components["scheduler"] = getattr(diffusers, scheduler)(**scheduler_config)
    return _assemble(getattr(diffusers, spec["pipeline"]), {**components, **spec["extra"]})


def _folder_pipeline(folder: Path, overrides: dict):
    """Every component of a diffusers folder built from its config (models under the active fake mode; tokenizers
    and the scheduler as they are: small files)."""
    from importlib import import_module

    import diffusers
    from diffusers import DiffusionPipeline

    from pipelines.loading import _folder_overrides

    index = DiffusionPipeline.load_config(str(folder))
    with _real():
        components = _folder_overrides(folder)
    for slot, value in index.items():
        if slot.startswith("_") or slot in components:
            continue
        if not isinstance(value, (list, tuple)):
            components[slot] = value
            continue
        library, cls_name = value
        if library is None or cls_name is None:
            components[slot] = None
            continue
        cls = getattr(import_module(library), cls_name)
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
            config = cls.load_config(str(folder), subfolder=slot)
            components[slot] = cls.from_config({**config, **(overrides if slot in ("unet", "transformer") else {})})
        elif isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            from transformers import AutoConfig

            components[slot] = cls(AutoConfig.from_pretrained(str(folder / slot))).eval()
        else:
            with _real():
                components[slot] = cls.from_pretrained(str(folder), subfolder=slot)
    return _assemble(getattr(diffusers, index["_class_name"]), components)


def _local_folder(source: str) -> Path:
    """embedded / embedded-dit / a folder; a hub id through the local hub cache (config files only)."""
    from pipelines.loading import _resolve

    folder, hub_id = _resolve(source)
    if folder is not None:
        return Path(folder)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.txt", "*.model", "tokenizer*/*"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo: the user's source is the problem
        raise ValueError(f"cannot read the configs of {hub_id!r} ({type(exc).__name__}); plan from a local folder "
                         f"or one of {', '.join(PUBLISHED)}") from None


# ------------------------------------------------------------------------------------- fake-tensor plumbing

class _Planning(TorchDispatchMode):
    """While a method is built on fake tensors, answers its reads of the weights' values: a selection (SaRA:
    `bool(any(|W| < θ))` per tensor, then `nonzero`) from the planned one; other checks as for healthy weights
    (False: LoLDU's "a zero pivot?"); a float read 1.0 (a value, never a size: an int read stays an error). Tiny
    tensors made by zeros/ones/full get their values (FakeTensorMode keeps values for literals only), so that
    flags such as SaRA's `sara_progressed` can be read in the step."""

    def __init__(self, counts=()):
        super().__init__()
        self.kept = [c > 0 for c in counts]  # SaRA drops the tensors with nothing selected before building
        self.counts = [c for c in counts if c > 0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default and getattr(args[0], "constant", None) is None:
            if args[0].dtype == torch.bool:
                return self.kept.pop(0) if self.kept else False
            if args[0].is_floating_point():
                return 1.0
        if func is aten.nonzero.default and self.counts:
            return torch.empty((self.counts.pop(0), args[0].dim()), dtype=torch.long, device=args[0].device)
        if func in (aten.zeros.default, aten.ones.default, aten.full.default) and math.prod(args[0]) == 1:
            value = {aten.zeros.default: 0, aten.ones.default: 1}.get(func, args[1] if len(args) > 1 else None)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            return torch.tensor(value, dtype=dtype, device=kwargs.get("device")).reshape(args[0])
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if type(exc).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException"):
                raise ValueError("this method reads the weights' values while it is built; it cannot be planned "
                                 "without them") from None
            raise


class _Devices(TorchDispatchMode):
    """`tensor.device` of a fake tensor answered at the top of the mode stack: a step asks it thousands of times
    (most of its dispatches), and each question would otherwise pass through every Python mode below."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default and hasattr(args[0], "fake_device"):
            return args[0].fake_device
        return func(*args, **(kwargs or {}))


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _real():
    """Real tensors inside the fake mode: schedulers and tokenizers compute values when they are made."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _modules(pipe) -> dict:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def _module_bytes(*modules) -> int:
    from studio.bench.gpu import storage_bytes

    return storage_bytes([t for m in modules for t in (*m.parameters(), *m.buffers())])


def _pass_peak(fn, *modules) -> int:
    """Peak bytes a no-grad pass allocates beyond the modules' own tensors."""
    from studio.bench.live_memory import LiveTensorBytes

    with torch.no_grad(), LiveTensorBytes().ignore(*(m.parameters() for m in modules),
                                                   *(m.buffers() for m in modules)) as meter, _Devices():
        fn()
    return meter.peak


def _autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _warm(optimizer, params):
    """The optimiser's state as after a first step (zero gradients: only weight decay moves the weights)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(family, objective, trainable, optimizer, config, size, cond, device, dtype, mark=lambda name: None):
    """One optimiser step as studio.train runs it for the subject objective, as a function of no arguments:
    noise and timesteps from the family's objective, the model call (under autocast for a half base), MSE on the
    family's target with its weighting, the method's regulariser, backward, clipping, the method's hook and the
    update. With gradient accumulation the gradients of the earlier micro-batches are alive: the caller makes them
    (they are resident, not the step's). mark(name) is called after "forward", "backward" and "clip"."""
    import torch.nn.functional as F

    from pipelines.families import move, take

    rows = config.batch_size * (2 if config.prior_preservation else 1)  # prior preservation adds class rows
    shape = (rows, *family.latent_shape(size, size))
    generator = torch.Generator().manual_seed(int(config.seed))

    def step():
        latents = torch.randn(shape, generator=generator).to(device)
        noise = torch.randn(shape, generator=generator).to(device)
        timesteps = objective.sample_timesteps(rows, generator).to(device)
        noisy = objective.noisy(latents, noise, timesteps)
        with _autocast(device, dtype):
            prediction = family.predict(noisy, timesteps, move(take(cond, torch.zeros(rows, dtype=torch.long)), device))
        target = objective.target(latents, noise, timesteps)
        per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_example * objective.weights(timesteps.cpu(), config.snr_gamma).to(device)).mean()
        regular = trainable.regularization_loss()
        if regular is not None:
            loss = loss + regular
        mark("forward")
        loss.backward()
        mark("backward")
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable.params, config.max_grad_norm)
        mark("clip")
        if not trainable.on_step(0, optimizer):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bnb_state_bytes(params) -> int:
    """bitsandbytes' AdamW8bit state: two uint8 moments and an fp32 absmax per 256-value block for tensors of
    >= 4096 values (min_8bit_size), two fp32 moments for smaller ones."""
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n
    return total


# ------------------------------------------------------------------------------------------------ results

PHASES = {"prepare": "before training: the pipeline loaded, the subject images encoded",
          "step": "one training step (above)",
          "validation": "preview samples: the encoders back beside the training state"}


@dataclass
class Prediction:
    """What one configuration needs. parts: the step's breakdown (bytes, in order, they add up to phases["step"]);
    phases: the peak of each phase, made of phase_parts[phase]; denoiser_step: the denoiser, its training state and
    the step's peak (what `measure` measures)."""
    settings: dict
    parts: dict
    phases: dict
    phase_parts: dict
    denoiser_step: int
    trainable_params: int
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def bottleneck(self) -> str:
        return max(self.phases, key=self.phases.get)

    def explain(self, phase=None) -> str:
        """A phase (default: the peak's) and what it is made of, in one line."""
        phase = phase or self.bottleneck
        what = ", ".join(f"{name} {format_size(value)}" for name, value in self.phase_parts[phase].items() if value)
        return f"{phase}: {what}"

    def to_dict(self) -> dict:
        return {"settings": self.settings, "parts": self.parts, "phases": self.phases, "phase_parts": self.phase_parts,
                "peak": self.peak, "bottleneck": self.bottleneck, "denoiser_step": self.denoiser_step,
                "trainable_params": self.trainable_params, "notes": self.notes}


@dataclass
class Candidate:
    changes: dict  # TrainConfig fields -> values (empty: as configured)
    prediction: Prediction
    time: float  # estimated step time (same effective batch) relative to as configured

    def describe(self) -> str:
        return describe_changes(self.changes)

    def to_dict(self) -> dict:
        return {"changes": self.changes, "describe": self.describe(), "relative_time": round(self.time, 3),
                "peak": self.prediction.peak, "bottleneck": self.prediction.bottleneck}


@dataclass
class Search:
    budget: int
    usable: int  # bytes left for tensors after the reserve
    base: Prediction  # as configured
    fits: list  # Candidates, fastest first
    closest: Candidate | None  # when nothing fits: the configuration with every saver

    def to_dict(self) -> dict:
        return {"budget": self.budget, "usable": self.usable, "fits": [c.to_dict() for c in self.fits],
                "closest": self.closest.to_dict() if self.closest else None}


def describe_changes(changes: dict) -> str:
    if not changes:
        return "as configured"
    words = []
    if changes.get("gradient_checkpointing"):
        words.append("gradient checkpointing")
    if "mixed_precision" in changes:
        words.append(f"{changes['mixed_precision']} base")
    if changes.get("optimizer") == "adamw8bit":
        words.append("8-bit AdamW")
    if "batch_size" in changes:
        words.append(f"batch {changes['batch_size']} x accumulation {changes['grad_accum']}")
    if "resolution" in changes:
        words.append(f"resolution {changes['resolution']}")
    return " + ".join(words)


# ------------------------------------------------------------------------------------------------ planner

# Fake runs are the slow part of a plan (every op of a training step through Python). The Train tab, `studio train
# --budget` (which plans, searches, then trains) and repeated `plan` calls ask about the same model again: they are
# kept per model, keyed by the folder's files (name, size, modification time) so an edited model is planned anew.
_PLANS: dict = {}


def _folder_signature(folder) -> tuple:
    if folder is None:
        return ()
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size)
                        for p in Path(folder).rglob("*") if p.is_file()))


class Planner:
    """Predictions and measurements for one base model on one device kind ("cuda" or "cpu").

    source: embedded, embedded-dit, a diffusers folder, a hub id in the local cache, or a published name (PUBLISHED).
    denoiser: config overrides for the denoiser (depth-reduced models: {"num_layers": 2}).
    images: subject images the prepare phase encodes (default: TYPICAL_IMAGES)."""

    def __init__(self, source="embedded", device="cuda", denoiser=None, images=None):
        if device not in ("cuda", "cpu"):
            raise ValueError(f"plan for a cuda or cpu device, not {device!r}")
        self.source, self.device = str(source), device
        self.overrides = dict(denoiser or {})
        self.images = int(images or TYPICAL_IMAGES)
        self.folder = None if self.source in PUBLISHED else _local_folder(self.source)
        # fake runs; no-grad passes by size (and method): shared by every planner of the same model in this process
        self._runs, self._encode, self._sample = _PLANS.setdefault(
            (self.source, device, self.images, repr(sorted(self.overrides.items())), _folder_signature(self.folder)),
            ({}, {}, {}))

    # --- building
    def pipeline(self):
        """The pipeline, built under the active fake mode (or for real when none is active)."""
        from pipelines.loading import quiet_libraries

        quiet_libraries()
        if self.folder is None:
            return _published_pipeline(self.source, self.overrides)
        return _folder_pipeline(self.folder, self.overrides)

    def label(self) -> str:
        return PUBLISHED[self.source]["label"] if self.folder is None else self.source

    def precision(self, config) -> str:
        if config.mixed_precision != "auto":
            return config.mixed_precision
        return "bf16" if self.device == "cuda" else "no"  # what make_accelerator picks (bf16-capable GPUs)

    def _size(self, family, config) -> int:
        from studio.train import training_size

        return training_size(family, config.resolution)

    def _selection(self, config, denoiser):
        """The config to build (SaRA: its selection planned, not searched on fake weights), the planned entries per
        targeted tensor (in target order) and a note saying where they come from."""
        if config.method != "sara":
            return config, [], []
        from adapters.core import method_class, resolve_targets

        cfg = config.adapter_config()
        options = {**method_class("sara").options, **cfg.options}
        targets = resolve_targets(denoiser, cfg)
        sizes = [getattr(module, name).numel() for module, name in targets.values()]
        planned = replace(config, adapter_options={**config.adapter_options, "fraction": None})
        with _real():
            counts = self._counts_from_weights(list(targets), sizes, options)
        if counts is not None:
            return planned, counts, [f"SaRA: {sum(counts):,} of {sum(sizes):,} entries selected in the weights "
                                     f"({sum(counts) / sum(sizes):.1%})"]
        fraction = float(options["fraction"] or SARA_ASSUMED_FRACTION)
        note = (f"SaRA: {fraction:.1%} of the targeted entries " +
                ("(options fraction, spread evenly over the tensors)" if options["fraction"] else
                 "assumed (θ=2e-3 on pretrained SD1.5; no weights to count: options fraction=F plans another)"))
        return planned, [round(fraction * n) for n in sizes], [note]

    def _counts_from_weights(self, paths, sizes, options):
        """SaRA's selection per targeted tensor, from the denoiser's safetensors: |W| < θ read one tensor at a
        time; for a fraction, the global θ as SaRA finds it (all targeted tensors at once: small models only).
        None without the weights."""
        import json

        from adapters.sara import threshold_for_fraction

        if self.folder is None or self.overrides:
            return None
        folder = next((self.folder / s for s in ("unet", "transformer") if (self.folder / s).is_dir()), None)
        if folder is None:
            return None
        files = {}
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "diffusion_pytorch_model.safetensors").is_file():
            files = dict.fromkeys(paths, folder / "diffusion_pytorch_model.safetensors")
        if not all(p in files for p in paths) or (options["fraction"] and sum(sizes) > EXACT_FRACTION_LIMIT):
            return None
        from safetensors import safe_open

        opened = {}

        def read(path):
            if files[path] not in opened:
                opened[files[path]] = safe_open(str(files[path]), framework="pt")
            return opened[files[path]].get_tensor(path).float()

        if options["fraction"]:
            tensors = [read(p) for p in paths]
            threshold = threshold_for_fraction(tensors, float(options["fraction"]))
            return [int((t.abs() < threshold).sum()) for t in tensors]
        return [int((read(p).abs() < float(options["threshold"])).sum()) for p in paths]

    # --- one configuration
    def _key(self, config):
        return (config.method, config.rank, config.targets, repr(sorted(config.adapter_options.items())),
                config.adapter_dropout, config.batch_size, config.grad_accum > 1, config.resolution,
                self.precision(config), config.gradient_checkpointing, config.prior_preservation,
                bool(config.max_grad_norm))

    def _fake_run(self, config) -> dict:
        """Every number a prediction needs, from one fake build and step (both optimisers share it)."""
        key = self._key(config)
        if key in self._runs:
            return self._runs[key]
        from pipelines.families import family_of, take
        from studio.bench.gpu import resident_tensors, storage_bytes
        from studio.bench.live_memory import LiveTensorBytes
        from studio.train import FULL, Trainable

        half = HALF.get(self.precision(config))
        with _fake_mode():
            pipe = self.pipeline()
            family = family_of(pipe)
            size = self._size(family, config)
            denoiser, vae = family.denoiser, pipe.vae
            others = [m for m in _modules(pipe).values() if m is not denoiser]
            run = {"family": family.label, "size": size, "multiple": family.size_multiple(),
                   "pipeline": _module_bytes(*_modules(pipe).values()), "others": _module_bytes(*others)}
            # On CUDA the loop parks the text encoders and the VAE encoder; the rest of the VAE stays.
            parked = [*family.text_encoders(), vae.encoder] if self.device == "cuda" else []
            run["parked"] = _module_bytes(*parked)
            if size not in self._encode:  # the subject images through the VAE, the prompt through the encoders
                self._encode[size] = max(
                    _pass_peak(lambda: family.encode_images(
                        torch.zeros(min(self.images, encode_chunk()), 3, size, size)), vae),
                    _pass_peak(lambda: family.encode_text([PROMPT], "cpu"), *family.text_encoders()))
            run["encode"] = self._encode[size]
            with torch.no_grad():  # as the loop encodes: once, outside the graph
                cond = family.encode_text([PROMPT], "cpu")
            planned, counts, notes = self._selection(config, denoiser)
            with _Planning(counts):
                torch.manual_seed(config.seed)
                trainable = Trainable(denoiser, planned, base_dtype=half if config.method != FULL else None)
            if config.gradient_checkpointing:
                denoiser.enable_gradient_checkpointing()
            denoiser.train()
            # AdamW as the loop makes it; on CUDA torch's default is the foreach kernels (one temporary the size of
            # the moments), which fake tensors do not choose by themselves.
            optimizer = torch.optim.AdamW(trainable.parameter_groups(config.weight_decay), lr=config.lr,
                                          foreach=self.device == "cuda")
            _warm(optimizer, trainable.params)
            params = {id(p) for p in trainable.params}
            adapter = [t for layer in trainable.layers() for t in (*layer.parameters(), *layer.buffers())
                       if id(t) not in params]
            adapter_ids = {id(t) for t in adapter} | params
            base = [t for t in (*denoiser.parameters(), *denoiser.buffers()) if id(t) not in adapter_ids]
            run.update(base=storage_bytes(base), adapter=storage_bytes(adapter),
                       trainable=storage_bytes(trainable.params), trainable_params=trainable.num_trainable(),
                       gradients=sum(p.numel() * p.element_size() for p in trainable.params),
                       adamw=storage_bytes(resident_tensors(denoiser, optimizer)) - _module_bytes(denoiser),
                       bnb=bnb_state_bytes(trainable.params), notes=notes,
                       base_dtype=str(max(base, key=lambda t: t.numel()).dtype).replace("torch.", "") if base else "")
            if config.grad_accum > 1:  # the last micro-batch starts with the earlier ones' gradients
                for p in trainable.params:
                    p.grad = torch.zeros_like(p)
            meter = LiveTensorBytes().ignore(resident_tensors(denoiser, optimizer))
            marks = {}

            def mark(name):
                marks[name], marks[name + "_live"] = meter.peak, meter.current
                meter.peak = meter.current  # each phase's own peak

            with _real():
                objective = family.objective()
            step = training_step(family, objective, trainable, optimizer, config, size, cond, "cpu", half, mark)
            with meter, _Devices():
                step()
            run.update(forward=max(marks["forward"], marks["backward"]), clip=marks["clip"],
                       before_update=marks["clip_live"], update=meter.peak)
            # validation: one guided model call (2 rows) and one decode, under the step's autocast
            sampling = (size, half, key[:5])
            if sampling not in self._sample:
                denoiser.eval()
                latents = torch.zeros(1, *family.latent_shape(size, size))
                with _autocast("cpu", half):
                    self._sample[sampling] = max(
                        _pass_peak(lambda: family.predict(torch.cat([latents, latents]), torch.full((2,), 500.0),
                                                          take(cond, torch.zeros(2, dtype=torch.long))), denoiser),
                        _pass_peak(lambda: family.decode_latents(latents), vae))
            run["sample"] = self._sample[sampling]
        self._runs[key] = run
        return run

    def predict(self, config) -> Prediction:
        """The prediction for `config` (a studio.train.TrainConfig) on this planner's device."""
        run = self._fake_run(config)
        eight_bit = config.optimizer == "adamw8bit"
        state = run["bnb"] if eight_bit else run["adamw"]
        if config.optimizer == "prodigy":  # AdamW's two moments plus its s and x0: two more fp32 copies
            state += 2 * run["trainable"]
        # bitsandbytes updates in place: its update phase holds what is alive when it starts
        extra = max(run["forward"], run["clip"], run["before_update"] if eight_bit else run["update"])
        accumulating = config.grad_accum > 1
        resident = run["base"] + run["trainable"] + run["adapter"] + state + (run["gradients"] if accumulating else 0)
        denoiser_step = resident + extra
        stays = run["others"] - run["parked"]
        precision = self.precision(config)
        parts = {f"frozen base ({run['base_dtype'] or 'none'})": run["base"],
                 "trainable parameters (fp32)": run["trainable"],
                 "adapter buffers": run["adapter"],
                 "gradients": run["gradients"],
                 f"optimizer state ({OPTIMIZER_STATE[config.optimizer]})": state,
                 "activations and temporaries at the peak": extra - (0 if accumulating else run["gradients"]),
                 ("VAE decoder (stays on the device)" if self.device == "cuda" else "text encoders + VAE"): stays}
        notes = list(run["notes"])
        if run["parked"]:
            notes.append(f"text encoders + VAE encoder: {format_size(run['parked'])}, parked on the CPU during the "
                         f"step (not counted there)")
        settings = {"base": self.label(), "family": run["family"], "device": self.device, "method": config.method,
                    "rank": config.rank, "targets": config.targets, "resolution": run["size"],
                    "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                    "prior_preservation": config.prior_preservation, "precision": precision,
                    "gradient_checkpointing": config.gradient_checkpointing, "optimizer": config.optimizer}
        phase_parts = {
            "prepare": {"the whole pipeline in fp32": run["pipeline"],
                        f"encoding ({_count(min(self.images, encode_chunk()), 'image')} at once)": run["encode"]},
            "step": {"the denoiser's training step": denoiser_step, "other components on the device": stays},
            "validation": {"the training state": resident - (run["gradients"] if accumulating else 0),
                           "text encoders and VAE back": run["others"], "sampling": run["sample"]}}
        phases = {phase: sum(values.values()) for phase, values in phase_parts.items()}
        return Prediction(settings=settings, parts=parts, phases=phases, phase_parts=phase_parts,
                          denoiser_step=denoiser_step, trainable_params=run["trainable_params"], notes=notes)

    def measure(self, config) -> int:
        """The denoiser's training step run for real on this planner's device: random-init weights (seeded) for a
        published config, the folder's own weights otherwise. Peak bytes: torch.cuda.max_memory_allocated on CUDA,
        studio.bench.gpu's live-tensor accounting on a CPU. Compare with Prediction.denoiser_step."""
        from pipelines.families import family_of
        from studio.bench.gpu import cpu_peak_bytes
        from studio.train import FULL, Trainable, make_optimizer

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--measure on a cuda plan needs a CUDA device here; plan with --device cpu")
        device = torch.device(self.device)
        with _fake_mode():  # the other components only give the conditioning's shapes
            pipe = self.pipeline()
            family = family_of(pipe)
            size = self._size(family, config)
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in family.encode_text([PROMPT], "cpu").items()}
        generator = torch.Generator().manual_seed(0)
        cond = {k: (torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                    else torch.ones(shape, dtype=dtype)).to(device) for k, (shape, dtype) in shapes.items()}
        slot = family.component
        cls = type(family.denoiser)
        if self.folder is None or self.overrides:
            torch.manual_seed(0)
            config_dict = dict(family.denoiser.config)
            with torch.device(device):
                denoiser = cls.from_config(config_dict)
        else:
            denoiser = cls.from_pretrained(str(self.folder), subfolder=slot).to(device)
        setattr(pipe, slot, denoiser)
        half = HALF.get(self.precision(config))
        torch.manual_seed(config.seed)
        trainable = Trainable(denoiser, config, base_dtype=half if config.method != FULL else None)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        optimizer = make_optimizer(config, trainable.parameter_groups(config.weight_decay))
        _warm(optimizer, trainable.params)
        if config.grad_accum > 1:
            for p in trainable.params:
                p.grad = torch.zeros_like(p)
        step = training_step(family, family.objective(), trainable, optimizer, config, size, cond, device, half)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return cpu_peak_bytes(denoiser, optimizer, step)

    # --- budgets
    def usable(self, budget: int) -> int:
        """Bytes of tensors a budget holds: on CUDA less the context/kernel reserve and the allocator's slack."""
        if self.device == "cpu":
            return int(budget)
        return int((budget - CUDA_RESERVE) / (1 + CUDA_SLACK))

    def savers(self, config, exclude=()) -> dict:
        """Each saver's options beyond the configuration's own value, weakest first (field -> list of values)."""
        options = {}
        if not config.gradient_checkpointing:
            options["gradient_checkpointing"] = [True]
        if config.method != "full" and self.precision(config) == "no" and "mixed_precision" not in exclude:
            options["mixed_precision"] = ["bf16"]
        if config.optimizer == "adamw" and "optimizer" not in exclude:
            options["optimizer"] = ["adamw8bit"]
        splits = [b for b in range(config.batch_size - 1, 0, -1) if config.batch_size % b == 0]
        if splits:
            options["batch_size"] = splits
        return options

    def _resolutions(self, config) -> list:
        run = self._fake_run(config)
        size, multiple = run["size"], run["multiple"]
        lower = sorted({int(size * f) // multiple * multiple for f in LOWER_RESOLUTIONS} - {size, 0}, reverse=True)
        return [size, *lower]

    def search(self, config, budget: int, exclude=(), limit: int = 5) -> Search:
        """The configurations that fit `budget` bytes: the fewest savers that do (a configuration with more savers
        than a fitting one is left out), fastest first; lower resolutions only after every full-resolution plan.
        Memory falls as savers are added, so a configuration with fewer savers than one that does not fit is not
        tried. exclude: TrainConfig fields not to change (e.g. "optimizer" without bitsandbytes)."""
        usable = self.usable(budget)
        base = self.predict(config)
        options = self.savers(config, exclude)
        names = list(options)
        resolutions = self._resolutions(config)
        # Checkpointing runs the forward again inside backward: +1/3 of a step where backward costs two forwards
        # (full fine-tuning: input and weight gradients), +1/2 where it costs about one (a frozen base).
        checkpoint_cost = 1 + (1 / 3 if config.method == "full" else 1 / 2)
        rows = config.batch_size

        def changes_of(levels, resolution):
            changes = {}
            for name, level in zip(names, levels):
                if level:
                    value = options[name][level - 1]
                    changes[name] = value
                    if name == "batch_size":
                        changes["grad_accum"] = config.grad_accum * config.batch_size // value
            if resolution != resolutions[0]:
                changes["resolution"] = resolution
            return changes

        def time_of(changes):
            """Relative step time at the same effective batch: checkpointing's recomputed forward; a split
            batch pays a fixed cost per micro-batch, taken as one example's compute (launches, small kernels)."""
            t = checkpoint_cost if changes.get("gradient_checkpointing") else 1.0
            if "batch_size" in changes:
                b = changes["batch_size"]
                t *= (rows // b) * (b + 1) / (rows + 1)
            if "resolution" in changes:
                t *= (changes["resolution"] / resolutions[0]) ** 2
            return t

        levels = itertools.product(*[range(len(options[n]) + 1) for n in names])
        grid = [(g, r) for g in levels for r in resolutions]
        order = sorted(grid, key=lambda g: (-g[1], time_of(changes_of(*g)), sum(1 for v in g[0] if v)))

        def below(a, b):  # b uses every saver a uses, at least as strongly
            return a[1] >= b[1] and all(x <= y for x, y in zip(a[0], b[0]))

        evaluated = {}  # grid point -> Candidate

        def evaluate(g):
            if g not in evaluated:
                changes = changes_of(*g)
                evaluated[g] = Candidate(changes, self.predict(replace(config, **changes)), time_of(changes))
            return evaluated[g]

        def fits(g):
            known = [f for f, c in evaluated.items() if c.prediction.peak <= usable]
            if any(below(f, g) for f in known):
                return True
            if any(below(g, f) for f in evaluated if f not in known):
                return False
            return evaluate(g).prediction.peak <= usable

        as_configured = ((0,) * len(names), resolutions[0])
        evaluated[as_configured] = Candidate({}, base, 1.0)
        if base.peak <= usable:
            return Search(budget, usable, base, [evaluated[as_configured]], None)
        strongest = {r: (tuple(len(options[n]) for n in names), r) for r in resolutions}
        if not fits(strongest[resolutions[-1]]):
            return Search(budget, usable, base, [], evaluate(strongest[resolutions[-1]]))
        found = []
        for r in resolutions:
            if not fits(strongest[r]):
                continue
            for g in order:
                if g[1] != r or len(found) >= limit or any(below(f, g) for f in found):
                    continue  # another resolution, enough listed, or more savers than a listed plan
                if fits(g):
                    found.append(g)
            if found:
                break
        return Search(budget, usable, base, [evaluate(g) for g in found], None)


# ------------------------------------------------------------------------------------------------ reports

def format_prediction(prediction: Prediction) -> str:
    s = prediction.settings
    lines = [f"plan: {s['base']} ({s['family']}) on {s['device']}",
             f"  {s['method']}" + (f" rank {s['rank']} on {s['targets']}" if s["method"] != "full" else "") +
             f", {s['resolution']}x{s['resolution']}, batch {s['batch_size']} x accumulation {s['grad_accum']}"
             + (" (+ class images)" if s["prior_preservation"] else "") +
             f", precision {s['precision']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
             f"{s['optimizer']}; {prediction.trainable_params:,} trainable parameters",
             "one training step (predicted):"]
    for name, value in prediction.parts.items():
        if value:
            lines.append(f"  {name:<42} {format_size(value):>11}")
    lines.append(f"  {'step peak':<42} {format_size(prediction.phases['step']):>11}")
    lines.append("the run's phases (the peak is the largest):")
    for name, value in prediction.phases.items():
        marker = "  <- peak" if name == prediction.bottleneck else ""
        lines.append(f"  {name:<11} {format_size(value):>11}  {PHASES[name]}{marker}")
        if name != "step":
            lines.append(f"  {'':<11} {'':>11}    = {prediction.explain(name).partition(': ')[2]}")
    lines += [f"note: {n}" for n in prediction.notes]
    return "\n".join(lines)


def format_search(search: Search, device: str) -> str:
    reserve = (f" (less {format_size(CUDA_RESERVE)} for the CUDA context and kernels and {CUDA_SLACK:.0%} allocator "
               f"slack)" if device == "cuda" else "")
    lines = [f"budget {format_size(search.budget)}: {format_size(search.usable)} for tensors{reserve}"]
    if not search.fits:
        c = search.closest
        lines.append(f"nothing fits: even {c.describe()} needs {format_size(c.prediction.peak)} "
                     f"({_why(c.prediction)})")
        return "\n".join(lines)
    lines.append("configurations that fit, fastest first (estimated step time at the same effective batch):")
    for i, c in enumerate(search.fits, 1):
        lines.append(f"  {i}. {c.describe():<58} peak {format_size(c.prediction.peak):>10}  {c.time:.2f}x")
    return "\n".join(lines)


def _why(prediction: Prediction) -> str:
    """The peak's phase and its largest part (for the step, the largest line of the breakdown)."""
    parts = prediction.parts if prediction.bottleneck == "step" else prediction.phase_parts[prediction.bottleneck]
    name, value = max(parts.items(), key=lambda kv: kv[1])
    return f"{prediction.bottleneck}; {name}: {format_size(value)}"


# --------------------------------------------------------------------------------------- studio train --budget

def fit_budget(config, accelerator, say):
    """`studio train --budget`: the fastest plan that fits, applied to the config (and the accelerator, whose
    precision and accumulation it may change); one ValueError line when nothing fits. A no-op without a budget."""
    if not config.budget:
        return config, accelerator
    budget = parse_size(config.budget)
    precision = str(accelerator.mixed_precision)
    current = replace(config, mixed_precision=precision if precision in HALF else "no")
    exclude = []
    if accelerator.num_processes > 1:
        exclude.append("mixed_precision")  # accelerate's state is shared by the processes: it stays as launched
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        exclude.append("optimizer")
    planner = Planner(config.base, device=accelerator.device.type, images=subject_images(config.images))
    search = planner.search(current, budget, exclude=exclude, limit=1)
    if not search.fits:
        c = search.closest
        raise ValueError(f"nothing fits in {config.budget} ({format_size(search.usable)} for tensors): even "
                         f"{c.describe()} needs {format_size(c.prediction.peak)} ({_why(c.prediction)})")
    chosen = search.fits[0]
    say(f"budget {config.budget}: {chosen.describe()} (predicted peak {format_size(chosen.prediction.peak)} of "
        f"{format_size(search.usable)} for tensors)")
    if accelerator.is_main_process:
        from studio.files import write_json

        write_json(Path(config.out) / "memory-plan.json", {"budget": config.budget, "chosen": chosen.to_dict(),
                                                          "prediction": chosen.prediction.to_dict()})
    new = replace(config, **chosen.changes)
    if new.mixed_precision != config.mixed_precision and "mixed_precision" in chosen.changes:
        from studio.train import make_accelerator

        return new, make_accelerator(new)
    accelerator.gradient_accumulation_steps = new.grad_accum
    return new, accelerator


def device_memory(device=None) -> tuple:
    """(kind, bytes) of the device a run would train on: the GPU's memory, or the RAM available now."""
    if device != "cpu" and torch.cuda.is_available():
        return "cuda", int(torch.cuda.get_device_properties(0).total_memory)
    import os

    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def subject_images(folder):
    """How many subject images a folder holds (None without one): what the prepare phase encodes."""
    if not folder or not Path(folder).is_dir():
        return None
    from studio.data import IMAGE_SUFFIXES, is_mask_file

    return sum(1 for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(p)) or None
