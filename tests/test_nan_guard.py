"""NaN guard in training (issue #12): a NaN/inf loss skips the update and is logged; after max_nan_steps in a
row the run stops with one clear line and keeps its last good checkpoint."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.cli import main
from studio.files import read_jsonl
from studio.train import SubjectObjective, TrainConfig, run_status, train
from tests.test_train import _config  # the same tiny LoRA run settings


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def subject(make_subject):
    return make_subject(2, seed=0)


def _poison(monkeypatch, bad_steps, value=float("nan")):
    """Make the objective's loss non-finite at the given 0-based steps (the graph stays connected)."""
    original = SubjectObjective.loss

    def loss(self, run, step, micro):
        value_, logs = original(self, run, step, micro)
        if step in bad_steps:
            value_ = value_ * torch.tensor(value)
        return value_, logs

    monkeypatch.setattr(SubjectObjective, "loss", loss)


def test_nan_steps_are_skipped_and_logged(tiny_sd_dir, subject, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3}, float("nan"))
    seen = {}
    original_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        seen["updates"] = seen.get("updates", 0) + 1
        return original_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    run = train(_config(tiny_sd_dir, subject, tmp_path / "run"))
    assert run_status(run)["state"] == "done"
    assert seen["updates"] == 4  # 6 steps, 2 skipped
    records = read_jsonl(Path(run) / "log.jsonl")
    skipped = [r for r in records if r.get("event") == "nan_loss"]
    assert [(r["step"], r["in_a_row"]) for r in skipped] == [(3, 1), (4, 2)]
    weights = load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_too_many_nan_steps_stop_with_one_line_and_keep_the_checkpoint(tiny_sd_dir, subject, tmp_path, monkeypatch,
                                                                       capsys):
    _poison(monkeypatch, {4, 5, 6, 7}, float("inf"))
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    import yaml

    settings = _config(tiny_sd_dir, subject, out, steps=10, max_nan_steps=3)
    config.write_text(yaml.safe_dump(settings))
    code = main(["train", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the loss was NaN/inf for 3 steps in a row"), err
    assert "step-000004" in err[-1]
    status = run_status(out)
    assert status["state"] == "failed" and "NaN/inf" in status["error"]
    checkpoint = out / "checkpoints" / "step-000004" / "weights.safetensors"
    weights = load_file(str(checkpoint))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter").exists()


def test_max_nan_steps_is_validated(tmp_path):
    with pytest.raises(ValueError, match="max-nan-steps"):
        TrainConfig.from_dict({"out": str(tmp_path), "max_nan_steps": 0})


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradients_with_a_finite_loss_are_skipped(tiny_sd_dir, subject, tmp_path, monkeypatch):
    original = SubjectObjective.loss

    def loss(self, run, step, micro):
        value, logs = original(self, run, step, micro)
        return (_NanGrad.apply(value) if step == 1 else value), logs

    monkeypatch.setattr(SubjectObjective, "loss", loss)
    run = train(_config(tiny_sd_dir, subject, tmp_path / "run", steps=3, checkpoint_every=0))
    assert run_status(run)["state"] == "done"
    skipped = [r for r in read_jsonl(Path(run) / "log.jsonl") if r.get("event") == "nan_loss"]
    assert [(r["step"], r.get("grad_norm")) for r in skipped] == [(2, "nan")]
    weights = load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
