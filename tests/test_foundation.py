"""Foundation: every family loads from a saved folder and generates; the CLI is deterministic and
answers user mistakes with one line; the packages keep their dependency direction."""
import subprocess
import sys

import numpy as np
import pytest

from pipelines import PipelineLoadError, generate, load_pipeline, seeded_generators
from studio.cli import main


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_pixart_dir", "tiny_sd3_dir"])
def test_family_loads_from_folder_and_generates(fixture, request):
    pipe = load_pipeline(request.getfixturevalue(fixture), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.attention_backend == "sdpa"
    a, b = (generate(pipe, "a cat", num_inference_steps=2, height=32, width=32, num_images_per_prompt=2,
                     generator=seeded_generators(3, 2), output_type="np").images for _ in range(2))
    assert a.shape == (2, 32, 32, 3)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1]), "each image has its own seed"


def test_cli_generate_is_deterministic(tiny_sd_dir, tmp_path):
    args = ["generate", "--base", str(tiny_sd_dir), "--prompt", "a cat", "--steps", "3"]
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert main(args + ["--seed", "2", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = ((tmp_path / f"{n}.png").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    from studio.images import read_settings

    meta = read_settings(tmp_path / "a.png")
    assert meta["prompt"] == "a cat" and meta["seed"] == 1 and meta["steps"] == 3


def test_cli_several_images_record_their_own_seed(tiny_sd_dir, tmp_path):
    from studio.images import read_settings

    assert main(["generate", "--base", str(tiny_sd_dir), "--prompt", "x", "--steps", "2", "--seed", "5",
                 "--num-images", "2", "--out", str(tmp_path / "o.png")]) == 0
    assert [read_settings(tmp_path / f"o-{i}.png")["seed"] for i in range(2)] == [5, 6]


@pytest.mark.parametrize("extra, expected", [
    (["--base", "/no/such/folder"], "model folder not found"),
    (["--height", "30"], "multiple of"),
    (["--steps", "0"], "steps must be"),
    (["--scheduler", "bogus"], "unknown scheduler"),
])
def test_cli_user_errors_are_one_line(tiny_sd_dir, tmp_path, capsys, extra, expected):
    args = ["generate", "--base", str(tiny_sd_dir), "--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(PipelineLoadError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_hub_id_fails_with_its_name():
    with pytest.raises(PipelineLoadError, match="no-such-user/no-such-model"):
        load_pipeline("no-such-user/no-such-model")


def test_imports_keep_dependency_direction():
    code = ("import sys, adapters, pipelines, studio; import studio.cli; "
            "bad = [m for m in ('gradio', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, adapters; assert 'diffusers' not in sys.modules and 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
