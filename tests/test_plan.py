"""Memory plans (studio/plan.py): the predicted training step equals the live-tensor measurement of the same step
(tiny pipelines of every family x LoRA, SaRA and full fine-tuning at batch 2, and SD at batch 1); the budget search lists the
fewest savers that fit, fastest first, and says when nothing fits; --budget sizes; `studio plan` and `studio train
--budget` from the command line."""
import importlib.util
import json
from dataclasses import replace

import pytest

from studio.cli import main
from studio.plan import Planner, parse_size
from studio.train import TrainConfig, run_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A saved tiny pipeline per family (the planner reads configs and, for SaRA, the weights)."""
    from pipelines import tiny

    builders = {"sd": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "pixart": tiny.tiny_pixart_pipeline,
                "sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}
    folders = {}
    for name, build in builders.items():
        folders[name] = tmp_path_factory.mktemp(f"plan-{name}")
        build().save_pretrained(folders[name])
    return folders


def _config(base, **extra):
    return TrainConfig.from_dict({"base": str(base), "out": "unused", "device": "cpu", **extra})


METHODS = {"lora": {"rank": 4}, "sara": {"targets": "all", "adapter_options": {"fraction": 0.05}}, "full": {}}


# Every family at batch 2; batch 1 on SD alone shows the batch-independent part (the rows scale the same way in
# every family, and each tiny-family case costs 2-15 s).
CASES = [(family, 2) for family in FAMILIES] + [("sd", 1)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family, batch", CASES)
def test_prediction_matches_the_measured_step(tiny_dirs, family, method, batch):
    config = _config(tiny_dirs[family], method=method, batch_size=batch, **METHODS[method])
    planner = Planner(config.base, device="cpu")
    prediction = planner.predict(config)
    measured = planner.measure(config)
    assert abs(prediction.denoiser_step / measured - 1) < 0.10, (prediction.denoiser_step, measured)
    assert sum(prediction.parts.values()) == prediction.phases["step"]
    assert prediction.peak == max(prediction.phases.values()) > 0


@pytest.mark.parametrize("method, extra", [("dora", {}), ("loldu", {"rank": 4}), ("flora", {"targets": "attn+conv"}),
                                           ("tlora", {}), ("full", {"grad_accum": 2}), ("lora", {"prior_preservation": True,
                                           "class_prompt": ["a bag"], "gradient_checkpointing": True})])
def test_every_method_and_setting_is_predicted(tiny_dirs, method, extra):
    """The other methods (LoLDU's zero-pivot check answered as for healthy weights), accumulation (earlier
    micro-batches' gradients alive), prior preservation (class rows) with checkpointing."""
    config = _config(tiny_dirs["sd"], method=method, **extra)
    planner = Planner(config.base, device="cpu")
    assert abs(planner.predict(config).denoiser_step / planner.measure(config) - 1) < 0.10


def test_cuda_plans_park_the_encoders_and_use_a_half_base(tiny_dirs):
    config = _config(tiny_dirs["flux"], method="lora", device=None)
    cuda, cpu = Planner(config.base, device="cuda").predict(config), Planner(config.base, device="cpu").predict(config)
    assert cuda.settings["precision"] == "bf16" and cpu.settings["precision"] == "no"
    assert "frozen base (bfloat16)" in cuda.parts and "frozen base (float32)" in cpu.parts
    assert "VAE decoder (stays on the device)" in cuda.parts and any("parked on the CPU" in n for n in cuda.notes)
    assert cuda.parts["VAE decoder (stays on the device)"] < cpu.parts["text encoders + VAE"]


def test_search_lists_the_fewest_savers_that_fit_fastest_first(tiny_dirs):
    config = _config(tiny_dirs["sd"], method="full", batch_size=4)
    planner = Planner(config.base, device="cpu")
    base = planner.predict(config)
    assert base.bottleneck == "step"
    search = planner.search(config, base.peak - 1)
    assert search.fits and all(c.changes for c in search.fits)  # as configured does not fit
    assert all(c.prediction.peak <= search.usable for c in search.fits)
    times = [c.time for c in search.fits]
    assert times == sorted(times)
    for a in search.fits:  # none is another with more savers
        for b in search.fits:
            assert a is b or not set(a.changes.items()) <= set(b.changes.items())
    whole = planner.search(config, base.peak)
    assert [c.changes for c in whole.fits] == [{}]  # as configured fits: nothing else is listed


def test_lower_resolution_comes_last_and_nothing_fits_is_one_line(tiny_dirs, capsys):
    # full fine-tuning at batch 1 with checkpointing on and no 8-bit optimiser: only a lower bucket saves more
    config = _config(tiny_dirs["sd"], method="full", batch_size=1, gradient_checkpointing=True)
    planner = Planner(config.base, device="cpu")
    base = planner.predict(config)
    search = planner.search(config, base.peak - 1, exclude=["optimizer"])
    assert search.fits and all(set(c.changes) == {"resolution"} for c in search.fits), [c.changes for c in search.fits]
    assert search.fits[0].changes["resolution"] < base.settings["resolution"]
    none = planner.search(config, 1000)
    assert not none.fits and none.closest.prediction.peak > 1000
    assert main(["plan", "--base", str(tiny_dirs["sd"]), "--method", "full", "--device", "cpu", "--budget", "1kB"]) == 1
    out = capsys.readouterr().out
    assert "nothing fits: even" in out and len([line for line in out.splitlines() if "nothing fits" in line]) == 1


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("800MB", 800 * 10**6),
                                            ("1.5 gib", int(1.5 * 2**30)), ("512kB", 512_000)])
def test_budget_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24", "24XB", "-1GB", "0GB", "GB", "lots"])
def test_bad_budgets_are_one_line(text, capsys):
    with pytest.raises(ValueError, match="budget must be a size like 24GB"):
        parse_size(text)
    assert main(["plan", f"--budget={text}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: budget must be") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_plan_command_prints_the_breakdown_and_json(tiny_dirs, capsys):
    base = str(tiny_dirs["sdxl"])
    assert main(["plan", "--base", base, "--method", "lora", "--device", "cpu", "--measure"]) == 0
    text = capsys.readouterr().out
    for needle in ("one training step (predicted):", "frozen base (float32)", "optimizer state (AdamW: 2 moments)",
                   "activations and temporaries", "prepare", "validation", "denoiser training step: predicted"):
        assert needle in text, text
    assert main(["plan", "--base", base, "--method", "lora", "--device", "cpu", "--budget", "1GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["search"]["fits"][0]["changes"] == {} and result["prediction"]["peak"] > 0


def test_train_budget_applies_and_logs_the_plan(tiny_dirs, make_subject, tmp_path, capsys):
    subject = make_subject(3, seed=0)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"base: {tiny_dirs['sd']}\nimages: {subject}\nprompt: a photo of sks bag\nmethod: full\n"
                         f"batch_size: 2\nsteps: 2\nvalidation_seeds: []\ndevice: cpu\nprior_preservation: false\n")
    config = _config(tiny_dirs["sd"], images=str(subject), method="full", batch_size=2)
    planner = Planner(config.base, device="cpu", images=3)
    peak = planner.predict(config).peak
    # what the run picks: no 8-bit optimiser where bitsandbytes is not installed
    exclude = [] if importlib.util.find_spec("bitsandbytes") else ["optimizer"]
    chosen = planner.search(config, peak - 1, exclude=exclude, limit=1).fits[0]
    assert chosen.changes
    out = tmp_path / "run"
    assert main(["train", "--config", str(yaml_file), "--budget", f"{peak - 1}B", "--out", str(out)]) == 0
    assert f"budget {peak - 1}B: {chosen.describe()}" in capsys.readouterr().out
    plan = json.loads((out / "memory-plan.json").read_text())
    assert plan["chosen"]["changes"] == chosen.changes and run_status(out)["state"] == "done"
    data = json.loads((out / "data.json").read_text())
    for key in ("batch_size", "grad_accum"):
        assert data["plan"][key] == chosen.changes.get(key, {"batch_size": 2, "grad_accum": 1}[key])
    assert main(["train", "--config", str(yaml_file), "--budget", "1kB", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: nothing fits in 1kB") and len(err.splitlines()) == 1


def test_fit_budget_sets_the_accelerators_accumulation(tiny_dirs, tmp_path):
    from studio.plan import fit_budget
    from studio.train import make_accelerator

    # checkpointing on, 8-bit AdamW asked (planned from its layout), full fine-tuning: a split batch is the saver
    config = _config(tiny_dirs["sd"], method="full", batch_size=2, gradient_checkpointing=True, optimizer="adamw8bit",
                     out=str(tmp_path))
    peak = Planner(config.base, device="cpu").predict(config).peak
    config.budget = f"{peak - 1}B"
    new, accelerator = fit_budget(config, make_accelerator(config), lambda text: None)
    assert (new.batch_size, new.grad_accum) == (1, 2) and accelerator.gradient_accumulation_steps == 2
    assert fit_budget(replace(config, budget=None), accelerator, print) == (replace(config, budget=None), accelerator)
