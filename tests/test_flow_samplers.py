"""Samplers on flow-matching models (SD3, Flux): UniPC / DPM-Solver++ in diffusers' flow mode with exact timesteps,
and DC-Solver for flow matching (no published version exists), checked against the exact solution of the flow ODE
on the analytic Gaussian test bed and run end to end on tiny SD3 and Flux pipelines."""
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from pipelines.dcsolver import DCSolverScheduler
from pipelines.gaussian_testbed import SD3_SCHEDULER_CONFIG, flow_gaussian_problem
from pipelines.grids import RefinedUniPCScheduler, flow_solver_config, is_flow_config
from studio.dcsearch import mse, references_for, sample, search_ratios, validate_ratios

FLOW = flow_solver_config(SD3_SCHEDULER_CONFIG)


def _noise(n, seed=0):
    return torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_flow_config_keeps_the_models_shift_and_predicts_velocity():
    assert is_flow_config(SD3_SCHEDULER_CONFIG) and is_flow_config(FLOW)
    assert not is_flow_config(UniPCMultistepScheduler().config)
    assert FLOW["use_flow_sigmas"] and FLOW["prediction_type"] == "flow_prediction" and FLOW["flow_shift"] == 3.0
    assert "shift" not in FLOW and flow_solver_config(FLOW) == FLOW


def test_flow_timesteps_are_the_exact_sigmas_the_solver_steps_with():
    """diffusers casts flow timesteps σ·1000 to integers (the model is then called below the σ the solver uses)."""
    stock = UniPCMultistepScheduler.from_config(FLOW)
    ours = RefinedUniPCScheduler.from_config(FLOW)
    stock.set_timesteps(10)
    ours.set_timesteps(10)
    assert torch.equal(stock.sigmas, ours.sigmas)
    assert ours.timesteps.dtype == torch.float32
    assert ours.timesteps.tolist() == pytest.approx((ours.sigmas[:-1].double() * 1000).tolist(), rel=1e-6)
    assert stock.timesteps.tolist() != pytest.approx(ours.timesteps.tolist(), abs=1e-3)  # truncated


def test_unipc_flow_mode_converges_to_the_exact_flow_solution():
    model, noise = flow_gaussian_problem(), _noise(8)
    errors = {}
    for steps in (10, 30, 100):
        ours = RefinedUniPCScheduler.from_config(FLOW)
        ours.set_timesteps(steps)
        exact = model.solve(noise, float(ours.sigmas[0]), 0.0, 3.0)
        errors[steps] = mse(sample(ours, model.guided(3.0), noise, steps), exact)
        if steps == 100:
            stock = mse(sample(UniPCMultistepScheduler.from_config(FLOW), model.guided(3.0), noise, steps), exact)
            assert errors[100] < stock / 2  # exact timesteps matter once the solver is this close
    assert errors[10] > errors[30] > errors[100] and errors[100] < 2e-6


def test_flow_dc_solver_with_unit_ratios_is_unipc_and_its_search_beats_it_held_out():
    model = flow_gaussian_problem()
    noise = _noise(20)
    unipc = RefinedUniPCScheduler.from_config(FLOW)
    dc = DCSolverScheduler.from_config(FLOW, dc_order=1, dc_ratios=[1.0] * 5)
    assert torch.equal(sample(unipc, model.guided(3.0), noise, 5), sample(dc, model.guided(3.0), noise, 5))

    dc = DCSolverScheduler.from_config(FLOW, dc_order=1)
    reference = references_for(model.guided(3.0), noise, dc, [5], 100)[5]
    dc.set_timesteps(5)
    exact = model.solve(noise, float(dc.sigmas[0]), 0.0, 3.0)
    assert mse(reference[-1], exact) < 1e-6  # the fine flow reference is the converged sample
    found = search_ratios(dc, model.guided(3.0), noise[:10], [r[:10] for r in reference])
    checked = validate_ratios(dc, model.guided(3.0), noise[10:], exact[10:], found["ratios"])
    assert checked["mse_dc"] < 0.85 * checked["mse_plain"]  # held-out noise, against the exact solution


@pytest.mark.parametrize("make", ["tiny_sd3_pipeline", "tiny_flux_pipeline"])
def test_flow_pipelines_take_the_solvers_and_the_dc_search(make, tmp_path):
    import pipelines.tiny as tiny
    from pipelines.text2image import GenerationError, make_scheduler
    from studio.dcsearch import run_search

    pipe = getattr(tiny, make)()
    pipe.set_progress_bar_config(disable=True)
    for name in ("unipc", "dpm++", "dc-solver", "euler"):
        make_scheduler(pipe, name, guidance=2.0)
        image = pipe("a bag", num_inference_steps=4, guidance_scale=2.0, height=32, width=32, output_type="pt",
                     max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(image).all()
    with pytest.raises(GenerationError, match="flow-matching"):
        make_scheduler(pipe, "ddim")
    if make == "tiny_sd3_pipeline":
        fitted = run_search(pipe, [4], [2.0], samples=2, reference_steps=8, default_guidance=2.0)
        assert fitted["scheduler_fingerprint"]["prediction_type"] == "flow_prediction"
        assert len(fitted["table"][0]["ratios"]) == 4


def test_a_size_dependent_shift_is_searched_at_the_native_sizes_grid():
    """Flux dev shifts σ by mu(image tokens); the search fixes the shift e^mu of the native size, which gives the
    very grid a generation at that size steps on."""
    from pipelines.families import family_of
    from pipelines.tiny import tiny_flux_pipeline
    from studio.dcsearch import search_config

    pipe = tiny_flux_pipeline()
    config = search_config(pipe)
    assert config["use_dynamic_shifting"] is False and config["flow_shift"] > 1
    family = family_of(pipe)
    at_native = DCSolverScheduler.from_config(flow_solver_config(pipe.scheduler.config))
    family.set_timesteps(at_native, 6, family.native_size(), family.native_size())
    searched = DCSolverScheduler.from_config(config)
    searched.set_timesteps(6)
    assert at_native.sigmas.tolist() == pytest.approx(searched.sigmas.tolist(), abs=1e-6)
