"""Training data: a folder of subject images (+ optional same-name .txt captions), class images for prior
preservation, and the step/epoch arithmetic users cannot otherwise predict.

Every file that cannot be used is skipped with a reason (listed in the run's data report); a folder with
nothing usable is one clear error. Images of any mode and size become RGB at the model's size.

Aspect-ratio buckets: a run trains at sizes of about the model's native area (never more) in shapes from 1:2 to
2:1 (bucket_sizes); each image goes to the bucket nearest its aspect ratio and is resized to cover it with the
least centre crop (fit). An image that would need more than MAX_UPSCALE x upscaling is skipped with the reason
(kohya's no-upscale idea, as a skip: a blurry subject teaches blur). Every micro-batch comes from one bucket, and
which examples it holds is a pure function of (seed, step) (bucket_batch), so resume stays exact.
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
MAX_ASPECT = 2.0  # buckets from 1:2 to 2:1 (longer strips are banners, not subject photos)
MAX_UPSCALE = 2.0  # at most this linear upscaling to fill a bucket; smaller images are skipped


@dataclass
class Example:
    path: str
    caption: str
    pixels: np.ndarray  # float32 (3, height, width) in [-1, 1], at its bucket's size
    mask: np.ndarray = None  # float32 (height, width) in [0, 1] (masked loss), cropped as the pixels are
    bucket: tuple = None  # (width, height) it trains at
    digest: str = ""  # sha256 of the file's bytes (the latent cache's key)


@dataclass
class Bucket:
    """One training size and the examples (indices into SubjectData.examples, in folder order) that train at it."""
    width: int
    height: int
    members: list
    # set by the training objective: the members' latents (flipped too), masks on the latent grid, members as a tensor
    latents: object = None
    flipped: object = None
    masks: object = None
    index: object = None

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass
class SubjectData:
    examples: list
    skipped: list = field(default_factory=list)  # [(file name, reason)]
    masks: dict = field(default_factory=dict)  # image name -> where its loss mask came from

    def buckets(self) -> list:
        """The buckets in use, squarest first (the order bucket_sizes sorts them in)."""
        sizes = sorted({e.bucket for e in self.examples}, key=_squareness)
        return [Bucket(w, h, [i for i, e in enumerate(self.examples) if e.bucket == (w, h)]) for w, h in sizes]

    def report(self) -> dict:
        return {"used": [Path(e.path).name for e in self.examples],
                "captions": {Path(e.path).name: e.caption for e in self.examples},
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "buckets": {b.name: [Path(self.examples[i].path).name for i in b.members] for b in self.buckets()},
                **({"masks": self.masks} if self.masks else {})}


def _squareness(size) -> tuple:
    """Sort key: squarer first, then wider (deterministic tie-breaks for buckets and nearest_bucket)."""
    width, height = size
    return round(abs(math.log(width / height)), 9), -width  # rounded: 28/36 and 36/28 are equally square


def bucket_sizes(size: int, multiple: int, max_aspect: float = MAX_ASPECT) -> list:
    """Training sizes (width, height) of about size x size pixels: sides multiples of `multiple` (the model's latent
    and patch size), for each width the largest height that keeps the area within size^2 (memory never exceeds the
    square's), aspect ratios within 1:max_aspect..max_aspect:1. Squarest first; always includes the square."""
    found = {(size, size)}
    for width in range(multiple, int(size * max_aspect) + 1, multiple):
        height = size * size // width // multiple * multiple
        if height >= multiple and 1 / max_aspect <= width / height <= max_aspect:
            found.add((width, height))
    return sorted(found, key=_squareness)


def nearest_bucket(width: int, height: int, buckets: list) -> tuple:
    """The bucket whose aspect ratio is nearest the image's (in log ratio: 1:2 and 2:1 are equally far from 1:1);
    ties go to the squarer one."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), _squareness(b)))


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


def fit(image, width: int, height: int):
    """Resize to cover width x height (the scale that fills both sides) and centre-crop the rest: the subject stays
    undistorted and loses the least of its framing."""
    from PIL import Image

    w, h = image.size
    scale = max(width / w, height / h)
    new = (max(width, round(w * scale)), max(height, round(h * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def square(image, size: int):
    """Resize the shorter side to `size` and centre-crop: the subject stays whole and undistorted."""
    return fit(image, size, size)


def _sides(size) -> tuple:
    """An int size (a square) or (width, height) -> (width, height)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def upscale_reason(width: int, height: int, bucket) -> str | None:
    """Why an image is too small for its bucket (more than MAX_UPSCALE x upscaling), or None."""
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale <= MAX_UPSCALE:
        return None
    return (f"too small ({width}x{height}): its {bucket[0]}x{bucket[1]} training size needs {scale:.1f}x upscaling "
            f"(the limit is {MAX_UPSCALE:g}x); use a larger image or a lower --resolution")


def load_image(path, size, buckets=None) -> np.ndarray:
    """One image file -> float32 (3, height, width) in [-1, 1] at `size` (an int: a square; or (width, height)).
    buckets: instead, at the nearest of these (width, height) sizes, refusing more than MAX_UPSCALE x upscaling
    (load_image_in returns the size too). Raises ValueError with the reason it is unusable."""
    return load_image_in(path, [_sides(size)] if buckets is None else buckets, buckets is not None)[0]


def load_image_in(path, buckets, limit_upscale: bool = True) -> tuple:
    """(pixels, (width, height)) of one image file at the bucket nearest its aspect ratio (see load_image)."""
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
                bucket = nearest_bucket(width, height, buckets)
                rgb = fit(to_rgb(image), *bucket)
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
    too_small = upscale_reason(width, height, bucket) if limit_upscale else None
    if too_small:
        raise ValueError(too_small)
    return (array.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32), bucket


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


def load_mask(image_path, size):
    """The loss mask of an image as float32 (height, width) in [0, 1] at `size` (an int, or (width, height)),
    resized and cropped exactly as load_image crops the pixels: its mask file's grey values, else its alpha channel. (None, "none") where it has neither,
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
    mask = np.asarray(fit(grey, *_sides(size)), dtype=np.float32) / 255.0
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


def load_subject(folder, size: int, prompt=None, masks: bool = False, buckets=None) -> SubjectData:
    """Read a subject folder. Each image's caption is its .txt file, else `prompt` (the instance prompt).
    masks: also read each image's loss mask (load_mask; an image with none trains everywhere). Mask files are
    never subject images. buckets: the (width, height) sizes images may train at (bucket_sizes), default the
    size x size square; an image needing more than MAX_UPSCALE x upscaling is skipped."""
    buckets = buckets or [(size, size)]
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
            pixels, bucket = load_image_in(path, buckets)
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
                mask, origin = load_mask(path, bucket)
            except ValueError as exc:
                skipped.append((path.name, str(exc)))
                continue
            found[path.name] = origin
        examples.append(Example(str(path), caption, pixels, mask, bucket, hashlib.sha256(path.read_bytes()).hexdigest()))
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
    padding: int = 0  # examples repeated per epoch to fill each bucket's last micro-batch (bucket_batch)
    buckets: dict = field(default_factory=dict)  # "WxH" -> images training at that size

    @property
    def examples_per_epoch(self) -> int:
        return self.images * self.repeats + self.padding

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
        padded = f" + {self.padding} repeated to fill each bucket's last batch" if self.padding else ""
        lines = [
            f"{self.images} images x {self.repeats} repeats{padded} = {self.examples_per_epoch} examples per epoch",
            f"batch {self.batch_size} x accumulation {self.grad_accum} x {self.processes} process(es) = "
            f"{self.examples_per_step} examples per optimiser step",
            f"{self.steps_per_epoch} steps per epoch; {self.steps} steps = {self.epochs:.2f} epochs "
            f"({self.steps * self.examples_per_step} examples seen)",
        ]
        if len(self.buckets) > 1:
            lines.append("buckets: " + ", ".join(f"{name} ({n} image{'s' * (n != 1)})" for name, n in self.buckets.items()))
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


def bucket_shares(sizes: list, repeats: int, batch: int) -> list:
    """Micro-batches each bucket deals per epoch (round): its examples x repeats, the last batch filled up."""
    return [math.ceil(n * repeats / batch) for n in sizes]


def bucket_batch(seed: int, sizes: list, repeats: int, batch: int, k: int) -> tuple:
    """(bucket, positions) of global micro-batch k (all processes together): `batch` indices into the members of one
    bucket, whose sizes (member counts) are `sizes`. A pure function of its arguments, so resuming needs no state.

    One bucket is the plain data order (example_indices), exactly as before buckets. With several, each bucket is its
    own stream of epochs (permutations of its examples x repeats, seeded by seed + 1009 x bucket) and each round
    deals every bucket its bucket_shares micro-batches in an order seeded by (seed, round)."""
    import torch

    if len(sizes) == 1:
        return 0, [i % sizes[0] for i in example_indices(seed, sizes[0] * repeats, k * batch, batch)]
    shares = bucket_shares(sizes, repeats, batch)
    round_, position = divmod(k, sum(shares))
    deck = [b for b, share in enumerate(shares) for _ in range(share)]
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 500_009 + round_)
    order = [deck[i] for i in torch.randperm(len(deck), generator=generator).tolist()]
    bucket = order[position]
    dealt = round_ * shares[bucket] + order[:position].count(bucket)  # this bucket's earlier micro-batches
    n = sizes[bucket]
    return bucket, [i % n for i in example_indices(seed + 1009 * bucket, n * repeats, dealt * batch, batch)]


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
