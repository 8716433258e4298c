"""Fashion-MNIST: the data the embedded models learn from, and the names every door uses for its classes."""
from pathlib import Path

# Index order of the dataset's labels.
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
HELD_OUT = "bag"  # never seen in pretraining: the sample subject that fine-tuning must teach
PRETRAINED_CLASSES = [c for c in CLASSES if c != HELD_OUT]
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


def prompt_for(name: str) -> str:
    return f"a photo of a {name}"


def data_dir() -> Path:
    """Where the idx files are: $STUDIO_FASHION_MNIST (e.g. a copy on another machine) or the Debian path."""
    import os

    return Path(os.environ.get("STUDIO_FASHION_MNIST", DATA_DIR))


def _read_idx(path: Path):
    import gzip

    import numpy as np

    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]  # idx header: 0, 0, dtype, number of dimensions, then big-endian uint32 sizes
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(split: str = "train", folder=None):
    """-> (images uint8 (N, 28, 28), labels int64 (N,)) for split "train" (60k) or "test" (10k)."""
    import numpy as np

    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown Fashion-MNIST split '{split}': use train or test")
    folder = Path(folder) if folder else data_dir()
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder}: {INSTALL_HINT}")
    return _read_idx(images).copy(), _read_idx(labels).astype(np.int64)


def to_model_pixels(images, size: int = 32):
    """uint8 (N, 28, 28) -> float tensor (N, 3, size, size) in [-1, 1]: black padding to 32 (the items keep
    their exact pixels; Fashion-MNIST's background is already black), grey copied to RGB for the VAE."""
    import numpy as np
    import torch

    pad = (size - images.shape[-1]) // 2
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
