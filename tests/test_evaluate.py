"""The shipped evaluator: API shapes, accuracy on real images, FD ordering, and evaluate_base's report."""
import numpy as np
import pytest
import torch

from studio import fashion
from studio.evaluate import load_evaluator, real_images


@pytest.fixture(scope="module")
def ev():
    return load_evaluator()


@pytest.fixture(scope="module")
def real_test():
    images, labels = fashion.load_split("test")
    rows = np.random.default_rng(0).choice(len(labels), 300, replace=False)
    x = torch.nn.functional.pad(torch.from_numpy(images[rows]).float().div(255).unsqueeze(1), (2, 2, 2, 2))
    return x, [fashion.CLASSES[i] for i in labels[rows]]


def test_classifies_real_test_images(ev, real_test):
    x, names = real_test
    assert ev.prompt_accuracy(x, names) > 0.85
    assert ev.config["test_accuracy"] > 0.88


def test_api_shapes_and_inputs(ev, real_test):
    from PIL import Image

    x, names = real_test
    pil = [Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).convert("RGB").resize((64, 64)) for i in range(4)]
    assert len(ev.classify(pil)) == 4 and all(c in fashion.CLASSES for c in ev.classify(pil))
    assert ev.classify(pil) == ev.classify(x[:4])  # any size/mode, PIL or tensor
    assert ev.features(x[:5]).shape == (5, ev.config["feature_dim"])
    assert 0.0 <= ev.prompt_accuracy(x[:4], "bag") <= 1.0
    with pytest.raises(ValueError, match="unknown class"):
        ev.prompt_accuracy(x[:2], "hat")


def test_fd_orders_real_below_noise(ev):
    real = real_images(20, fashion.CLASSES, split="train")
    noise = torch.rand(len(real), 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ev.fd(real) < ev.fd(noise) / 5


def test_evaluate_base_reports(ev):
    from studio.evaluate import evaluate_base

    result = evaluate_base("embedded", per_class=2, steps=2, classes=["sneaker", fashion.HELD_OUT], device="cpu")
    assert set(result["per_class_accuracy"]) == {"sneaker", fashion.HELD_OUT}
    for key in ("prompt_accuracy", "held_out_accuracy", "fd", "fd_real", "fd_noise", "evaluator_test_accuracy"):
        assert result[key] is not None
    assert "stand-in for FID" in result["fd_name"]


def test_adapter_without_folder_is_a_clear_error():
    from studio.evaluate import attach_adapter

    with pytest.raises((ValueError, FileNotFoundError)):
        attach_adapter(None, "/nonexistent/adapter")
