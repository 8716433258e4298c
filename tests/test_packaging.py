"""The studio as a wheel: `pip wheel .` builds it with the assets inside, and the installed copy (not the source tree)
generates from another folder: the embedded models, evaluator, HiPA adapter and sample subject are package data."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "adapters", "pipelines", "studio", "assets"]


def test_wheel_installs_and_generates_from_anywhere(tmp_path):
    # Build from a copy of what the wheel is made of: the build's scratch files stay out of the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # --no-build-isolation: the venv's setuptools builds it, so the test needs no package index
    subprocess.run(pip + ["wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("diffusion_studio-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("embedded/model_index.json", "embedded/unet/diffusion_pytorch_model.safetensors",
                  "embedded-dit/transformer/config.json", "evaluator/model.safetensors", "hipa/adapter_model.safetensors",
                  "subjects/bag/bag-0.png"):
        assert f"studio_assets/{asset}" in names, asset
    assert {"studio/commands/generate.py", "studio/bench/__init__.py"} <= names

    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the venv's dependencies, the installed studio in front of the source tree (the editable install's finder comes last)
    env = {**os.environ, "PYTHONPATH": str(site), "STUDIO_HOME": str(tmp_path / "home")}
    where = subprocess.run([sys.executable, "-c", "import studio, pipelines.loading as l, studio.library as lib; "
                            "print(studio.__file__); print(l.ASSETS); print(sorted(lib.sample_subjects()))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    studio_file, assets, subjects = where.stdout.splitlines()
    assert Path(studio_file).is_relative_to(site) and Path(assets) == site / "studio_assets"
    assert subjects == "['bag']"
    out = subprocess.run([sys.executable, "-m", "studio", "generate", "--prompt", "a photo of a sneaker", "--steps", "2",
                          "--out", "sneaker.png"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (elsewhere / "sneaker.png").stat().st_size > 0
