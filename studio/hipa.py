"""HiPA in the application: the teacher-pair cache on disk (progress, resume) and the training objective
the shared training loop calls (batch -> loss). The maths lives in pipelines/hipa.py.

Teacher cache folder:
  manifest.json                 base, family, teacher settings (and the sampler class used), prompts, seed,
                                count, shard size, latent shape
  pairs-00000.safetensors ...   noise (k, C, h, w), target (k, C, h, w) teacher x0 latents, prompt_index (k,)
Pair i uses prompts[i % len(prompts)] and noise seeded with seed + i, so every shard is reproducible
on its own and an interrupted run resumes at the first missing shard.
"""
import json
import math
from pathlib import Path

import torch

from studio.train import Objective, training_size

MANIFEST = "manifest.json"
MANIFEST_KEYS = ("base", "scheduler", "steps", "guidance", "spacing", "prompts", "seed", "shard_size", "latent_shape")


def default_prompts():
    from studio.fashion import PRETRAINED_CLASSES, prompt_for

    return [prompt_for(name) for name in PRETRAINED_CLASSES]


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"pairs-{index:05d}.safetensors"


def build_teacher_cache(pipe, folder, count: int, prompts=None, scheduler="dpm++", steps: int = 25,
                        guidance: float = 2.0, seed: int = 0, shard_size: int = 32, base: str = "",
                        progress=True, stop=None, spacing=None, size=None):
    """Generate `count` (prompt, noise, teacher x0) pairs into `folder`, skipping shards already on disk.

    A folder made with other settings is refused (one clear line) rather than silently mixed.
    scheduler/spacing: the teacher's sampler (flow families keep their own: pipelines.hipa.teacher_sampler;
    the manifest records what was used). size: pixels per side (default: the native size).
    progress: True for a tqdm bar, a callable(done, total), or False. stop() -> True ends after the
    current shard (the next call resumes). Returns the manifest dict."""
    from safetensors.torch import save_file

    from pipelines.families import family_of
    from pipelines.hipa import latent_shape, seeded_noise, teacher_sampler, teacher_scheduler, teacher_x0
    from studio.files import atomic_path, write_json

    prompts = list(prompts or default_prompts())
    if int(count) < 1:
        raise ValueError(f"the number of teacher pairs must be at least 1, got {count}")
    if int(shard_size) < 1:
        raise ValueError(f"the shard size must be at least 1, got {shard_size}")
    folder = Path(folder)
    scheduler, spacing = teacher_sampler(pipe, scheduler, spacing)
    with teacher_scheduler(pipe, scheduler, guidance, spacing) as sampler:
        sampler = type(sampler).__name__
    manifest = {"base": str(base), "family": family_of(pipe).name, "scheduler": scheduler, "sampler": sampler,
                "steps": int(steps), "guidance": float(guidance), "spacing": spacing, "prompts": prompts,
                "seed": int(seed), "shard_size": int(shard_size), "latent_shape": list(latent_shape(pipe, size, size)),
                "count": int(count)}
    if (folder / MANIFEST).is_file():
        old = json.loads((folder / MANIFEST).read_text())
        changed = [k for k in MANIFEST_KEYS if old.get(k) != manifest[k]]
        if changed:
            raise ValueError(f"the teacher cache {folder} was made with other settings ({', '.join(changed)}); "
                             "use a new folder")
        manifest["count"] = max(int(old.get("count", 0)), int(count))  # growing a cache keeps its pairs
    write_json(folder / MANIFEST, manifest)

    shards = math.ceil(int(count) / int(shard_size))
    report = _progress(progress, int(count))
    done = 0
    for shard in range(shards):
        start, end = shard * shard_size, min((shard + 1) * shard_size, int(count))
        path = _shard_path(folder, shard)
        if path.is_file() and _shard_len(path) == end - start:
            done = end
            report(done)
            continue
        noise = torch.cat([seeded_noise(pipe, 1, seed=seed + i, height=size, width=size) for i in range(start, end)])
        index = torch.arange(start, end) % len(prompts)
        target = teacher_x0(pipe, [prompts[i] for i in index.tolist()], noise, scheduler=scheduler, steps=steps,
                            guidance=guidance, spacing=spacing)
        with atomic_path(path) as tmp:
            save_file({"noise": noise.contiguous(), "target": target.contiguous(), "prompt_index": index},
                      str(tmp), metadata={"format": "pt"})
        done = end
        report(done)
        if stop is not None and stop():
            break
    report(None)
    return manifest


def _shard_len(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice("prompt_index").get_shape()[0])


def _progress(progress, total):
    if callable(progress):
        return lambda done: progress(done, total) if done is not None else None
    if not progress:
        return lambda done: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="teacher pairs", unit="pair", leave=False)

    def report(done):
        if done is None:
            bar.close()
        else:
            bar.update(done - bar.n)
    return report


def load_teacher_cache(folder):
    """-> (manifest, {"noise", "target", "prompt_index"}) with every complete shard concatenated."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"no teacher cache at {folder} (no {MANIFEST}); build it first")
    manifest = json.loads((folder / MANIFEST).read_text())
    parts = [load_file(str(p)) for p in sorted(folder.glob("pairs-*.safetensors"))]
    if not parts:
        raise ValueError(f"the teacher cache {folder} holds no pairs yet; build it first")
    pairs = {key: torch.cat([p[key] for p in parts]) for key in ("noise", "target", "prompt_index")}
    return manifest, pairs


class TeacherPairs(torch.utils.data.Dataset):
    """The cached pairs as a dataset of dicts (what the training loop batches)."""

    def __init__(self, folder):
        self.manifest, self.pairs = load_teacher_cache(folder)
        self.prompts = self.manifest["prompts"]

    def __len__(self):
        return int(self.pairs["noise"].shape[0])

    def __getitem__(self, i):
        return {key: value[i] for key, value in self.pairs.items()}


# ----------------------------------------------------------------------------------------------------
# Training: an objective for the shared loop (studio/train.py), and the job-store runner.

# TrainConfig values HiPA uses unless the user sets them: a small LoRA on the attention projections AND the
# convs (one-step generation needs capacity in the convs: attention-only stalled at 0.867, docs/hipa.md; a DiT
# has no convs, so there it is the attention alone, adapters.core),
# previews that ARE one-step samples (1 step, CFG off), and a learning rate for a ~2M-parameter UNet.
TRAIN_DEFAULTS = {"method": "lora", "rank": 4, "targets": "attn+conv", "steps": 1500, "batch_size": 16, "lr": 1e-3,
                  "lr_scheduler": "cosine", "warmup_steps": 50, "checkpoint_every": 100, "validate_every": 500,
                  "validation_steps": 1, "validation_guidance": 1.0, "validation_seeds": [0, 1]}
# objective_options keys (TrainConfig.objective_options; part of the config a resume must match).
# teacher_spacing "leading": the teacher's first step is below t = 999 (see pipelines.hipa.teacher_x0); "model"
# keeps the scheduler's own spacing.
OPTION_DEFAULTS = {"pairs": 512, "teacher_scheduler": "default", "teacher_steps": 25, "teacher_guidance": None,
                   "teacher_spacing": "leading",
                   "prompts": None, "teacher_cache": None, "pair_seed": 0, "shard_size": 32, "timestep": None,
                   "loss": {}}


def hipa_config(settings: dict | None = None) -> dict:
    """A TrainConfig dict for a HiPA run: HiPA's defaults under the given settings (a dict of TrainConfig
    keys; HiPA options go in settings["objective_options"])."""
    settings = dict(settings or {})
    options = {**OPTION_DEFAULTS, **(settings.pop("objective_options", None) or {})}
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown HiPA option {unknown[0]!r}: choose from {', '.join(OPTION_DEFAULTS)}")
    from pipelines.hipa import HiPALossConfig

    options["loss"] = HiPALossConfig.from_dict(_checked_loss(options["loss"])).to_dict()
    _spacing(options["teacher_spacing"])
    if int(options["pairs"]) < 1:
        raise ValueError(f"HiPA needs at least 1 teacher pair, got pairs={options['pairs']}")
    config = {**TRAIN_DEFAULTS, **settings, "objective_options": options}
    if not config.get("validation_prompts"):
        config["validation_prompts"] = (options["prompts"] or default_prompts())[:3]
    return config


def _spacing(value):
    if value in (None, "", "model"):
        return None
    if value not in ("leading", "trailing", "linspace"):
        raise ValueError(f"teacher spacing must be leading, trailing, linspace or model, got {value!r}")
    return value


def _checked_loss(loss: dict) -> dict:
    from dataclasses import fields

    from pipelines.hipa import HiPALossConfig

    known = {f.name for f in fields(HiPALossConfig)}
    unknown = sorted(set(loss or {}) - known)
    if unknown:
        raise ValueError(f"unknown HiPA loss setting {unknown[0]!r}: choose from {', '.join(sorted(known))}")
    return dict(loss or {})


def evaluator_features(device):
    """feature_fn for the loss's optional feature term: the studio evaluator's penultimate features of
    the grey image (decoded images are in [-1, 1])."""
    from studio.evaluate import load_evaluator

    net = load_evaluator().model.to(device).requires_grad_(False)

    def features(images):
        grey = ((images.float() + 1) / 2).clamp(0, 1).mean(1, keepdim=True)
        if grey.shape[-1] != 32:
            grey = torch.nn.functional.interpolate(grey, size=(32, 32), mode="bilinear", antialias=True)
        return net.features(grey)
    return features


class HiPAObjective(Objective):
    """One-step distillation in the shared loop: ONE student call from the cached noise (pipelines.hipa.student_x0:
    at T for VP families, one Euler step from σ = 1 for flow families), decoded by the frozen VAE, against the
    decoded teacher image (spatial + high-frequency terms, pipelines.hipa_loss).

    prepare() runs before the adapter is attached, so the teacher is the pristine base model; it builds
    (or resumes) the teacher cache, then keeps the prompts' conditioning and the decoded teacher images in
    memory (on the CPU). The batch of a step is a pure function of (seed, step), so the loop's resume is exact."""
    name = "hipa"

    @torch.no_grad()
    def prepare(self, run) -> dict:
        from pipelines.families import move
        from pipelines.hipa import HiPALossConfig, one_step_timestep, teacher_sampler
        from studio.evaluate import default_sampling

        cfg, pipe, family = run.config, run.pipe, run.family
        options = {**OPTION_DEFAULTS, **(cfg.objective_options or {})}
        self.loss_config = HiPALossConfig.from_dict(_checked_loss(options["loss"]))
        self.timestep = one_step_timestep(family, options["timestep"])
        size = training_size(family, cfg.resolution)
        prompts = list(options["prompts"] or default_prompts())
        guidance = options["teacher_guidance"]
        if guidance is None:
            guidance = float(default_sampling(cfg.base).get("guidance", 2.0))
        scheduler, spacing = teacher_sampler(pipe, options["teacher_scheduler"], _spacing(options["teacher_spacing"]))
        folder = Path(options["teacher_cache"] or (run.folder.path / "teacher"))
        if run.accelerator.is_main_process:
            if scheduler != options["teacher_scheduler"]:
                run.say(f"teacher: {family.label} samples with its own flow-matching scheduler "
                        f"('{options['teacher_scheduler']}' is a noise-prediction sampler)")
            run.say(f"teacher: {options['teacher_steps']} steps ({scheduler}), guidance {guidance}, "
                    f"{options['pairs']} pairs at {size}x{size} in {folder}")
            build_teacher_cache(pipe, folder, int(options["pairs"]), prompts=prompts, scheduler=scheduler,
                                steps=int(options["teacher_steps"]), guidance=float(guidance),
                                seed=int(options["pair_seed"]), shard_size=int(options["shard_size"]),
                                base=str(cfg.base), progress=not cfg.quiet, spacing=spacing, size=size)
        run.accelerator.wait_for_everyone()
        manifest, pairs = load_teacher_cache(folder)
        if len(pairs["noise"]) < int(options["pairs"]):
            raise ValueError(f"the teacher cache {folder} holds {len(pairs['noise'])} of {options['pairs']} pairs")
        self.noise = pairs["noise"][: int(options["pairs"])]
        self.targets = pairs["target"][: int(options["pairs"])]
        self.prompt_index = pairs["prompt_index"][: int(options["pairs"])]
        self.cond = move(family.encode_text(manifest["prompts"], run.device), "cpu", torch.float32)
        self.teacher_images = torch.cat([family.decode_latents(self.targets[i:i + 64].to(run.device)).float().cpu()
                                         for i in range(0, len(self.targets), 64)])
        self.feature_fn = evaluator_features(run.device) if self.loss_config.feature_weight else None
        run.sample = self.sample_for(run)  # the loop's validation images become one-step samples
        # "unet_params" counts any denoiser (UNet or transformer): the key predates DiT students and hipa.json keeps it
        denoiser_params = sum(p.numel() for p in family.denoiser.parameters())
        return {"objective": "hipa", "family": family.name, "size": size, "teacher_cache": str(folder),
                "teacher_pairs": int(len(self.noise)),
                "teacher": {k: manifest.get(k) for k in ("scheduler", "sampler", "steps", "guidance", "spacing")},
                "prompts": manifest["prompts"], "loss": self.loss_config.to_dict(), "unet_params": denoiser_params,
                "timestep": self.timestep}

    def sample_for(self, run):
        from pipelines.hipa import one_step
        from pipelines.text2image import seeded_generators

        def sample(settings):
            return one_step(run.pipe, settings.prompt, generator=seeded_generators(settings.seed, 1),
                            height=settings.height, width=settings.width, timestep=self.timestep).images[0]
        return sample

    def loss(self, run, step, micro):
        from pipelines.families import move, take
        from pipelines.hipa import hf_energy, hipa_loss, student_x0
        from studio.data import example_indices

        cfg, device, family = run.config, run.device, run.family
        batch = cfg.batch_size
        start = ((step * cfg.grad_accum + micro) * run.accelerator.num_processes + run.accelerator.process_index) * batch
        picks = example_indices(cfg.seed, len(self.noise), start, batch)
        cond = move(take(self.cond, self.prompt_index[picks]), device)
        latents = student_x0(family, self.noise[picks].to(device), cond, self.timestep, denoiser=run.denoiser)
        images = family.decode_latents(latents)
        teacher = self.teacher_images[picks].to(device)
        loss, logs = hipa_loss(images.float(), teacher, self.loss_config, latents, self.targets[picks].to(device),
                               feature_fn=self.feature_fn)
        # The paper's diagnostic: the student's high-frequency energy should rise toward the teacher's.
        with torch.no_grad():
            cutoff = self.loss_config.cutoff
            logs["hf_vs_teacher"] = float(hf_energy(images, cutoff).mean() / hf_energy(teacher, cutoff).mean().clamp_min(1e-12))
        return loss, logs


def train_hipa(config, progress=None, stop=None):
    """Run (or resume) a HiPA training run in the shared loop; returns the run folder. The job store's
    runner for kind "hipa". The adapter lands in RUN_DIR/adapter with a hipa.json beside it."""
    from studio.files import write_json
    from studio.train import run_status, train

    config = hipa_config(config.to_dict() if hasattr(config, "to_dict") else config)
    run_dir = Path(train(config, objective=HiPAObjective(), progress=progress, stop=stop))
    status = run_status(run_dir)
    if status.get("state") == "done":
        data = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
        write_json(Path(status["result"]) / "hipa.json", {
            "family": data.get("family"), "timestep": data.get("timestep"), "size": data.get("size"),
            "guidance_baked_in": data.get("teacher", {}).get("guidance"),
            "teacher": data.get("teacher"), "teacher_pairs": data.get("teacher_pairs"), "prompts": data.get("prompts"),
            "loss": data.get("loss"), "steps": config["steps"], "base": str(config.get("base", "embedded")),
            "trainable_params": status.get("trainable_params"), "unet_params": data.get("unet_params"),
            "usage": "pipelines.one_step(pipe, prompt, adapter=FOLDER) or studio generate --one-step FOLDER"})
    return run_dir


def adapter_summary(adapter, unet_params: int) -> dict:
    """Trainable parameters of an adapter folder against the (plain) UNet's parameter count."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as handle:
        params = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return {"adapter_params": int(params), "unet_params": int(unet_params),
            "trainable_share_of_unet": params / max(int(unet_params), 1)}
