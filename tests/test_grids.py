"""The refined timestep grid (pipelines/grids.py): its shape, its σ, diffusers' behaviour kept where it is not asked
for, and convergence to the exact ODE solution on the analytic Gaussian test bed."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from pipelines.dcsolver import DCSolverScheduler
from pipelines.gaussian_testbed import SD_SCHEDULER_CONFIG, gaussian_problem
from pipelines.grids import (RefinedDPMSolverScheduler, RefinedUniPCScheduler, refined_timesteps, sampling_top,
                             start_at_top, stock_config)
from pipelines.loading import EMBEDDED_SOURCES
from studio.dcsearch import sample

EMBEDDED_CONFIG = json.loads((EMBEDDED_SOURCES["embedded"] / "scheduler" / "scheduler_config.json").read_text())


def _sigma(abar, t):
    return float(((1 - abar[t]) / abar[t]).sqrt())


def test_usable_top_ends_a_capped_cosine_schedule_where_x0_still_means_something():
    assert start_at_top(SD_SCHEDULER_CONFIG) == {}  # SD's schedule: t = 999 has λ = -2.7, usable
    sd = UniPCMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)
    assert sampling_top(sd.alphas_cumprod) == 999
    full = UniPCMultistepScheduler.from_config(EMBEDDED_CONFIG)
    assert float(full.alphas_cumprod[999]) < 1e-8  # the cap: α_999 = 4.9e-5
    clipped = UniPCMultistepScheduler.from_config(EMBEDDED_CONFIG, **start_at_top(EMBEDDED_CONFIG),
                                                  timestep_spacing="trailing", steps_offset=0)
    assert clipped.config.num_train_timesteps == 996
    assert torch.equal(clipped.alphas_cumprod, full.alphas_cumprod[:996])  # the same schedule, only shorter
    clipped.set_timesteps(5)
    assert int(clipped.timesteps[0]) == 995 == sampling_top(full.alphas_cumprod)


@pytest.mark.parametrize("config", [EMBEDDED_CONFIG, SD_SCHEDULER_CONFIG], ids=["capped-cosine", "sd"])
def test_refined_grid_starts_at_the_usable_top_with_exactly_the_asked_steps(config):
    abar = UniPCMultistepScheduler.from_config(config).alphas_cumprod
    top = sampling_top(abar)
    for steps in (1, 2, 3, 4, 5, 6, 8, 10, 25, 30, 50, 100, 400):
        grid = refined_timesteps(abar, steps)
        assert len(grid) == steps and grid[0] == top and grid[-1] >= 0
        assert all(a > b for a, b in zip(grid[:-1], grid[1:])), grid  # distinct, descending integers
        if steps <= 100:  # no unit steps in the top tenth, where 1/α amplifies x̂0's error
            assert all(a - b >= 5 for a, b in zip(grid[:-1], grid[1:]) if a > 0.9 * top), grid
    assert refined_timesteps(abar, 5)[-1] == round(top / 20)  # few steps stop short of t = 0 (then step to σ = 0)
    with pytest.raises(ValueError, match="positive"):
        refined_timesteps(abar, 0)


def test_refined_scheduler_steps_with_the_schedules_own_sigma_at_each_timestep():
    scheduler = RefinedUniPCScheduler.from_config(EMBEDDED_CONFIG, timestep_spacing="refined")
    scheduler.set_timesteps(8)
    grid = refined_timesteps(scheduler.alphas_cumprod, 8)
    assert scheduler.timesteps.tolist() == grid and scheduler.num_inference_steps == 8
    abar = scheduler.alphas_cumprod.double()
    assert scheduler.sigmas[:-1].tolist() == pytest.approx([_sigma(abar, t) for t in grid], rel=1e-6)
    assert float(scheduler.sigmas[-1]) == 0.0
    assert scheduler.config.timestep_spacing == "refined"  # restored after building the state
    scheduler.set_timesteps(timesteps=[900, 500, 100])  # any explicit grid
    assert scheduler.timesteps.tolist() == [900, 500, 100]
    assert float(scheduler.sigmas[1]) == pytest.approx(_sigma(abar, 500), rel=1e-6)
    for bad in ([100, 500], [1000, 10], [5, 5, 1], []):
        with pytest.raises(ValueError, match="descending"):
            scheduler.set_timesteps(timesteps=bad)


def test_without_refined_spacing_the_schedulers_are_diffusers_own():
    model = gaussian_problem()
    noise = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stock, ours = UniPCMultistepScheduler.from_config(SD_SCHEDULER_CONFIG), \
        RefinedUniPCScheduler.from_config(SD_SCHEDULER_CONFIG)
    for steps in (5, 12):
        stock.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert torch.equal(stock.timesteps, ours.timesteps) and torch.equal(stock.sigmas, ours.sigmas)
        assert torch.equal(sample(stock, model.guided(2.0), noise, steps), sample(ours, model.guided(2.0), noise, steps))


def test_dc_solver_with_unit_ratios_on_the_refined_grid_is_refined_unipc():
    model = gaussian_problem(alphas_cumprod=UniPCMultistepScheduler.from_config(EMBEDDED_CONFIG).alphas_cumprod)
    noise = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unipc = RefinedUniPCScheduler.from_config(EMBEDDED_CONFIG, timestep_spacing="refined")
    dc = DCSolverScheduler.from_config(EMBEDDED_CONFIG, timestep_spacing="refined", dc_ratios=[1.0] * 10)
    assert torch.equal(sample(unipc, model.guided(3.0), noise, 10), sample(dc, model.guided(3.0), noise, 10))
    dc.set_timesteps(10)
    assert dc.timesteps.tolist() == refined_timesteps(dc.alphas_cumprod, 10)


def test_refined_grid_converges_to_the_exact_sample_where_leading_spacing_cannot():
    """The exact PF-ODE solution from the usable T (what the model draws from that noise): the refined grid reaches
    it as steps grow (measured 3.1e-6 at 30 steps, 1.9e-8 at 60); `leading` spacing, which starts below T, stays
    ~6e-4 away however many steps it takes."""
    stock = UniPCMultistepScheduler.from_config(EMBEDDED_CONFIG)
    model = gaussian_problem(alphas_cumprod=stock.alphas_cumprod)
    noise = torch.randn(10, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    top = sampling_top(stock.alphas_cumprod)
    exact = model.solve(noise, _sigma(stock.alphas_cumprod.double(), top), 0.0)
    error = {}
    for steps in (10, 30, 60):
        refined = RefinedUniPCScheduler.from_config(EMBEDDED_CONFIG, timestep_spacing="refined")
        error[steps] = float(((sample(refined, model.guided(1.0), noise, steps) - exact) ** 2).mean())
        leading = float(((sample(UniPCMultistepScheduler.from_config(EMBEDDED_CONFIG), model.guided(1.0), noise, steps)
                          - exact) ** 2).mean())
        assert error[steps] < leading
    assert error[10] > error[30] > error[60] and error[60] < 1e-6 < 1e-4 < leading


def test_dpm_solver_takes_the_refined_grid_and_stock_classes_start_at_the_top():
    dpm = RefinedDPMSolverScheduler.from_config(EMBEDDED_CONFIG, timestep_spacing="refined")
    dpm.set_timesteps(6)
    assert dpm.timesteps.tolist() == refined_timesteps(dpm.alphas_cumprod, 6)
    config = {**EMBEDDED_CONFIG, "timestep_spacing": "refined"}
    ddim = DDIMScheduler.from_config(stock_config(config))  # DDIM cannot take "refined": trailing from T instead
    ddim.set_timesteps(5)
    assert int(ddim.timesteps[0]) == 995 and stock_config(EMBEDDED_CONFIG) == EMBEDDED_CONFIG


def test_embedded_models_sample_on_the_refined_grid_and_their_folders_stay_plain_diffusers():
    from diffusers import DiffusionPipeline

    from pipelines import load_pipeline

    pipe = load_pipeline("embedded")
    assert isinstance(pipe.scheduler, RefinedUniPCScheduler) and pipe.scheduler.config.timestep_spacing == "refined"
    pipe.scheduler.set_timesteps(30)
    assert int(pipe.scheduler.timesteps[0]) == 995
    plain = DiffusionPipeline.from_pretrained(EMBEDDED_SOURCES["embedded"], text_encoder=pipe.text_encoder,
                                              tokenizer=pipe.tokenizer)
    assert type(plain.scheduler) is UniPCMultistepScheduler  # the folder's own config, untouched
