"""Two training processes on the CPU (torch.distributed over gloo, launched by torchrun) give the same
adapter as one process with the same global batch, and a run continues exactly on another process count."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file


@pytest.fixture
def subject(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        pixels = (np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def _train(launcher, base, images, out, batch, *extra):
    args = ["-m", "studio", "train", "--base", str(base), "--images", str(images), "--prompt", "a photo of sks bag",
            "--method", "lora", "--rank", "2", "--steps", "4", "--batch-size", str(batch), "--lr", "1e-2",
            "--no-prior-preservation", "--validate-every", "0", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--seed", "0", "--quiet",
            "--out", str(out), *extra]
    done = subprocess.run(launcher + args, check=True, capture_output=True, text=True, timeout=600)
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors"), done.stdout + done.stderr


def _assert_same(one, two):
    assert one.keys() == two.keys()
    for key in one:
        trained = (one[key] - two[key]).abs().max().item()
        scale = one[key].abs().max().item()
        assert trained <= 1e-5 + 1e-4 * scale, f"{key}: {trained} vs {scale}"


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_cpu_processes_equal_one_with_the_same_global_batch_and_resume_on_one(tiny_sd_dir, subject, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one, _ = _train([sys.executable], tiny_sd_dir, subject, tmp_path / "one", 2)
    two, _ = _train([torchrun, "--standalone", "--nproc_per_node", "2"], tiny_sd_dir, subject, tmp_path / "two", 1)
    _assert_same(one, two)
    # Lose the end of the two-process run (as if the machine went away after step 2), then finish it on one
    # process with twice the per-process batch: the same global batch, so the same run.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-000004")
    (tmp_path / "two" / "adapter" / "adapter_model.safetensors").unlink()
    resumed, said = _train([sys.executable], tiny_sd_dir, subject, tmp_path / "two", 2, "--resume")
    _assert_same(one, resumed)
    assert "resumed from step-000002" in said and "written by 2" in said
