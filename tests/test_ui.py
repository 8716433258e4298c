"""The studio page without a browser: the adapter library on disk, uploads, serve options, cheap imports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio import library

ROOT = Path(__file__).resolve().parent.parent


def fake_adapter(folder: Path, method="lora", rank=4, base="embedded", hipa=False):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"method": method, "r": rank, "base_model_name_or_path": base, "adapter": {"targets": "attn"}}
    (folder / library.CONFIG_NAME).write_text(json.dumps(config))
    (folder / library.WEIGHTS_NAME).write_bytes(b"\0" * 2048)
    if hipa:
        (folder / library.HIPA_NAME).write_text("{}")
    return folder


def test_library_list_rename_delete(tmp_path):
    home = tmp_path / "home"
    assert library.list_adapters(home) == []
    fake_adapter(home / "adapters" / "bag")
    fake_adapter(home / "adapters" / "shoe", method="loldu", rank=8, base="/models/sd")
    (home / "adapters" / "not-an-adapter").mkdir()
    info = {a["name"]: a for a in library.list_adapters(home)}
    assert set(info) == {"bag", "shoe"}
    assert info["shoe"]["method"] == "loldu" and info["shoe"]["rank"] == 8 and info["shoe"]["base_model"] == "/models/sd"
    assert info["bag"]["targets"] == "attn" and info["bag"]["size"] == "2.0 KB"
    library.rename_adapter("bag", "bag-v2", home=home)
    assert sorted(library.adapter_names(home)) == ["bag-v2", "shoe"]
    with pytest.raises(ValueError, match="already has"):
        library.rename_adapter("bag-v2", "shoe", home=home)
    with pytest.raises(ValueError, match="not a valid adapter name"):
        library.rename_adapter("shoe", "../escape", home=home)
    library.delete_adapter("shoe", home=home)
    assert library.adapter_names(home) == ["bag-v2"]
    with pytest.raises(ValueError, match="no adapter named"):
        library.delete_adapter("shoe", home=home)


def test_names_are_never_paths():
    for bad in ("", ".", "..", "../x", "a/b", "/abs", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(ValueError):
            library.check_name(bad)
    assert library.check_name("my-bag_v1.2") == "my-bag_v1.2"


def test_export_unknown_format_is_one_line(tmp_path):
    fake_adapter(tmp_path / "adapters" / "bag")
    with pytest.raises(ValueError, match="unknown export format"):
        library.export_adapter("bag", format="ckpt", home=tmp_path)


def test_uploads_are_renamed_and_checked(tmp_path):
    from PIL import Image

    sources = tmp_path / "src"
    sources.mkdir()
    good = sources / "..; rm -rf ~.png"
    Image.new("RGBA", (20, 30), (1, 2, 3, 4)).save(good)
    folder = library.save_subject_upload([str(good), str(good)], home=tmp_path / "home")
    assert folder.parent == tmp_path / "home" / "subjects"
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png"]
    assert Image.open(folder / "000.png").mode == "RGB"
    bad = sources / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="upload 2 is not a readable image"):
        library.save_subject_upload([str(good), str(bad)], home=tmp_path / "home")
    assert len(list((tmp_path / "home" / "subjects").iterdir())) == 1  # nothing half-made left behind
    with pytest.raises(ValueError, match="upload at least one image"):
        library.save_subject_upload([], home=tmp_path / "home")


def test_finished_jobs_join_the_library_once(tmp_path):
    from studio.jobs import JobStore

    store = JobStore(tmp_path)
    run = tmp_path / "runs" / "r1"
    fake_adapter(run / "adapter", hipa=True)
    job = store.submit({"images": str(tmp_path), "prompt": "p", "steps": 3, "out": str(run)}, name="my bag!")
    store.finish(job.id, "done")
    assert library.import_finished_jobs(store, tmp_path) == ["my-bag"]
    assert library.import_finished_jobs(store, tmp_path) == []
    info = library.list_adapters(tmp_path)[0]
    assert info["name"] == "my-bag" and info["one_step"]  # hipa.json travels with the adapter


def test_serve_options(monkeypatch):
    from studio.commands.serve import parse_auth, server_port
    from studio.cli import build_parser

    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "STUDIO_HOST", "STUDIO_PORT"):
        monkeypatch.delenv(name, raising=False)

    assert parse_auth("ann:secret:x") == ("ann", "secret:x")
    assert parse_auth(None) is None
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("nopassword")
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and server_port(args.port) == 7860


def test_page_builds_without_loading_models(tmp_path, tiny_sd_dir):
    """`import studio` stays free of gradio; building the page imports neither torch nor diffusers."""
    code = ("import sys, studio, studio.library; assert 'gradio' not in sys.modules, 'studio imports gradio'\n"
            "from studio.ui import build_app\n"
            f"demo = build_app(base={str(tiny_sd_dir)!r}, home={str(tmp_path)!r})\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'the page loaded models'\n"
            "ids = {getattr(b, 'elem_id', None) for b in demo.blocks.values()}\n"
            "assert 'train-rslora' in ids, 'the Train tab cannot ask for the rsLoRA scale'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


def test_compare_axes():
    from studio.compare import parse_axis

    assert parse_axis("steps", "5, 10") == [5, 10]
    assert parse_axis("scheduler", "ddim,unipc") == ["ddim", "unipc"]
    assert parse_axis("none", "") == [None]
    with pytest.raises(ValueError, match="takes int"):
        parse_axis("steps", "five")
    with pytest.raises(ValueError, match="unknown axis"):
        parse_axis("colour", "red")


def test_grid_and_adapters_through_run_generate(tiny_sd_dir, tmp_path):
    """One grid: adapter weight along X (0 = the base), with a real adapter saved from the tiny UNet."""
    import numpy as np
    import torch

    import adapters
    from pipelines.text2image import GenerationSettings
    from studio.compare import run_grid
    from studio.generate import get_pipeline, run_generate

    pipe = get_pipeline(str(tiny_sd_dir))
    handle = adapters.attach(pipe.unet, adapters.AdapterConfig(method="lora", rank=2, targets="attn"), name="tmp")
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.5)
    adapters.save_adapter(pipe.unet, tmp_path / "adapters" / "bag", name="tmp", base_model=str(tiny_sd_dir))
    handle.detach()
    settings = GenerationSettings(prompt="a photo of a bag", steps=2, seed=3)
    grid, cells = run_grid(settings, "weight", [0.0, 1.0], base=str(tiny_sd_dir), adapter="bag", home=tmp_path)
    assert len(cells) == 1 and len(cells[0]) == 2 and grid.width > grid.height
    folder = str(tmp_path / "adapters" / "bag")
    plain = np.asarray(run_generate(settings, pipe=pipe)[0][0])
    assert adapters.list_adapters(pipe.unet) == {}  # no adapters asked for: none left attached
    zero = np.asarray(run_generate(settings, pipe=pipe, adapters=[(folder, 0.0)])[0][0])
    full = np.asarray(run_generate(settings, pipe=pipe, adapters=[(folder, 1.0)])[0][0])
    assert np.array_equal(plain, zero) and not np.array_equal(plain, full)
    assert list(adapters.list_adapters(pipe.unet).values()) == [1.0]  # reused, only the weight changed


def test_library_command(tmp_path, capsys):
    from studio.cli import main

    fake_adapter(tmp_path / "runs" / "r1" / "adapter")
    assert main(["library", "--home", str(tmp_path), "add", str(tmp_path / "runs" / "r1"), "--name", "bag"]) == 0
    assert main(["library", "--home", str(tmp_path), "rename", "bag", "bag2"]) == 0
    capsys.readouterr()
    assert main(["library", "--home", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out.startswith("bag2 ")
    assert main(["library", "--home", str(tmp_path), "delete", "nope"]) == 2  # one line, exit code 2
    assert "no adapter named 'nope'" in capsys.readouterr().err


def test_generate_form_to_run_generate_arguments(tmp_path):
    """What the Generate tab hands run_generate: scheduler, hi-res stages, adapters, one-step with a HiPA adapter."""
    from studio.ui import UIContext
    from studio.ui_generate import NO_ADAPTER, parse_request

    ctx = UIContext(base="embedded", home=tmp_path)
    fake_adapter(tmp_path / "adapters" / "fast", hipa=True)
    fake_adapter(tmp_path / "adapters" / "bag")

    def form(prompt="a photo of a bag", seed=5, scheduler="dc-solver", hires="off", one_step=False, slots=()):
        return parse_request(ctx, prompt, "", seed, 20, 2.0, 0, 0, scheduler, "embedded", hires, one_step, list(slots))

    settings, kwargs = form(hires="4x", slots=[("bag", 0.5), (NO_ADAPTER, 1.0)])
    assert settings.scheduler == "dc-solver" and settings.extra["Hires"] == "2,4" and settings.seed == 5
    assert kwargs["adapters"] == [(str(tmp_path / "adapters" / "bag"), 0.5)]
    settings, kwargs = form(one_step=True, slots=[("fast", 1.0), ("bag", 0.7)])
    assert settings.extra["One-step"] == str(tmp_path / "adapters" / "fast") and settings.steps == 1
    assert kwargs["adapters"] == [(str(tmp_path / "adapters" / "bag"), 0.7)]
    assert form(seed=-1)[0].seed >= 0
    with pytest.raises(ValueError, match="exactly one HiPA adapter"):
        form(one_step=True, slots=[("bag", 1.0)])
    with pytest.raises(ValueError, match="cannot be combined"):
        form(one_step=True, hires="2x", slots=[("fast", 1.0)])
    with pytest.raises(ValueError, match="write a prompt"):
        form(prompt="  ")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        form(slots=[("nope", 1.0)])


def test_train_tab_fills_the_method_tables_values(tmp_path):
    """Picking a method (or base) fills the form from studio/defaults.py, family included, and says from where."""
    from studio import defaults
    from studio.ui_train import method_defaults, validation_prompt_lines

    for method, base in (("lora", "embedded"), ("loldu", "embedded"), ("loldu", "embedded-dit"), ("tlora", "embedded-dit"),
                         ("full", "embedded")):
        found = method_defaults(method, base, "a photo of sks bag")
        table = defaults.values(method, base)
        assert {k: found[k] for k in ("rank", "targets", "lr", "steps", "batch_size", "class_images")} == \
            {k: table[k] for k in ("rank", "targets", "lr", "steps", "batch_size", "class_images")}
        assert found["prior_preservation"] is True
        assert found["class_prompt"].splitlines() == defaults.class_prompts_for("a photo of sks bag", base)
        assert found["class_prompt"].splitlines()[0] == "a photo of a bag"
        assert f"`studio train --show-defaults {method}`" in found["source"]
    dit = method_defaults("tlora", "embedded-dit", "a photo of sks bag")["source"]
    assert "targets attn+ff, 600 steps (dit family default (tlora))" in dit and "DiT" in dit
    plain = method_defaults("lora", "embedded", "a photo of a bag")
    assert plain["prior_preservation"] is False and "no identifier token" in plain["source"]
    assert validation_prompt_lines("a photo of sks bag\n\n  on a beach  \n") == ["a photo of sks bag", "on a beach"]
