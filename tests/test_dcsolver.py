"""DC-Solver: equal to diffusers' UniPC at rho = 1, better than it on the analytic Gaussian test bed once
ratios are fitted, diffusers-native config handling, CPR against the authors' released coefficients."""
import json
import logging

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from pipelines.dcsolver import (DCDPMSolverScheduler, DCSolverScheduler, cpr_ratios, lagrange_compensate,
                                load_fitted)
from pipelines.gaussian_testbed import SD_SCHEDULER_CONFIG, gaussian_problem
from studio.dcsearch import (cpr_check_points, ddim_reference, final_error, fine_grid, fit_cpr, refine_ratios, sample,
                             search_ratios, validate_ratios, validated_range)

# The spec's reference setting (sampling.md 0.3): UniPC bh2, order 2, final sigma at t=0, no corrector after step 0.
SPEC_CONFIG = dict(SD_SCHEDULER_CONFIG, final_sigmas_type="sigma_min", disable_corrector=[0])

# sampling.md 1.5: the authors' SD2.1 CPR coefficients and the ratio vectors they give (CFG 7.5 unless noted).
SD21_CPR = [1523.67662, -1111.474645, 198.3834962, -1346.089002, 1007.194941, -186.2547577, 168.3973024,
            -128.0389489, 24.88478975, -8140.644019, 5906.748279, -1035.994112, 6941.413899, -5193.98066,
            950.3205653, -848.2104675, 650.6903333, -121.2867428, 13309.27038, -9616.670321, 1668.768596,
            -11037.10779, 8256.666686, -1503.799204, 1293.974044, -999.5629328, 188.2217041, -6747.421822,
            4853.153053, -835.5116793, 5489.115184, -4096.897218, 743.0953413, -619.5612763, 480.1497147,
            -90.89633129]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _noise(count, seed=1):
    return torch.randn(count, 2, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("steps", [5, 8])
def test_ratios_one_equal_unipc(prediction_type, guidance, steps):
    model = gaussian_problem(prediction_type=prediction_type)
    config = dict(SPEC_CONFIG, prediction_type=prediction_type)
    noise = _noise(6).float()
    reference = sample(UniPCMultistepScheduler.from_config(config), model.guided(guidance), noise, steps)
    ones = sample(DCSolverScheduler.from_config(config, dc_ratios=[1.0] * steps), model.guided(guidance), noise, steps)
    assert (ones - reference).abs().max() <= 1e-6
    compensated = sample(DCSolverScheduler.from_config(config, dc_ratios=[1.0, 1.0] + [1.2] * (steps - 2)),
                         model.guided(guidance), noise, steps)
    assert (compensated - reference).abs().max() > 1e-4  # the ratios do act


def test_dc_order_sets_the_first_compensated_step():
    """K + 1 buffered outputs are needed: with dc_order 2 the ratio of step 1 is inert, with dc_order 1 (linear
    interpolation over two outputs) step 1 is the first one compensated; step 0 never is."""
    model = gaussian_problem()
    noise = _noise(6).float()

    def run(order, ratios):
        return sample(DCSolverScheduler.from_config(SPEC_CONFIG, dc_order=order, dc_ratios=ratios),
                      model.guided(3.0), noise, 5)

    plain = run(2, [1.0] * 5)
    assert (run(2, [1.0, 1.3, 1.0, 1.0, 1.0]) - plain).abs().max() == 0
    assert (run(1, [1.7, 1.0, 1.0, 1.0, 1.0]) - plain).abs().max() <= 1e-6
    assert (run(1, [1.0, 1.3, 1.0, 1.0, 1.0]) - plain).abs().max() > 1e-4


def test_dpm_variant_with_ratios_one_equals_dpm_solver_pp():
    model = gaussian_problem()
    noise = _noise(6).float()
    reference = sample(DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG), model.guided(3.0), noise, 6)
    ones = sample(DCDPMSolverScheduler.from_config(SD_SCHEDULER_CONFIG), model.guided(3.0), noise, 6)
    assert (ones - reference).abs().max() <= 1e-6


def test_lagrange_is_exact_on_quadratics_and_rho_zero_gives_previous():
    times = [700.0, 500.0, 300.0]
    quad = [torch.tensor(2.0 + 0.01 * t - 3e-5 * t * t) for t in times]
    for rho in (0.0, 0.5, 1.0, 1.7):
        tau = times[1] + rho * (times[2] - times[1])
        assert lagrange_compensate(quad, times, tau).item() == pytest.approx(2.0 + 0.01 * tau - 3e-5 * tau * tau)
    assert lagrange_compensate(quad, times, times[1]).item() == pytest.approx(quad[1].item())


def test_unipc_error_on_gaussian_testbed_matches_spec():
    """sampling.md 0.3 measured ~2.1e-2 / 1.5e-2 / 9.0e-3 / 5.7e-3 (NFE 5/6/8/10, 10 samples, depends on the draw)."""
    model = gaussian_problem()
    noise = _noise(10)
    spec = {5: 2.1e-2, 6: 1.5e-2, 8: 9.0e-3, 10: 5.7e-3}
    errors = {}
    for steps, expected in spec.items():
        scheduler = UniPCMultistepScheduler.from_config(SPEC_CONFIG)
        out = sample(scheduler, model.guided(1.0), noise, steps)
        exact = model.solve(noise, scheduler.sigmas[0], scheduler.sigmas[-1])
        errors[steps] = ((out - exact) ** 2).mean().item()
        assert expected / 1.5 < errors[steps] < expected * 1.5, errors
    assert errors[5] > errors[6] > errors[8] > errors[10]


def test_exact_solution_matches_rk4_and_guided_ode_is_consistent():
    model = gaussian_problem()
    x = _noise(4)
    closed = model.solve(x, 14.6, 0.03)
    # guidance 1.0000001 takes the RK4 branch; it must agree with the closed form
    assert (model.solve(x, 14.6, 0.03, guidance=1.0000001) - closed).abs().max() < 1e-5
    # composing two legs equals one leg (the RK4 reference is path-consistent)
    two = model.solve(model.solve(x, 14.6, 1.0, 3.0), 1.0, 0.03, 3.0)
    assert (two - model.solve(x, 14.6, 0.03, 3.0)).abs().max() < 1e-6


@pytest.mark.parametrize("guidance,factor", [(1.0, 5.0), (3.0, 2.0)])
def test_fitted_ratios_lower_heldout_error_at_5_and_6_steps(guidance, factor):
    model = gaussian_problem()
    fit, held = _noise(10, seed=1), _noise(200, seed=2)
    for steps in (5, 6):
        scheduler = DCSolverScheduler.from_config(SPEC_CONFIG)
        scheduler.set_timesteps(steps)
        denoise = model.guided(guidance)
        targets = model.trajectory(fit, scheduler.sigmas, guidance)  # exact, at exactly the coarse sigmas
        found = search_ratios(scheduler, denoise, fit, targets)
        exact = model.solve(held, scheduler.sigmas[0], scheduler.sigmas[-1], guidance)
        plain = final_error(scheduler, denoise, held, exact, [1.0] * steps)
        fitted = final_error(scheduler, denoise, held, exact, found["ratios"])
        assert found["ratios"][:2] == [1.0, 1.0]
        assert fitted * factor < plain, (steps, plain, fitted, found["ratios"])


def test_validation_falls_back_to_one_where_a_ratio_hurts():
    model = gaussian_problem()
    noise = _noise(10)
    scheduler = DCSolverScheduler.from_config(SPEC_CONFIG)
    scheduler.set_timesteps(5)
    exact = model.solve(noise, scheduler.sigmas[0], scheduler.sigmas[-1])
    checked = validate_ratios(scheduler, model.guided(1.0), noise, exact, [1.0, 1.0, 1.0, 1.0, 5.0])
    assert checked["ratios"] == [1.0] * 5 and checked["mse_dc"] == pytest.approx(checked["mse_plain"])
    # fitted ratios that help, plus one harmful step: kept as a whole by default (the table beats rho = 1),
    # and per_step drops just the harmful step
    targets = model.trajectory(noise, scheduler.sigmas, 1.0)
    good = search_ratios(scheduler, model.guided(1.0), noise, targets)["ratios"]
    mixed = good[:3] + [1.6] + good[4:]
    whole = validate_ratios(scheduler, model.guided(1.0), noise, exact, mixed)
    assert whole["ratios"] == mixed and whole["mse_dc"] < whole["mse_plain"]
    stepwise = validate_ratios(scheduler, model.guided(1.0), noise, exact, mixed, per_step=True)
    assert stepwise["ratios"][3] == 1.0 and stepwise["mse_dc"] < whole["mse_dc"]


def test_reference_grid_contains_the_coarse_grid_and_targets_that_timestep():
    """The alignment bug we must not repeat: the target for t_{i+1} is the reference at exactly t_{i+1}."""
    model = gaussian_problem()
    scheduler = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)
    coarse = [int(t) for t in scheduler.timesteps]
    grid = fine_grid(999, coarse, 4)
    assert set(coarse) <= set(grid) and grid[0] == 999 and grid[-1] == 0
    assert max(a - b for a, b in zip(grid[:-1], grid[1:])) <= 4
    noise = _noise(10).float()
    reference = ddim_reference(model.guided(1.0), noise, fine_grid(999, coarse, 1), scheduler.alphas_cumprod,
                               "epsilon", "zero")
    for i, t in enumerate(coarse[1:], start=1):
        exact = model.solve(noise, scheduler.sigmas[0], scheduler.sigmas[i])
        off_by_one = model.solve(noise, scheduler.sigmas[0], model.noise_to_signal(t - 1))
        assert ((reference[t] - exact) ** 2).mean() < 0.25 * ((off_by_one - exact) ** 2).mean()
    final = model.solve(noise, scheduler.sigmas[0], 0.0)
    assert ((reference["final"] - final) ** 2).mean() < 1e-4


def test_cpr_reproduces_the_released_sd21_vectors():
    expected = {
        (5, 7.5): [1, 1, 1.0271, 0.7392, 1.2263],
        (6, 7.5): [1, 1, 1.0195, 0.9422, 0.7517, 1.2131],
        (8, 7.5): [1, 1, 0.6941, 1.0444, 1.0103, 0.8509, 0.8255, 1.1931],
        (10, 7.5): [1, 1, 0.4446, 0.8980, 1.0628, 1.0426, 0.9408, 0.8610, 0.9068, 1.1816],
        (6, 3.0): [1, 1, 1.0491, 0.9702, 0.8992, 1.3511],
        (5, 1.5): [1, 1, 0.9098, 1.1564, 1.3079],
    }
    for (steps, guidance), ratios in expected.items():
        assert cpr_ratios(SD21_CPR, steps, guidance, 2) == pytest.approx(ratios, abs=1e-4)
    scheduler = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG, cpr_coeffs=SD21_CPR, guidance_scale=7.5)
    scheduler.set_timesteps(5)
    assert scheduler.compensation_ratios == pytest.approx(expected[(5, 7.5)], abs=1e-4)


def test_cpr_fit_recovers_tables_generated_by_cpr():
    table = [{"steps": n, "guidance": g, "ratios": cpr_ratios(SD21_CPR, n, g, 2)}
             for n in (5, 6, 8, 10) for g in (1.5, 3.0, 7.5)]
    coeffs, error = fit_cpr(table, 2)
    assert error < 1e-6
    assert cpr_ratios(coeffs, 7, 5.0, 2) == pytest.approx(cpr_ratios(SD21_CPR, 7, 5.0, 2), abs=1e-3)


def test_cpr_with_dc_order_1_compensates_the_second_step():
    """K = 1 tables compensate step 2 (where most of the 5-step gain is); CPR used to pin it to 1."""
    shipped = [{"steps": 5, "guidance": 3.0, "ratios": [1.0, 1.34, 1.0, 0.96, 1.51]}]  # the K = 1 fit's entry
    coeffs, error = fit_cpr(shipped, 1)
    assert error < 1e-6 and cpr_ratios(coeffs, 5, 3.0, 1) == pytest.approx(shipped[0]["ratios"], abs=1e-6)
    table = [{"steps": n, "guidance": g, "ratios": cpr_ratios(SD21_CPR, n, g, 1)}
             for n in (5, 6, 8, 10) for g in (1.5, 3.0, 7.5)]
    coeffs, error = fit_cpr(table, 1)
    predicted = cpr_ratios(coeffs, 7, 5.0, 1)
    assert error < 1e-6 and predicted[0] == 1.0 and abs(predicted[1] - 1.0) > 0.1
    assert predicted == pytest.approx(cpr_ratios(SD21_CPR, 7, 5.0, 1), abs=1e-3)
    scheduler = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG, dc_order=1, cpr_coeffs=coeffs, guidance_scale=5.0)
    scheduler.set_timesteps(7)
    assert scheduler.compensation_ratios == pytest.approx(predicted)  # the scheduler hands CPR its own K


def test_ratio_sources_in_order_of_precedence():
    table = [{"steps": 5, "guidance": 2.0, "ratios": [1, 1, 1.1, 1.2, 1.3]}]
    scheduler = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG, dc_table=table, cpr_coeffs=SD21_CPR,
                                              guidance_scale=2.0)
    scheduler.set_timesteps(5)
    assert scheduler.compensation_ratios == [1, 1, 1.1, 1.2, 1.3]  # fitted table first
    scheduler.set_timesteps(6)
    assert scheduler.compensation_ratios == pytest.approx(cpr_ratios(SD21_CPR, 6, 2.0, 2))  # then CPR
    scheduler.set_timesteps(5, guidance_scale=7.5)  # coefficients given directly: no validated range to keep to
    assert scheduler.compensation_ratios == pytest.approx(cpr_ratios(SD21_CPR, 5, 7.5, 2))
    explicit = DCSolverScheduler.from_config(scheduler.config, dc_ratios=[1, 1, 0.9, 0.9, 0.9])
    explicit.set_timesteps(5)
    assert explicit.compensation_ratios == [1, 1, 0.9, 0.9, 0.9]  # explicit ratios win
    with pytest.raises(ValueError, match="dc_ratios has 5 values but sampling uses 6 steps"):
        explicit.set_timesteps(6)
    plain = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG)
    plain.set_timesteps(7)
    assert plain.compensation_ratios == [1.0] * 7


def test_from_sd_config_with_unknown_keys_and_round_trip(tmp_path):
    sd_ddim = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
               "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "leading",
               "skip_prk_steps": True, "some_future_key": 3}
    scheduler = DCSolverScheduler.from_config(sd_ddim, dc_ratios=[1, 1, 1.05, 0.95, 1.1], guidance_scale=4.0)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.timestep_spacing == "leading"
    scheduler.set_timesteps(5)  # unknown keys are ignored (diffusers keeps them as hidden config entries)
    assert len(scheduler.timesteps) == 5 and scheduler.compensation_ratios == [1, 1, 1.05, 0.95, 1.1]
    scheduler.save_config(tmp_path)
    again = DCSolverScheduler.from_pretrained(tmp_path)
    assert again.config.dc_ratios == [1, 1, 1.05, 0.95, 1.1] and again.config.guidance_scale == 4.0
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["dc_order"] == 2
    assert isinstance(UniPCMultistepScheduler.from_config(again.config), UniPCMultistepScheduler)
    with pytest.raises(ValueError, match="solver_p"):
        DCSolverScheduler(solver_p=UniPCMultistepScheduler())


def test_set_timesteps_resets_all_state():
    model = gaussian_problem()
    noise = _noise(4).float()
    scheduler = DCSolverScheduler.from_config(SPEC_CONFIG, dc_table=[
        {"steps": 6, "guidance": 3.0, "ratios": [1, 1, 1.1, 0.9, 1.2, 1.4]}], guidance_scale=3.0)
    first = sample(scheduler, model.guided(3.0), noise, 6)
    sample(scheduler, model.guided(3.0), noise * 0.5, 9)  # a different run in between
    second = sample(scheduler, model.guided(3.0), noise, 6)
    assert torch.equal(first, second)
    assert scheduler.step_index == 6 and len(scheduler._dc_history) == 3
    scheduler.set_timesteps(6)
    assert scheduler.step_index is None and scheduler._dc_history == [] and scheduler.last_sample is None


def test_load_fitted_file(tmp_path):
    path = tmp_path / "dc_solver.json"
    path.write_text(json.dumps({"table": [{"steps": 5, "guidance": 2, "ratios": [1, 1, 1.2, 1, 1]}],
                                "cpr_coeffs": [0.0] * 36, "default_guidance": 2.0}))
    overrides = load_fitted(path)
    scheduler = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG, **overrides)
    scheduler.set_timesteps(5)
    assert scheduler.compensation_ratios == [1, 1, 1.2, 1, 1]


def test_refine_sweep_lowers_the_final_error_it_targets():
    model = gaussian_problem()
    fit = _noise(10, seed=1)
    scheduler = DCSolverScheduler.from_config(SPEC_CONFIG)
    scheduler.set_timesteps(6)
    targets = model.trajectory(fit, scheduler.sigmas, 3.0)
    greedy = search_ratios(scheduler, model.guided(3.0), fit, targets)["ratios"]
    refined = refine_ratios(scheduler, model.guided(3.0), fit, targets[-1], greedy)
    before = final_error(scheduler, model.guided(3.0), fit, targets[-1], greedy)
    assert final_error(scheduler, model.guided(3.0), fit, targets[-1], refined) <= before


def test_dpm_reference_is_aligned_and_accurate():
    from diffusers import UniPCMultistepScheduler as U

    from studio.dcsearch import references_for

    model = gaussian_problem()
    noise = _noise(8).float()
    scheduler = U.from_config(SD_SCHEDULER_CONFIG)
    refs = references_for(model.guided(1.0), noise, scheduler, [5, 6], 60)
    for steps in (5, 6):
        scheduler.set_timesteps(steps)
        for i, state in enumerate(refs[steps]):
            exact = model.solve(noise, scheduler.sigmas[0], scheduler.sigmas[i])
            # the final step of any reference is D(x, t=1): exact up to ~sigma(1)^2 (a few 1e-6 here)
            assert ((state - exact) ** 2).mean() < (1e-5 if i == steps else 1e-7), (steps, i)


def test_fitted_file_carries_its_grid_and_is_ignored_for_another_schedule(tmp_path):
    from pipelines.dcsolver import fits, scheduler_fingerprint

    path = tmp_path / "dc_solver.json"
    path.write_text(json.dumps({"table": [{"steps": 5, "guidance": 3, "ratios": [1, 1, 0.9, 1, 1]}],
                                "scheduler_overrides": {"timestep_spacing": "leading", "steps_offset": 1},
                                "scheduler_fingerprint": scheduler_fingerprint(SD_SCHEDULER_CONFIG)}))
    scheduler = DCSolverScheduler.from_config(SD_SCHEDULER_CONFIG, **load_fitted(path), guidance_scale=3)
    scheduler.set_timesteps(5)
    assert scheduler.config.timestep_spacing == "leading" and int(scheduler.timesteps[0]) == 831
    assert scheduler.compensation_ratios == [1, 1, 0.9, 1, 1]
    assert fits(path, SD_SCHEDULER_CONFIG)
    assert not fits(path, dict(SD_SCHEDULER_CONFIG, beta_schedule="squaredcos_cap_v2"))


def _write_fitted(path, **fields):
    """A dc-search file fitted at (5 steps, CFG 2) and (8 steps, CFG 3) with K = 1, CPR included."""
    table = [{"steps": 5, "guidance": 2.0, "ratios": [1, 1.2, 1.1, 0.9, 1.3]},
             {"steps": 8, "guidance": 3.0, "ratios": [1, 1.1, 1, 1, 0.9, 1, 1, 1.2]}]
    path.write_text(json.dumps({"table": table, "cpr_coeffs": SD21_CPR, "default_guidance": 2.0,
                                "scheduler_overrides": {"dc_order": 1}, **fields}))
    return path


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "pipelines.dcsolver"]


def test_fitted_file_outside_its_validated_range_is_unipc_with_one_warning(tmp_path, caplog):
    path = _write_fitted(tmp_path / "dc_solver.json", validated={"steps": [5, 8], "guidance": [2, 3], "cpr": True})
    scheduler = DCSolverScheduler.from_config(SPEC_CONFIG, **load_fitted(path))
    scheduler.set_timesteps(6, guidance_scale=2.5)  # inside the box, off the table: CPR, with K = 1
    assert scheduler.compensation_ratios == pytest.approx(cpr_ratios(SD21_CPR, 6, 2.5, 1))
    assert scheduler.ratio_source == "cpr" and not _warnings(caplog)
    model, noise = gaussian_problem(), _noise(6).float()
    unipc = UniPCMultistepScheduler.from_config(SPEC_CONFIG)
    for steps in (6, 10):  # outside the box (CFG 7.5): ratios 1, exactly UniPC; warned once, not per run
        out = sample(scheduler, model.guided(7.5), noise, steps, guidance_scale=7.5)
        assert scheduler.compensation_ratios == [1.0] * steps and scheduler.ratio_source == "unvalidated"
        assert torch.equal(out, sample(unipc, model.guided(7.5), noise, steps))
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "6 steps at CFG 7.5" in warnings[0] and "steps 5-8, CFG 2-3" in warnings[0]
    assert "studio dc-search" in warnings[0]
    scheduler.set_timesteps(8, guidance_scale=3.0)  # table entries hold as before
    assert scheduler.compensation_ratios == [1, 1.1, 1, 1, 0.9, 1, 1, 1.2]
    explicit = DCSolverScheduler.from_config(scheduler.config, dc_ratios=[1, 1.3, 1, 1, 1, 1])
    explicit.set_timesteps(6, guidance_scale=7.5)  # explicit ratios are always honoured
    assert explicit.compensation_ratios == [1, 1.3, 1, 1, 1, 1] and len(_warnings(caplog)) == 1


def test_old_fitted_file_without_a_validated_range_keeps_to_its_table(tmp_path, caplog):
    """Files written before dc-search checked CPR: their table points are the validated range, CPR unchecked."""
    overrides = load_fitted(_write_fitted(tmp_path / "dc_solver.json"))
    assert overrides["dc_validated"] == {"steps": [5, 8], "guidance": [2.0, 3.0], "cpr": False}
    scheduler = DCSolverScheduler.from_config(SPEC_CONFIG, **overrides)
    scheduler.set_timesteps(5)  # the file's default guidance, 2
    assert scheduler.compensation_ratios == [1, 1.2, 1.1, 0.9, 1.3] and not _warnings(caplog)
    scheduler.set_timesteps(6, guidance_scale=2.5)  # inside the table's box, but CPR was never checked
    assert scheduler.compensation_ratios == [1.0] * 6
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "table points only" in warnings[0]


def test_validated_range_is_the_largest_box_where_cpr_never_lost():
    steps, guidances = [5, 6, 8, 10], [1.0, 2.0, 3.0, 4.0]
    points = cpr_check_points(steps, guidances)
    assert len(points) == 16 + 9 and (7, 2.5) in points and (9, 3.5) in points and (5, 1.5) in points

    def checks(lost):
        return [{"steps": s, "guidance": g, "heldout_mse_plain": 1.0, "heldout_mse_cpr": 2.0 if (s, g) in lost else 0.9}
                for s, g in points]

    assert validated_range(steps, guidances, checks([])) == {"steps": [5, 10], "guidance": [1.0, 4.0], "cpr": True}
    assert validated_range(steps, guidances, checks([(7, 3.5), (9, 3.5)])) == {
        "steps": [5, 10], "guidance": [1.0, 3.0], "cpr": True}
    assert validated_range(steps, guidances, checks(points)) == {"steps": [5, 10], "guidance": [1.0, 4.0], "cpr": False}
    assert cpr_check_points([5], [1.0, 3.0]) == [(5, 1.0), (5, 2.0), (5, 3.0)]


def test_converged_reference_is_the_exact_ode_solution_and_two_solvers_agree():
    from studio.dcsearch import converged_reference

    model = gaussian_problem()
    noise = _noise(6).float()
    reference = converged_reference(model.guided(1.0), noise, SD_SCHEDULER_CONFIG, check_steps=200)
    sd = UniPCMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)
    sigmas = ((1 - sd.alphas_cumprod) / sd.alphas_cumprod).sqrt()
    exact = model.solve(noise.double(), float(sigmas[999]), 0.0)  # the ODE run to the clean end
    # DDIM ends with D(x, t = 0): the clean end up to ~sigma(0)^2
    assert reference["top"] == 999
    assert ((reference["final"].double() - exact) ** 2).mean() < 1e-5
    assert ((reference["check"].double() - exact) ** 2).mean() < 3e-5  # DPM-Solver++, 200 steps: the same answer
