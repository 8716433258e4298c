"""The evaluator: a small CNN trained on real Fashion-MNIST, shipped under assets/evaluator/.

It gives two offline stand-ins for the usual metrics (no CLIP or Inception weights exist here):
  prompt accuracy  the share of generated images the classifier puts in the prompt's class (stand-in for CLIP score)
  FD-classifier    Fréchet distance between the classifier's penultimate features of generated images and
                   of the real test split (statistics shipped); a stand-in for FID, not comparable to FID.
"""
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.assets import assets_dir
from studio import fashion

EVALUATOR_DIR = assets_dir() / "evaluator"
INPUT_SIZE = 32  # Fashion-MNIST padded from 28 by 2 black pixels each side, like the diffusion models see it


class Classifier(nn.Module):
    """Five 3x3 convolutions and two linear layers on 1x32x32 grey images in [0, 1]; features() is 128-d."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        act = nn.ReLU()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), act, nn.Conv2d(32, 32, 3, padding=1), act, nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), act, nn.Conv2d(64, 64, 3, padding=1), act, nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), act, nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(128 * 4 * 4, feature_dim), act)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        return self.body(x * 2 - 1)

    def forward(self, x):
        return self.head(self.features(x))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: nudge both diagonals, as FID code does
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(features: np.ndarray):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class Evaluator:
    def __init__(self, model: Classifier, stats: dict, config: dict):
        self.model = model.eval()
        self.stats = stats
        self.config = config
        self.classes = list(config["classes"])

    def _tensor(self, images) -> torch.Tensor:
        """PIL images (any size/mode) or a float tensor (B, C, H, W) in [0, 1] -> (B, 1, 32, 32) grey in [0, 1]."""
        if isinstance(images, torch.Tensor):
            x = images.detach().float().cpu()
            if x.dim() == 3:
                x = x.unsqueeze(0)
            x = x.mean(dim=1, keepdim=True)
        else:
            arrays = [np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images]
            if not arrays:
                return torch.zeros(0, 1, INPUT_SIZE, INPUT_SIZE)
            if len({a.shape for a in arrays}) > 1:
                from PIL import Image

                arrays = [np.asarray(im.convert("L").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR),
                                     dtype=np.float32) / 255.0 for im in images]
            x = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                          align_corners=False)
        return x.clamp(0, 1)

    @torch.no_grad()
    def _run(self, images, what):
        x = self._tensor(images)
        outs = [getattr(self.model, what)(x[i:i + 512]) for i in range(0, len(x), 512)]
        return torch.cat(outs) if outs else torch.zeros(0)

    def logits(self, images) -> torch.Tensor:
        return self._run(images, "forward")

    def classify(self, images) -> list:
        return [self.classes[i] for i in self.logits(images).argmax(dim=1).tolist()]

    def prompt_accuracy(self, images, class_name) -> float:
        """Share of images classified as class_name (one name, or one name per image)."""
        predicted = self.classify(images)
        names = [class_name] * len(predicted) if isinstance(class_name, str) else list(class_name)
        if len(names) != len(predicted):
            raise ValueError(f"got {len(predicted)} images but {len(names)} class names")
        unknown = sorted(set(names) - set(self.classes))
        if unknown:
            raise ValueError(f"unknown class '{unknown[0]}': choose from {', '.join(self.classes)}")
        return float(np.mean([p == n for p, n in zip(predicted, names)])) if names else 0.0

    def features(self, images) -> np.ndarray:
        return self._run(images, "features").numpy().astype(np.float64)

    def fd(self, images, reference: str = "all") -> float:
        """FD-classifier to the real test split: reference "all" (10 classes) or "pretrained" (without the
        held-out class). A stand-in for FID, only comparable between runs of this evaluator."""
        if reference not in ("all", "pretrained"):
            raise ValueError(f"unknown FD reference '{reference}': use all or pretrained")
        features = self.features(images)
        if len(features) < 2:
            raise ValueError("FD needs at least 2 images")
        mu, sigma = statistics(features)
        return frechet_distance(mu, sigma, self.stats[f"{reference}_mu"], self.stats[f"{reference}_sigma"])


def save_evaluator(model: Classifier, out, data_dir=None) -> dict:
    """Write model.safetensors, config.json and the real test statistics; return the test accuracy."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    from studio.files import atomic_path, write_json

    out = Path(out)
    images, labels = fashion.load_split("test", data_dir)
    x = torch.nn.functional.pad(torch.from_numpy(images).float().div(255).unsqueeze(1), (2, 2, 2, 2))
    evaluator = Evaluator(model.eval(), {}, {"classes": fashion.CLASSES})
    logits = evaluator.logits(x)
    accuracy = float((logits.argmax(1).numpy() == labels).mean())
    per_class = {c: float((logits.argmax(1).numpy()[labels == i] == i).mean()) for i, c in enumerate(fashion.CLASSES)}
    features = evaluator.features(x)
    keep = labels != fashion.CLASSES.index(fashion.HELD_OUT)
    stats = {}
    for name, rows in (("all", slice(None)), ("pretrained", keep)):
        mu, sigma = statistics(features[rows])
        stats[f"{name}_mu"], stats[f"{name}_sigma"] = mu, sigma
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(out / "stats.safetensors") as tmp:
        save_numpy(stats, str(tmp))
    config = {"architecture": "Classifier", "input_size": INPUT_SIZE, "feature_dim": int(features.shape[1]),
              "classes": fashion.CLASSES, "held_out_class": fashion.HELD_OUT, "test_accuracy": accuracy,
              "test_accuracy_per_class": per_class, "test_images": int(len(labels)),
              "note": "FD on these features is a stand-in for FID (FD-classifier), not comparable to FID"}
    write_json(out / "config.json", config)
    return {"test_accuracy": accuracy}


@lru_cache(maxsize=2)
def load_evaluator(folder=None) -> Evaluator:
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file

    folder = Path(folder) if folder else EVALUATOR_DIR
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no evaluator in {folder}: build it with `studio pretrain --model evaluator --out {folder}`")
    config = json.loads((folder / "config.json").read_text())
    model = Classifier(num_classes=len(config["classes"]), feature_dim=config["feature_dim"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return Evaluator(model, load_numpy(str(folder / "stats.safetensors")), config)


# ---------------------------------------------------------------- evaluating a base model

def _source_folder(base):
    from pipelines.loading import EMBEDDED_SOURCES

    folder = EMBEDDED_SOURCES.get(str(base), Path(str(base)))
    return folder if Path(folder).is_dir() else None


def default_sampling(base) -> dict:
    """The sampling defaults a model folder records in studio.json (guidance, steps, scheduler)."""
    folder = _source_folder(base)
    if folder is not None and (Path(folder) / "studio.json").is_file():
        return json.loads((Path(folder) / "studio.json").read_text())
    return {}


def attach_adapter(pipe, adapter, weight: float = 1.0):
    try:
        from adapters import load_adapter
    except ImportError as exc:
        raise ValueError(f"--adapter needs the adapters package, which is not available yet ({exc})") from exc
    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter}")
    from pipelines.families import family_of

    denoiser = family_of(pipe).denoiser
    load_adapter(denoiser, str(adapter), name="studio-eval", weight=weight)


def real_images(n_per_class: int, classes, split: str = "train", seed: int = 0):
    """n_per_class real images per class (PIL, 32x32 padded), drawn from `split`."""
    from PIL import Image

    images, labels = fashion.load_split(split)
    rng = np.random.default_rng(seed)
    out = []
    for name in classes:
        rows = rng.choice(np.flatnonzero(labels == fashion.CLASSES.index(name)), n_per_class, replace=False)
        out += [Image.fromarray(np.pad(images[r], 2)) for r in rows]
    return out


def evaluate_base(base="embedded", adapter=None, per_class=20, steps=25, guidance=None, scheduler="default",
                  seed=0, device=None, pipe=None, classes=None, progress=None) -> dict:
    """Generate per_class images for every class prompt and score them (the `studio eval` logic).

    Returns prompt accuracy over the pretrained classes, the held-out class's accuracy, per-class accuracy,
    FD-classifier of the pretrained-class images next to real-vs-real and noise at the same count, and the
    evaluator's own accuracy on the real test split."""
    from pipelines.text2image import GenerationSettings, generate_from
    from studio.generate import get_pipeline

    if int(per_class) < 2:
        raise ValueError(f"--per-class must be at least 2, got {per_class}")
    evaluator = load_evaluator()
    defaults = default_sampling(base)
    guidance = float(guidance if guidance is not None else defaults.get("guidance", 2.0))
    pipe = pipe or get_pipeline(base, device=device)
    if adapter:
        attach_adapter(pipe, adapter)
    classes = list(classes or fashion.CLASSES)
    began = time.perf_counter()
    generated, per_class_acc = {}, {}
    for i, name in enumerate(classes):
        settings = GenerationSettings(prompt=fashion.prompt_for(name), steps=int(steps), guidance=guidance,
                                      seed=int(seed) + 1000 * i, num_images=int(per_class), scheduler=scheduler)
        generated[name] = generate_from(pipe, settings)
        per_class_acc[name] = evaluator.prompt_accuracy(generated[name], name)
        if progress:
            progress(i + 1, len(classes), name, per_class_acc[name])
    seconds = time.perf_counter() - began
    pretrained = [c for c in classes if c != fashion.HELD_OUT]
    pooled = [im for c in pretrained for im in generated[c]]
    n = len(pooled)
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.random((n, 1, 32, 32), dtype=np.float32))
    result = {
        "base": str(base), "adapter": str(adapter) if adapter else None, "per_class": int(per_class),
        "steps": int(steps), "guidance": guidance, "scheduler": scheduler, "seed": int(seed),
        "prompt_accuracy": float(np.mean([per_class_acc[c] for c in pretrained])) if pretrained else None,
        "held_out_class": fashion.HELD_OUT,
        "held_out_accuracy": per_class_acc.get(fashion.HELD_OUT),
        "per_class_accuracy": per_class_acc,
        "fd": evaluator.fd(pooled, "pretrained") if n >= 2 else None,
        "fd_real": evaluator.fd(real_images(per_class, pretrained, seed=seed), "pretrained") if n >= 2 else None,
        "fd_noise": evaluator.fd(noise, "pretrained") if n >= 2 else None,
        "fd_name": "FD-classifier (Fréchet distance on the evaluator's penultimate features; a stand-in for FID)",
        "evaluator_test_accuracy": evaluator.config["test_accuracy"],
        "generation_seconds": round(seconds, 1),
        "device": str(pipe.device),
    }
    return result
