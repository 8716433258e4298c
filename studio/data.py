"""Training data: a folder of subject images (+ optional same-name .txt captions), class images for prior
preservation, and the step/epoch arithmetic users cannot otherwise predict.

Every file that cannot be used is skipped with a reason (listed in the run's data report); a folder with
nothing usable is one clear error. Images of any mode and size become RGB squares at the model's size.
"""
import hashlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("studio.data")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
# A loss mask beside an image: IMG.mask.png, or OneTrainer's IMG-masklabel.png (white = train on it).
MASK_ENDINGS = (".mask.png", "-masklabel.png")
# Refuse to decode anything bigger (a 20000x20000 "image" is a decompression bomb, not a subject photo).
MAX_PIXELS = 40_000_000


@dataclass
class Example:
    path: str
    caption: str
    pixels: np.ndarray  # float32 (3, size, size) in [-1, 1]
    mask: np.ndarray = None  # float32 (size, size) in [0, 1] (masked loss), cropped as the pixels are


@dataclass
class SubjectData:
    examples: list
    skipped: list = field(default_factory=list)  # [(file name, reason)]
    masks: dict = field(default_factory=dict)  # image name -> where its loss mask came from

    def report(self) -> dict:
        return {"used": [Path(e.path).name for e in self.examples],
                "captions": {Path(e.path).name: e.caption for e in self.examples},
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                **({"masks": self.masks} if self.masks else {})}


def to_rgb(image):
    """Any PIL mode -> RGB. Transparency is composited on white (product photos are cut-outs);
    16-bit and float greys are stretched to 8 bits instead of clipped."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def square(image, size: int):
    """Resize the shorter side to `size` and centre-crop: the subject stays whole and undistorted."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path, size: int) -> np.ndarray:
    """One image file -> float32 (3, size, size) in [-1, 1]. Raises ValueError with the reason it is unusable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ValueError(f"too large ({width}x{height}; the limit is {MAX_PIXELS // 1_000_000} megapixels)")
                if width < 1 or height < 1:
                    raise ValueError("empty image")
                image.load()
                rgb = square(to_rgb(image), size)
        except ValueError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError("too large to decode safely (decompression bomb)") from None
        except UnidentifiedImageError:
            raise ValueError("not a readable image") from None
        except (OSError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
            raise ValueError(f"corrupt or truncated image ({str(exc).strip() or type(exc).__name__})") from None
    array = np.asarray(rgb, dtype=np.float32)
    if (array == array[:1, :1]).all():
        raise ValueError("all one colour (nothing to learn from)")
    return (array.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def mask_file(image_path: Path):
    """The same-name mask file beside an image (MASK_ENDINGS), or None."""
    for ending in MASK_ENDINGS:
        candidate = image_path.with_name(image_path.stem + ending)
        if candidate.is_file():
            return candidate
    return None


def is_mask_file(path: Path) -> bool:
    """A file named as the mask of another image in the same folder (never a subject image itself). Names match
    as mask_file looks them up (case-sensitively)."""
    for ending in MASK_ENDINGS:
        if path.name.endswith(ending):
            stem = path.name[:-len(ending)]
            return any(path.with_name(stem + s).exists() or path.with_name(stem + s.upper()).exists()
                       for s in IMAGE_SUFFIXES)
    return False


def load_mask(image_path, size: int):
    """The loss mask of an image as float32 (size, size) in [0, 1], resized and cropped exactly as load_image
    crops the pixels: its mask file's grey values, else its alpha channel. (None, "none") where it has neither,
    else (mask, where it came from). An all-black mask is a ValueError: nothing of the image would train."""
    from PIL import Image

    image_path = Path(image_path)
    source = mask_file(image_path)
    if source is not None:
        with Image.open(source) as image:
            grey, origin = image.convert("L"), source.name
    else:
        with Image.open(image_path) as image:
            if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
                return None, "none"
            grey, origin = image.convert("RGBA").getchannel("A"), "alpha channel"
    mask = np.asarray(square(grey, size), dtype=np.float32) / 255.0
    if not mask.any():
        raise ValueError(f"its mask ({origin}) is all black: nothing of the image would train")
    return mask, origin


def read_caption(image_path: Path):
    """The same-name .txt beside an image, or None."""
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if caption_path.is_file():
        text = " ".join(caption_path.read_text(errors="replace").split())
        return text or None
    return None


def load_subject(folder, size: int, prompt=None, masks: bool = False) -> SubjectData:
    """Read a subject folder. Each image's caption is its .txt file, else `prompt` (the instance prompt).
    masks: also read each image's loss mask (load_mask; an image with none trains everywhere). Mask files are
    never subject images."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"--images must be a folder of images, got a file: {folder}")
    examples, skipped, found = [], [], {}
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.is_dir() or is_mask_file(path):
            continue
        if path.suffix.lower() == CAPTION_SUFFIX:
            if not any(path.with_suffix(s).exists() or path.with_suffix(s.upper()).exists() for s in IMAGE_SUFFIXES):
                skipped.append((path.name, "caption without an image of the same name"))
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((path.name, "not an image file"))
            continue
        try:
            pixels = load_image(path, size)
        except ValueError as exc:
            skipped.append((path.name, str(exc)))
            continue
        caption = read_caption(path) or prompt
        if not caption:
            skipped.append((path.name, "no caption: add a .txt file or give --prompt"))
            continue
        mask = None
        if masks:
            try:
                mask, origin = load_mask(path, size)
            except ValueError as exc:
                skipped.append((path.name, str(exc)))
                continue
            found[path.name] = origin
        examples.append(Example(str(path), caption, pixels, mask))
    for name, reason in skipped:
        log.warning("skipped %s: %s", name, reason)
    if not examples:
        if not skipped:
            raise ValueError(f"the image folder is empty: {folder}")
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise ValueError(f"no usable images in {folder}: {reasons}{more}")
    return SubjectData(examples, skipped, found)


@dataclass
class StepPlan:
    """How many examples one optimiser step sees and what `steps` means in epochs."""
    images: int
    repeats: int
    batch_size: int
    grad_accum: int
    processes: int
    steps: int
    class_images: int = 0

    @property
    def examples_per_epoch(self) -> int:
        return self.images * self.repeats

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples_per_epoch / self.examples_per_step)

    @property
    def epochs(self) -> float:
        return self.steps * self.examples_per_step / self.examples_per_epoch

    def describe(self) -> str:
        lines = [
            f"{self.images} images x {self.repeats} repeats = {self.examples_per_epoch} examples per epoch",
            f"batch {self.batch_size} x accumulation {self.grad_accum} x {self.processes} process(es) = "
            f"{self.examples_per_step} examples per optimiser step",
            f"{self.steps_per_epoch} steps per epoch; {self.steps} steps = {self.epochs:.2f} epochs "
            f"({self.steps * self.examples_per_step} examples seen)",
        ]
        if self.class_images:
            lines.append(f"prior preservation: each example is paired with one of {self.class_images} class images")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "examples_per_epoch": self.examples_per_epoch,
                "examples_per_step": self.examples_per_step, "steps_per_epoch": self.steps_per_epoch,
                "epochs": round(self.epochs, 4)}


def example_indices(seed: int, pool: int, start: int, count: int) -> list:
    """Indices into a pool of `pool` examples for the global example counters start..start+count-1.
    Each epoch is a fresh permutation seeded by (seed, epoch), so any step's batch can be recomputed
    from the step alone: resuming needs no data-loader state."""
    import torch

    out, cache = [], {}
    for k in range(start, start + count):
        epoch, position = divmod(k, pool)
        if epoch not in cache:
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(pool, generator=generator).tolist()
        out.append(cache[epoch][position])
    return out


def class_cache_folder(root, base: str, class_prompt: str, size: int) -> Path:
    """Class images depend on the base model, the class prompt and the size: one cache folder per triple."""
    key = hashlib.sha1(f"{base}\n{class_prompt}\n{size}".encode()).hexdigest()[:12]
    return Path(root).expanduser() / key


def ensure_class_images(pipe, class_prompt: str, count: int, folder, size: int, steps: int = 25,
                        guidance: float = 2.0, seed: int = 0, batch: int = 8, progress=None) -> list:
    """Generate (once) and cache `count` class images from the base model itself; returns their paths.
    Image i always uses seed+i, so a cache that is topped up gives the same images as one made at once."""
    from dataclasses import replace

    from pipelines.text2image import GenerationSettings, generate_from
    from studio.files import atomic_path, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "class_images.json", {"prompt": class_prompt, "size": size, "steps": steps,
                                              "guidance": guidance, "seed": seed})
    paths = [folder / f"class-{i:04d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    settings = GenerationSettings(prompt=class_prompt, steps=steps, guidance=guidance, height=size, width=size)
    for start in range(0, len(missing), batch):
        chunk = missing[start:start + batch]
        # Consecutive runs of indices share one call (per-image generators keep seed+i exact).
        runs = []
        for i in chunk:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            images = generate_from(pipe, replace(settings, seed=seed + run[0], num_images=len(run)))
            for i, image in zip(run, images):
                with atomic_path(paths[i]) as tmp:
                    image.save(tmp, format="PNG")
        if progress is not None:
            progress(min(start + batch, len(missing)), len(missing))
    return paths
