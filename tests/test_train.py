"""The training loop: exact resume (stop or SIGKILL, then --resume gives bitwise the same adapter as an
uninterrupted run on CPU), a run folder with everything promised, config checks, YAML + flags, method hooks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.cli import main
from studio.files import read_jsonl
from studio.train import TrainConfig, run_status, train

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def subject(make_subject):
    return make_subject(3, seed=0, size=(40, 36), captions={"0": "a photo of sks bag on grass"})


def _config(tiny_sd_dir, subject, out, **extra):
    settings = dict(base=str(tiny_sd_dir), images=str(subject), prompt="a photo of sks bag", method="lora", rank=2,
                    steps=6, lr=1e-3, batch_size=1, prior_preservation=False, validate_every=0, validation_seeds=[],
                    checkpoint_every=2, device="cpu", quiet=True, out=str(out))
    settings.update(extra)
    return settings


def _adapter(run_dir):
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(run_dir) / "log.jsonl") if "loss" in r]


def _same(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tiny_sd_dir, subject, tmp_path_factory):
    """One uninterrupted run that the resumed runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_config(tiny_sd_dir, subject, out, steps=8, grad_accum=2))
    return out


def test_stop_then_resume_is_bitwise_identical(tiny_sd_dir, subject, reference, tmp_path):
    out = tmp_path / "run"
    calls = []
    train(_config(tiny_sd_dir, subject, out, steps=8, grad_accum=2), stop=lambda: len(calls) > 2 or calls.append(1))
    status = run_status(out)
    assert status["state"] == "stopped" and status["step"] == 3
    assert (out / "checkpoints" / "step-000003").is_dir()
    train(_config(tiny_sd_dir, subject, out, steps=8, grad_accum=2, resume=True))
    assert run_status(out)["state"] == "done"
    _same(_adapter(reference), _adapter(out))
    assert _losses(out) == _losses(reference)  # the log was cut back to the checkpoint, then continued


@pytest.mark.parametrize("base", ["tiny_sd_dir", "tiny_sd3_dir"])  # a UNet, and a DiT with the flow objective
def test_sigkill_then_resume_is_bitwise_identical(base, subject, tmp_path, request):
    tiny_sd_dir = request.getfixturevalue(base)
    settings = _config(tiny_sd_dir, subject, tmp_path / "killed", steps=10, checkpoint_every=2, keep_checkpoints=3,
                       resolution=32)
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            continue  # validation_seeds=[]: set through the YAML below
        else:
            flags += [flag, str(value)]
    (tmp_path / "c.yaml").write_text("validation_seeds: []\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", "--config", str(tmp_path / "c.yaml"), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = tmp_path / "killed" / "checkpoints" / "step-000004"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-2000:]
    assert run_status(tmp_path / "killed").get("state") in ("running", None)  # killed: no clean ending written
    assert not (tmp_path / "killed" / "adapter").exists()
    train({**settings, "resume": True})
    train(_config(tiny_sd_dir, subject, tmp_path / "clean", steps=10, checkpoint_every=2, resolution=32))
    _same(_adapter(tmp_path / "clean"), _adapter(tmp_path / "killed"))
    assert _losses(tmp_path / "clean") == _losses(tmp_path / "killed")


def test_run_folder_has_config_log_samples_checkpoints_and_adapter(tiny_sd_dir, subject, tmp_path):
    out = tmp_path / "run"
    events = []
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks bag on a beach\n\n")
    train(_config(tiny_sd_dir, subject, out, steps=4, validate_every=2, validation_seeds=[0, 1], validation_steps=2,
                  validation_prompts=["a photo of sks bag"], validation_prompts_file=str(prompts),
                  checkpoint_every=1, keep_checkpoints=2), progress=events.append)
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "lora" and saved["steps"] == 4 and saved["images"] == str(subject)
    steps = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "lr", "seconds", "elapsed", "peak_mem_mb"} <= set(r) for r in steps)
    for step in (0, 2, 4):  # step 0 is the base model's baseline; a prompt per row, a seed per column, one grid
        folder = out / "samples" / f"step-{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == ["p0-seed0.png", "p0-seed1.png", "p1-seed0.png", "p1-seed1.png"]
        grid = Image.open(out / "samples" / f"step-{step:06d}.png")
        cell = np.asarray(Image.open(folder / "p1-seed1.png").convert("RGB"))
        scale = grid.height // 2 // cell.shape[0]  # below a label strip, two rows of cells (small ones enlarged)
        corner = np.asarray(grid.convert("RGB"))[-scale * cell.shape[0]:, -scale * cell.shape[1]:][::scale, ::scale]
        assert np.array_equal(corner, cell)
    assert "a photo of sks bag on a beach" in (out / "adapter" / "README.md").read_text()  # the card names p1 too
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000003", "step-000004"]  # rotation
    data = json.loads((out / "data.json").read_text())
    assert data["plan"]["steps_per_epoch"] == 3 and data["trainable_params"] > 0
    assert data["captions"]["0.png"] == "a photo of sks bag on grass"
    kinds = [e["type"] for e in events]
    assert kinds[0] == "plan" and kinds.count("step") == 4 and kinds[-1] == "done" and "samples" in kinds
    # the final adapter loads into a fresh UNet and changes its output
    from adapters import load_adapter
    from pipelines import load_pipeline

    unet = load_pipeline(tiny_sd_dir, device="cpu").unet
    x, t, h = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 3, 32)
    before = unet(x, t, h).sample
    load_adapter(unet, out / "adapter", name="subject")
    assert not torch.allclose(before, unet(x, t, h).sample)


def test_resume_refuses_a_changed_config_unless_forced(tiny_sd_dir, subject, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_sd_dir, subject, out, steps=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(_config(tiny_sd_dir, subject, out, steps=2))
    with pytest.raises(ValueError, match=r"config changed.*lr: 0.001 -> 0.01"):
        train(_config(tiny_sd_dir, subject, out, steps=2, lr=1e-2, resume=True))
    train(_config(tiny_sd_dir, subject, out, steps=3, resume=True, force=True))  # forced: extends the run
    assert run_status(out)["step"] == 3


def test_every_option_together_trains(tiny_sd_dir, subject, tmp_path):
    """Accumulation, prior preservation over two class prompts (class images made by the base model, cached per
    prompt), min-SNR, EMA, flips, caption dropout, warm-up + cosine, gradient checkpointing, bf16 autocast on CPU:
    a finite loss and a result."""
    cache = tmp_path / "cache"
    settings = _config(tiny_sd_dir, subject, tmp_path / "run", steps=3, grad_accum=2, batch_size=2,
                       prior_preservation=True, class_prompt=["a photo of a bag", "a photo of a shirt"], class_images=3,
                       class_cache=str(cache),
                       class_sampling_steps=2,
                       snr_gamma=5.0, ema_decay=0.9, flip=True, caption_dropout=0.2, lr_scheduler="cosine",
                       warmup_steps=1, gradient_checkpointing=True, mixed_precision="bf16", repeats=2)
    train(settings)
    records = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) and "prior_loss" in r for r in records)
    assert records[0]["lr"] < records[1]["lr"]  # warm-up
    pngs = sorted(cache.rglob("class-*.png"))
    assert len(pngs) == 6 and len({p.parent for p in pngs}) == 2  # per prompt, its own cache folder
    report = json.loads((tmp_path / "run" / "data.json").read_text())
    assert report["class_prompt"] == ["a photo of a bag", "a photo of a shirt"] and len(report["class_folders"]) == 2
    assert report["plan"]["class_images"] == 6
    stamp = [p.stat().st_mtime_ns for p in pngs]
    train({**settings, "out": str(tmp_path / "run2")})
    assert [p.stat().st_mtime_ns for p in pngs] == stamp  # cached, not regenerated
    assert (tmp_path / "run2" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_saves_a_unet(tiny_sd_dir, subject, tmp_path):
    train(_config(tiny_sd_dir, subject, tmp_path / "run", method="full", steps=2, lr=1e-4))
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert run_status(tmp_path / "run")["trainable_params"] > 100_000


def test_method_hooks_skip_updates_and_keep_state_across_resume(tiny_sd_dir, subject, tmp_path, monkeypatch):
    """The generic hooks SaRA uses: on_step may skip an update; training_state survives a resume."""
    from adapters.lora import LoRA

    seen = []
    monkeypatch.setattr(LoRA, "on_step", lambda self, step, optimizer: seen.append(step) or True, raising=False)
    monkeypatch.setattr(LoRA, "training_state", lambda self: {"switched": torch.tensor([len(seen)])}, raising=False)
    restored = []
    monkeypatch.setattr(LoRA, "load_training_state", lambda self, state: restored.append(int(state["switched"][0])),
                        raising=False)
    out = tmp_path / "run"
    train(_config(tiny_sd_dir, subject, out, steps=2, checkpoint_every=1))
    assert sorted(set(seen)) == [0, 1]
    lora_b = [v for k, v in _adapter(out).items() if k.endswith("lora_B")]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # every update skipped: B stays zero
    train(_config(tiny_sd_dir, subject, out, steps=3, checkpoint_every=1, resume=True, force=True))
    assert restored and restored[0] > 0


def test_cli_yaml_config_and_flags(tiny_sd_dir, subject, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"base: {tiny_sd_dir}\nimages: {subject}\nprompt: a photo of sks bag\nsteps: 2\nrank: 2\n"
                      f"validation_seeds: []\ndevice: cpu\nadapter_options: {{}}\nprior_preservation: false\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--steps", "1", "--lr", "0.002", "--no-quiet", "--out", str(out)]) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 1 and saved["lr"] == 0.002 and saved["rank"] == 2  # flags win over the file
    assert str(out / "adapter") in capsys.readouterr().out


@pytest.mark.parametrize("extra, expected", [
    (["--base", "/no/such/model"], "model folder not found"),
    (["--images", "/no/such/folder"], "image folder not found"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--lr-scheduler", "zigzag"], "unknown lr-scheduler"),
    (["--prior-preservation"], "needs --class-prompt"),
])
def test_cli_user_errors_are_one_line(tiny_sd_dir, subject, tmp_path, capsys, extra, expected):
    args = ["train", "--base", str(tiny_sd_dir), "--images", str(subject), "--prompt", "x", "--steps", "1",
            "--device", "cpu", "--out", str(tmp_path / "run"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    status = run_status(tmp_path / "run")
    assert status.get("state") in (None, "failed")


def test_empty_image_folder_fails_clearly(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--base", str(tiny_sd_dir), "--images", str(tmp_path / "empty"), "--prompt", "x",
                 "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "image folder is empty" in capsys.readouterr().err
    assert run_status(tmp_path / "run")["state"] == "failed"


def test_config_round_trips_and_rejects_unknown_keys():
    config = TrainConfig(images="x", out="y", validation_seeds=[3])
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown training setting 'stepz'"):
        TrainConfig.from_dict({"stepz": 3, "out": "y"})


def test_sara_progressive_switch_resumes_bitwise(tiny_sd_dir, subject, tmp_path):
    """SaRA's progressive step (re-select, fresh optimiser state, skipped update) through the generic hooks;
    stopping right after the switch and resuming still reproduces the uninterrupted run."""
    from adapters import METHODS

    if "sara" not in METHODS:
        pytest.skip("SaRA is not in adapters yet")
    settings = dict(method="sara", targets="attn", steps=5, checkpoint_every=1,
                    adapter_options={"fraction": 0.2, "progressive_at": 3})
    train(_config(tiny_sd_dir, subject, tmp_path / "ref", **settings))
    calls = []
    train(_config(tiny_sd_dir, subject, tmp_path / "cut", **settings), stop=lambda: len(calls) > 3 or calls.append(1))
    assert run_status(tmp_path / "cut")["step"] == 4
    train(_config(tiny_sd_dir, subject, tmp_path / "cut", resume=True, **settings))
    ref, cut = _adapter(tmp_path / "ref"), _adapter(tmp_path / "cut")
    _same(ref, cut)
    assert any(k.endswith("sara_progressed") and bool(v.all()) for k, v in ref.items())


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-4` as a string; the config takes it as the number it spells."""
    from studio.train import load_config_file

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nweight_decay: 1e-2\n")
    config = TrainConfig.from_dict({**load_config_file(tmp_path / "c.yaml"), "images": "x", "out": str(tmp_path / "o")})
    assert config.lr == 1e-4 and config.weight_decay == 1e-2
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig.from_dict({"lr": "lots", "images": "x", "out": str(tmp_path / "o")})


def test_subject_bench_makes_the_class_images_training_then_finds_cached(tiny_sd_dir, subject, tmp_path):
    """`studio bench subject --prior N` generates the shared class images up front (so no method's wall time
    includes them); a run with the bench's prior settings must find every one of them cached."""
    from argparse import Namespace

    from studio.bench.subject import _class_images

    prior = {"prior_preservation": True, "class_prompt": ["a photo of a bag", "a photo of a shirt"],
             "class_images": 2, "class_cache": str(tmp_path / "cache")}
    _class_images(Namespace(base=str(tiny_sd_dir), device="cpu"), prior)
    pngs = sorted((tmp_path / "cache").rglob("class-*.png"))
    assert len(pngs) == 4
    stamp = [p.stat().st_mtime_ns for p in pngs]
    train(_config(tiny_sd_dir, subject, tmp_path / "run", steps=1, seed=0, class_sampling_steps=25, **prior))
    assert sorted((tmp_path / "cache").rglob("class-*.png")) == pngs
    assert [p.stat().st_mtime_ns for p in pngs] == stamp


def test_rslora_reaches_the_adapter_from_flags_yaml_and_config(tmp_path):
    from studio.commands.train import add_config_arguments, config_from_args
    import argparse

    config = TrainConfig.from_dict({"method": "tlora", "rank": 6, "alpha": 1, "rslora": True, "out": "x"})
    assert config.adapter_config().scale == pytest.approx(1 / 6 ** 0.5)  # TLoRA's paper scale, 0.41 at R = 6
    assert TrainConfig.from_dict({"method": "tlora", "rank": 6, "out": "x"}).adapter_config().scale == 1.0
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    (tmp_path / "c.yaml").write_text("rslora: true\nalpha: 1\n")
    for argv in (["--rslora", "--alpha", "1"], ["--config", str(tmp_path / "c.yaml")]):
        settings = config_from_args(parser.parse_args(argv + ["--method", "tlora", "--rank", "6", "--out", "x"]))
        assert TrainConfig.from_dict(settings).adapter_config().scale == pytest.approx(1 / 6 ** 0.5)


@pytest.mark.parametrize("method, kept", [("tlora", ("tlora_T",)), ("dora", ("dora_magnitude",)),
                                          ("loldu", ("loldu_z", "loldu_sigma")), ("lora", ())])
def test_weight_decay_spares_tensors_whose_neutral_value_is_not_zero(method, kept):
    """With zero gradients AdamW only decays: transform cores, magnitudes and LoLDU's scalars must not move."""
    from pipelines.tiny import tiny_sd_pipeline
    from studio.train import Trainable, make_optimizer

    config = TrainConfig.coerce(TrainConfig(method=method, rank=2, weight_decay=0.5, lr=0.1, out="x"))
    trainable = Trainable(tiny_sd_pipeline().unet, config)
    named = [(key, p) for layer in trainable.layers() for key, p in layer.named_parameters()]
    before = [p.detach().clone() for _, p in named]
    optimizer = make_optimizer(config, trainable.parameter_groups(config.weight_decay))
    for p in trainable.params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for (key, p), old in zip(named, before):
        if key.startswith(kept):
            assert torch.equal(p, old), key
        elif old.any():
            assert not torch.equal(p, old), key  # everything else decays as before
    assert not kept or any(key.startswith(kept) for key, _ in named)


def test_masked_loss_counts_only_what_the_masks_keep(tiny_sd_dir, make_subject, tmp_path, monkeypatch):
    """--masked-loss: each image's mask, pooled onto the latent grid, weights its loss (a mean over what it keeps);
    a prediction wrong only where every mask is black has zero loss. Images without a mask and the class rows of
    prior preservation train everywhere; masked_mean against a dense recomputation."""
    import torch.nn.functional as F
    from PIL import Image

    from pipelines import load_pipeline
    from studio.train import Run, SubjectObjective, make_accelerator, masked_mean

    errors, weights = torch.rand(3, 4, 5, 6), torch.rand(3, 1, 5, 6)
    dense = [sum(float(errors[b, c, i, j] * weights[b, 0, i, j]) for c in range(4) for i in range(5) for j in range(6))
             / (4 * float(weights[b].sum())) for b in range(3)]
    torch.testing.assert_close(masked_mean(errors, weights), torch.tensor(dense), rtol=1e-5, atol=0)

    folder = make_subject(3, seed=4, size=(32, 32))
    top_black = Image.new("L", (32, 32), 255)
    top_black.paste(0, (0, 0, 32, 16))
    for name in ("0", "1"):
        top_black.save(folder / f"{name}.mask.png")  # image 2 has no mask: it trains everywhere
    config = TrainConfig.from_dict(_config(tiny_sd_dir, folder, tmp_path / "run", masked_loss=True, flip=True,
                                           batch_size=3))
    pipe = load_pipeline(str(tiny_sd_dir), device="cpu")
    run = Run(config, None, make_accelerator(config), pipe, lambda text: None)
    objective = SubjectObjective()
    report = objective.prepare(run)
    assert report["masks"] == {"0.png": "0.mask.png", "1.png": "1.mask.png", "2.png": "none"}
    pixels = torch.ones(3, 1, 32, 32)
    pixels[:2, :, :16] = 0
    (bucket,) = objective.buckets  # square images: one bucket
    assert torch.equal(bucket.masks, F.interpolate(pixels, size=bucket.latents.shape[-2:], mode="area"))

    h = bucket.latents.shape[-2]
    wrong_on_top = torch.zeros(bucket.latents.shape[1:])
    wrong_on_top[:, : h // 2] = 7.0
    monkeypatch.setattr(objective.objective, "target", lambda latents, noise, t: torch.zeros_like(latents))
    monkeypatch.setattr(run.family, "predict", lambda noisy, t, cond, denoiser=None: wrong_on_top.expand_as(noisy))
    monkeypatch.setattr("studio.data.example_indices", lambda seed, count, start, batch: [0, 1, 0])
    loss, _ = objective.loss(run, 0, 0)
    assert float(loss) == 0.0  # every error sits where the masks are black (flips keep a top/bottom mask)
    monkeypatch.setattr("studio.data.example_indices", lambda seed, count, start, batch: [0, 1, 2])
    loss, _ = objective.loss(run, 0, 0)
    assert float(loss) == pytest.approx(49 / 2 / 3)  # image 2 trains everywhere: half its cells are off by 7


def test_prodigy_takes_its_own_step_size_and_resumes_bitwise(tiny_sd_dir, subject, tmp_path):
    """--optimizer prodigy: lr defaults to Prodigy's multiplier 1.0 (AdamW's 1e-4 is refused: it would shrink the
    step size Prodigy finds 10,000 times); it trains, and a stopped run resumes to the same adapter."""
    pytest.importorskip("prodigyopt")
    assert TrainConfig.from_dict({"optimizer": "prodigy", "out": "x"}).lr == 1.0
    assert TrainConfig.from_dict({"optimizer": "prodigy", "lr": 0.5, "out": "x"}).lr == 0.5
    with pytest.raises(ValueError, match="prodigy.*use about 1"):
        TrainConfig.from_dict({"optimizer": "prodigy", "lr": 1e-4, "out": "x"})
    settings = _config(tiny_sd_dir, subject, tmp_path / "whole", optimizer="prodigy", steps=6)
    del settings["lr"]
    train(settings)
    assert all(np.isfinite(loss) for _, loss in _losses(tmp_path / "whole"))
    part = {**settings, "out": str(tmp_path / "part")}
    calls = []
    train(part, stop=lambda: len(calls) > 2 or calls.append(1))
    assert run_status(tmp_path / "part")["state"] == "stopped"
    train({**part, "resume": True})
    _same(_adapter(tmp_path / "whole"), _adapter(tmp_path / "part"))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


def test_an_optimizer_package_that_is_missing_is_one_line(tiny_sd_dir, subject, tmp_path, monkeypatch, capsys):
    """Before anything loads or class images are drawn."""
    import pipelines

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded first"))
    code = main(["train", "--base", str(tiny_sd_dir), "--images", str(subject), "--prompt", "a photo of sks bag",
                 "--optimizer", "prodigy", "--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install prodigyopt" in err


def _tensorboard_scalars(folder: Path) -> dict:
    """{tag: {step: value}} from the event files under folder (TFRecord framing, tensorboardX's Event proto)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_report_to_tensorboard_logs_the_losses_and_a_missing_tracker_is_one_line(tiny_sd_dir, subject, tmp_path,
                                                                                 monkeypatch, capsys):
    """--report-to tensorboard: accelerate's tracker writes the losses of log.jsonl into RUN_DIR/logs; without the
    package it is one line before anything runs."""
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    train(_config(tiny_sd_dir, subject, out, steps=3, report_to="tensorboard"))
    logged = _tensorboard_scalars(out / "logs")
    assert logged["loss"] == pytest.approx(dict(_losses(out)), rel=1e-6) and set(logged["lr"]) == {1, 2, 3}
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    code = main(["train", "--base", str(tiny_sd_dir), "--images", str(subject), "--prompt", "a photo of sks bag",
                 "--report-to", "tensorboard", "--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install tensorboard" in err


@pytest.fixture(scope="module")
def framed(tmp_path_factory):
    """Non-square subject images: two wide ones (-> the 40x24 bucket), a tall one (-> 24x40), a square one."""
    folder = tmp_path_factory.mktemp("framed")
    rng = np.random.default_rng(5)
    for name, (w, h) in {"wide0": (64, 32), "wide1": (60, 32), "tall": (32, 64), "square": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def test_non_square_images_train_in_buckets_and_sample_in_their_shape(tiny_sd_dir, framed, tmp_path, monkeypatch):
    """Each model call holds one bucket; the square class images (prior preservation) share the square bucket's
    call and get their own beside the others; validation samples have the most common bucket's shape."""
    from studio.train import SubjectObjective

    calls = []
    original = SubjectObjective._per_example
    monkeypatch.setattr(SubjectObjective, "_per_example",
                        lambda self, run, latents, *rest: calls.append(tuple(latents.shape)) or original(self, run, latents, *rest))
    out = tmp_path / "run"
    train(_config(tiny_sd_dir, framed, out, steps=9, batch_size=2, validation_seeds=[0], validation_steps=2,
                  prior_preservation=True, class_prompt=["a photo of a bag"], class_images=2, class_sampling_steps=2))
    data = json.loads((out / "data.json").read_text())
    assert data["buckets"] == {"32x32": ["square.png"], "40x24": ["wide0.png", "wide1.png"], "24x40": ["tall.png"]}
    assert data["validation_size"] == "40x24"
    assert data["plan"]["padding"] == 2 and data["plan"]["steps_per_epoch"] == 3  # 3 buckets, one batch of 2 each
    # latents are half the pixels: 40x24 -> 12x20. Subject and class rows meet in one call only at the square size.
    subject_calls = [shape for shape in calls if shape[0] == 2 and shape[2:] != (16, 16) or shape[0] == 4]
    assert len(subject_calls) == 9 and {s[2:] for s in subject_calls} == {(16, 16), (12, 20), (20, 12)}
    for i, shape in enumerate(calls):
        assert shape in {(4, 4, 16, 16), (2, 4, 12, 20), (2, 4, 20, 12), (2, 4, 16, 16)}
        if shape[2:] != (16, 16):
            assert calls[i + 1] == (2, 4, 16, 16)  # the class rows' own call
    records = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    assert len(records) == 9 and all(np.isfinite([r["loss"], r["instance_loss"], r["prior_loss"]]).all() for r in records)
    for step in (0, 9):
        assert Image.open(out / "samples" / f"step-{step:06d}" / "p0-seed0.png").size == (40, 24)


def test_non_square_stop_then_resume_is_bitwise_identical(tiny_sd_dir, framed, tmp_path):
    settings = dict(steps=6, batch_size=2, grad_accum=2, flip=True, checkpoint_every=1)
    train(_config(tiny_sd_dir, framed, tmp_path / "whole", **settings))
    calls = []
    train(_config(tiny_sd_dir, framed, tmp_path / "part", **settings), stop=lambda: len(calls) > 2 or calls.append(1))
    assert run_status(tmp_path / "part")["step"] == 3
    train(_config(tiny_sd_dir, framed, tmp_path / "part", resume=True, **settings))
    _same(_adapter(tmp_path / "whole"), _adapter(tmp_path / "part"))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


@pytest.fixture(scope="module")
def whole_sd_dir(tmp_path_factory):
    """The tiny SD pipeline with every text-encoder weight saved: tiny_sd_dir's BERT has no pooler in its folder, so
    each load draws a new random (unused) one, and the encoder's fingerprint, which hashes every weight, differs."""
    from transformers import BertModel

    from pipelines.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    pipe.text_encoder = BertModel(pipe.text_encoder.config, add_pooling_layer=True).eval()
    folder = tmp_path_factory.mktemp("whole-sd")
    pipe.save_pretrained(folder)
    return folder


def test_a_second_run_encodes_nothing_and_trains_the_same(whole_sd_dir, framed, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from pipelines.families import StableDiffusion

    encodes = {"vae": 0, "text": 0}

    def counting(kind, method):
        def wrapper(*args, **kwargs):
            encodes[kind] += 1
            return method(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(AutoencoderKL, "encode", counting("vae", AutoencoderKL.encode))
    monkeypatch.setattr(StableDiffusion, "encode_text", counting("text", StableDiffusion.encode_text))
    cache = tmp_path / "cache"
    runs = {}
    for name in ("first", "second"):
        before = dict(encodes)
        out = tmp_path / name
        train(_config(whole_sd_dir, framed, out, steps=4, flip=True, cache_dir=str(cache)))
        (event,) = [r for r in read_jsonl(out / "log.jsonl") if r.get("event") == "cache"]
        assert json.loads((out / "data.json").read_text())["cache"] == {k: v for k, v in event.items() if k not in ("event", "step")}
        runs[name] = {"vae": encodes["vae"] - before["vae"], "text": encodes["text"] - before["text"], **event}
    assert runs["first"]["vae"] == 8 and runs["first"]["latents_encoded"] == 8  # 4 images, flipped and not
    assert runs["first"]["embeddings_encoded"] == 2 and runs["first"]["encode_seconds"] > 0  # the prompt and ""
    assert runs["second"]["vae"] == 0 and runs["second"]["text"] == 0
    assert runs["second"]["latents_encoded"] == 0 and runs["second"]["latents_cached"] == 8
    assert runs["second"]["embeddings_encoded"] == 0 and runs["second"]["embeddings_cached"] == 2
    assert runs["second"]["dir"] == str(cache)
    assert _losses(tmp_path / "first") == _losses(tmp_path / "second")
    _same(_adapter(tmp_path / "first"), _adapter(tmp_path / "second"))


def test_no_buckets_and_no_cache_from_flags(tiny_sd_dir, framed, tmp_path):
    import os

    import yaml

    out = tmp_path / "run"
    assert main(["train", "--base", str(tiny_sd_dir), "--images", str(framed), "--prompt", "a photo of sks bag",
                 "--steps", "1", "--rank", "2", "--device", "cpu", "--quiet", "--no-buckets", "--cache-dir", "none",
                 "--no-prior-preservation",
                 "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["buckets"] is False and saved["cache_dir"] == "none"
    data = json.loads((out / "data.json").read_text())
    assert list(data["buckets"]) == ["32x32"] and len(data["buckets"]["32x32"]) == 4  # all centre-cropped squares
    assert data["cache"]["dir"] is None and data["cache"]["latents_encoded"] == 4
    assert not list(Path(os.environ["STUDIO_CACHE"]).rglob("*.safetensors"))  # nothing written anywhere


def test_a_config_recorded_before_buckets_existed_reads_as_square_crops():
    from studio.train import config_differences

    new = {"steps": 5, "buckets": True}
    assert config_differences({"steps": 5}, new) == ["buckets"]  # it trained on squares: resuming with buckets changes it
    assert config_differences({"steps": 5}, {**new, "buckets": False}) == []
