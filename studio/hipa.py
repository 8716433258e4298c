"""HiPA in the application: the teacher-pair cache on disk (progress, resume) and the training objective
the shared training loop calls (batch -> loss). The maths lives in pipelines/hipa.py.

Teacher cache folder:
  manifest.json                 base, teacher settings, prompts, seed, count, shard size, latent shape
  pairs-00000.safetensors ...   noise (k, C, h, w), target (k, C, h, w) teacher x0 latents, prompt_index (k,)
Pair i uses prompts[i % len(prompts)] and noise seeded with seed + i, so every shard is reproducible
on its own and an interrupted run resumes at the first missing shard.
"""
import json
import math
from pathlib import Path

import torch

MANIFEST = "manifest.json"
MANIFEST_KEYS = ("base", "scheduler", "steps", "guidance", "prompts", "seed", "shard_size", "latent_shape")


def default_prompts():
    from studio.fashion import PRETRAINED_CLASSES, prompt_for

    return [prompt_for(name) for name in PRETRAINED_CLASSES]


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"pairs-{index:05d}.safetensors"


def build_teacher_cache(pipe, folder, count: int, prompts=None, scheduler="dpm++", steps: int = 25,
                        guidance: float = 2.0, seed: int = 0, shard_size: int = 32, base: str = "",
                        progress=True, stop=None):
    """Generate `count` (prompt, noise, teacher x0) pairs into `folder`, skipping shards already on disk.

    A folder made with other settings is refused (one clear line) rather than silently mixed.
    progress: True for a tqdm bar, a callable(done, total), or False. stop() -> True ends after the
    current shard (the next call resumes). Returns the manifest dict."""
    from safetensors.torch import save_file

    from pipelines.hipa import latent_shape, seeded_noise, teacher_x0
    from studio.files import atomic_path, write_json

    prompts = list(prompts or default_prompts())
    if int(count) < 1:
        raise ValueError(f"the number of teacher pairs must be at least 1, got {count}")
    if int(shard_size) < 1:
        raise ValueError(f"the shard size must be at least 1, got {shard_size}")
    folder = Path(folder)
    manifest = {"base": str(base), "scheduler": scheduler, "steps": int(steps), "guidance": float(guidance),
                "prompts": prompts, "seed": int(seed), "shard_size": int(shard_size),
                "latent_shape": list(latent_shape(pipe)), "count": int(count)}
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
        noise = torch.cat([seeded_noise(pipe, 1, seed=seed + i) for i in range(start, end)])
        index = torch.arange(start, end) % len(prompts)
        target = teacher_x0(pipe, [prompts[i] for i in index.tolist()], noise, scheduler=scheduler, steps=steps,
                            guidance=guidance)
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


class HiPAObjective:
    """batch -> (loss, logs) for the shared training loop: ONE student call from the cached noise,
    decoded with the frozen VAE, against the decoded teacher target (spatial + high-frequency terms).

    The pipeline's UNet must already carry the trainable adapter; text states are computed once per
    prompt (the text encoder is frozen), and so are the decoded teacher images per pair."""

    def __init__(self, pipe, prompts, loss_config=None, feature_fn=None, timestep=None):
        from pipelines.hipa import HiPALossConfig, encode_prompts

        self.pipe = pipe
        self.loss_config = loss_config if isinstance(loss_config, HiPALossConfig) else HiPALossConfig.from_dict(loss_config)
        self.feature_fn = feature_fn
        self.timestep = timestep
        with torch.no_grad():
            self.prompt_states = encode_prompts(pipe, prompts).float()
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)

    def __call__(self, batch):
        from pipelines.hipa import decode_latents, hipa_loss, student_x0

        device = self.pipe.device
        noise = batch["noise"].to(device)
        target = batch["target"].to(device)
        states = self.prompt_states[batch["prompt_index"].to(self.prompt_states.device)].to(device, self.pipe.unet.dtype)
        latents = student_x0(self.pipe.unet, self.pipe.scheduler, noise.to(self.pipe.unet.dtype), states, self.timestep)
        images = decode_latents(self.pipe.vae, latents)
        with torch.no_grad():
            teacher_images = decode_latents(self.pipe.vae, target)
        loss, logs = hipa_loss(images.float(), teacher_images.float(), self.loss_config, latents, target,
                               feature_fn=self.feature_fn)
        return loss, logs
