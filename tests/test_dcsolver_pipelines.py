"""DC-Solver on real diffusers pipelines (tiny UNet and DiT), the studio's scheduler registry, and dc-search."""
import json

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from pipelines.dcsolver import DCSolverScheduler


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _latents(pipe, scheduler, guidance, steps=6):
    pipe.scheduler = scheduler
    kwargs = {"use_resolution_binning": False, "clean_caption": False} if "PixArt" in type(pipe).__name__ else {}
    return pipe("a photo of a bag", num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_pipeline_with_ratios_one_equals_unipc_and_ratios_act(family):
    from pipelines.tiny import tiny_pixart_pipeline, tiny_sd_pipeline

    pipe = (tiny_sd_pipeline if family == "sd" else tiny_pixart_pipeline)()
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    for guidance in (1.0, 3.0):  # without and with classifier-free guidance
        unipc = _latents(pipe, UniPCMultistepScheduler.from_config(config), guidance)
        ones = _latents(pipe, DCSolverScheduler.from_config(config), guidance)
        assert (ones - unipc).abs().max() <= 1e-6
    moved = _latents(pipe, DCSolverScheduler.from_config(config, dc_ratios=[1, 1, 1.3, 1.3, 1.3, 1.3]), 3.0)
    assert torch.isfinite(moved).all() and (moved - unipc).abs().max() > 1e-5


def test_scheduler_registry_and_generate(tiny_sd_dir):
    from pipelines import load_pipeline
    from pipelines.text2image import SCHEDULERS, generate, make_scheduler

    assert "dc-solver" in SCHEDULERS
    pipe = load_pipeline(str(tiny_sd_dir), device="cpu")
    assert isinstance(make_scheduler(pipe, "dc-solver"), DCSolverScheduler)
    images = generate(pipe, "a photo of a bag", num_inference_steps=5, scheduler="dc-solver").images
    assert len(images) == 1


def test_dc_search_command_writes_ratios_the_scheduler_loads(tiny_pixart_dir, tmp_path, capsys):
    from pipelines import load_pipeline
    from studio.cli import main

    out = tmp_path / "dc_solver.json"
    code = main(["dc-search", "--base", str(tiny_pixart_dir), "--steps", "4,5", "--guidance", "1,2", "--samples", "2",
                 "--reference-steps", "20", "--validate", "converged", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert len(data["table"]) == 4 and len(data["cpr_coeffs"]) == 36
    order = data["scheduler_overrides"]["dc_order"]
    assert order == 1  # the search's default; the scheduler's own default stays the paper's 2
    for entry in data["table"]:
        assert len(entry["ratios"]) == entry["steps"] and entry["ratios"][:order] == [1.0] * order
        assert entry["heldout_mse_dc"] <= entry["heldout_mse_plain"] + 1e-12  # validation never makes it worse
    # CPR was checked against UniPC on the held-out seeds at the 4 grid points and inside the grid's one cell
    assert sorted((c["steps"], c["guidance"]) for c in data["cpr_check"]) == [(4, 1.0), (4, 1.5), (4, 2.0), (5, 1.0),
                                                                             (5, 2.0)]
    # a one-cell grid: the validated box is the whole grid, with CPR only if it never lost
    assert data["validated"] == {"steps": [4, 5], "guidance": [1.0, 2.0], "cpr": all(
        c["heldout_mse_cpr"] <= c["heldout_mse_plain"] for c in data["cpr_check"])}
    printed = capsys.readouterr().out
    assert "held-out MSE" in printed and "validated: steps 4-5, cfg 1-2" in printed
    # held out against the converged sample: UniPC's error there is its distance to DDIM through every timestep
    from studio.dcsearch import (converged_final, final_error, make_dc_scheduler, pipeline_denoiser, pipeline_noise,
                                 search_config)

    assert data["reference"]["heldout_target"] == "converged sample"
    pipe = load_pipeline(str(tiny_pixart_dir), device="cpu")
    entry = next(e for e in data["table"] if e["steps"] == 4 and e["guidance"] == 2.0)
    denoise = pipeline_denoiser(pipe, data["prompts"], 2.0)
    noise = pipeline_noise(pipe, data["heldout_seeds"])
    scheduler = make_dc_scheduler(search_config(pipe), "unipc", dc_order=order)
    target = converged_final(denoise, noise, scheduler.config)[0]
    assert final_error(scheduler, denoise, noise, target, [1.0] * 4) == pytest.approx(entry["heldout_mse_plain"], rel=1e-5)
    # a model folder carrying dc_solver.json gets its ratios through for_pipeline
    (tiny_pixart_dir / "dc_solver.json").write_text(out.read_text())
    try:
        pipe = load_pipeline(str(tiny_pixart_dir), device="cpu")
        scheduler = DCSolverScheduler.for_pipeline(pipe, guidance_scale=2.0)
        assert scheduler.config.dc_order == order
        scheduler.set_timesteps(5)
        assert scheduler.compensation_ratios == next(e["ratios"] for e in data["table"]
                                                     if e["steps"] == 5 and e["guidance"] == 2.0)
        # the generate door (`--scheduler dc-solver --guidance W`) picks this model's file at the run's guidance
        from pipelines.text2image import make_scheduler
        for guidance in (1.0, 2.0):
            make_scheduler(pipe, "dc-solver", guidance=guidance).set_timesteps(5)
            assert pipe.scheduler.config.guidance_scale == guidance
            assert pipe.scheduler.compensation_ratios == next(e["ratios"] for e in data["table"]
                                                              if e["steps"] == 5 and e["guidance"] == guidance)
        # the diffusers way: the scheduler folder of the model, the fit found beside it
        loaded = DCSolverScheduler.from_pretrained(tiny_pixart_dir, subfolder="scheduler", guidance_scale=2.0)
        loaded.set_timesteps(5)
        assert loaded.config.dc_order == order and loaded.ratio_source == "table"
        assert loaded.compensation_ratios == scheduler.compensation_ratios
        # far outside the fit (CFG 7.5): plain UniPC, not an extrapolated CPR
        outside = DCSolverScheduler.for_pipeline(pipe, guidance_scale=7.5)
        outside.set_timesteps(5)
        assert outside.compensation_ratios == [1.0] * 5 and outside.ratio_source == "unvalidated"
    finally:
        (tiny_pixart_dir / "dc_solver.json").unlink()


def test_shipped_fit_travels_with_the_folder_and_no_fit_says_so(tmp_path, caplog):
    """from_pretrained(model_folder, subfolder="scheduler") finds the folder's dc_solver.json; a saved DC-Solver
    config keeps its own ratios; a folder without a fit gives UniPC's samples and one warning saying so."""
    import logging

    from pipelines.assets import assets_dir
    from pipelines.dcsolver import load_fitted

    folder = assets_dir() / "embedded"
    shipped = load_fitted(folder / "dc_solver.json")
    scheduler = DCSolverScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.dc_table == shipped["dc_table"] and scheduler.config.dc_order == shipped["dc_order"]
    scheduler.set_timesteps(5, guidance_scale=3.0)
    assert scheduler.ratio_source == "table" and scheduler.compensation_ratios != [1.0] * 5
    scheduler.save_pretrained(tmp_path / "saved")  # the fit is in the config: it travels with a saved pipeline
    again = DCSolverScheduler.from_pretrained(tmp_path / "saved")
    assert again.config.dc_table == shipped["dc_table"]
    UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler").save_pretrained(tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="pipelines.dcsolver"):
        plain = DCSolverScheduler.from_pretrained(tmp_path / "plain")
        for _ in range(3):
            plain.set_timesteps(5)
    assert plain.compensation_ratios == [1.0] * 5 and plain.ratio_source == "ones"
    warnings = [r.getMessage() for r in caplog.records if "no fitted ratios" in r.getMessage()]
    assert len(warnings) == 1 and "studio dc-search" in warnings[0]


def test_dc_search_rejects_bad_input_with_one_line(capsys):
    from studio.cli import main

    assert main(["dc-search", "--steps", "5,x", "--out", "x.json"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps takes comma-separated numbers, got '5,x'"


def test_ratio_search_drives_every_family_flow_ones_too():
    """The search's model call is the family layer's: SDXL works as SD and PixArt do, and a flow model (SD3) gives
    the velocity its own pipeline steps with."""
    from pipelines.tiny import tiny_sd3_pipeline, tiny_sdxl_pipeline
    from studio.dcsearch import pipeline_denoiser, pipeline_noise

    for pipe in (tiny_sdxl_pipeline(), tiny_sd3_pipeline()):
        noise = pipeline_noise(pipe, [0, 1])
        out = pipeline_denoiser(pipe, ["a photo of a bag", "a coat"], 3.0)(noise, torch.tensor(500.0))
        assert out.shape == noise.shape and torch.isfinite(out).all()

