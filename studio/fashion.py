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
