"""DC-Solver ratio search: fit compensation ratios against a fine reference trajectory, then fit the CPR.

The search drives the denoiser and the scheduler directly (no pipeline call), with prompt embeddings
computed once, so it works for UNet and DiT pipelines alike and on the analytic Gaussian test bed.

Alignment (the bug in the authors' diffusers script we must not repeat): the reference is a fine DDIM
run over a grid that *contains every coarse timestep*, so the target for the state at t_{i+1} is the
reference state at exactly t_{i+1}, for every i, and the final target is the reference's final output.

Per step i >= dc_order (greedy, as in the paper): a bounded 1-D Brent search on rho_i minimises the MSE
between the corrected state at t_{i+1} (predictor, one model call, UniC corrector) and the reference
there; the last step compares the final output. A derivative-free search needs no UNet backward, which
is what makes it cheap on a CPU. Optionally (on by default) one sweep of coordinate descent then tunes
each ratio against the final error, which the greedy match does not minimise. Ratios are validated on
held-out noise: a table that does not lower the held-out final error falls back to rho = 1. CPR, fitted on
the tables, is checked the same way at every grid point and at one point inside each grid cell; the file
records the (steps, guidance) box where it showed no loss, and the scheduler uses CPR only there.
"""
import copy
import itertools
import time

import numpy as np
import torch

from pipelines.dcsolver import (CPR_TERMS, DCDPMSolverScheduler, DCSolverScheduler, cpr_features, cpr_ratios,
                               lagrange_compensate, scheduler_fingerprint, table_range)
from pipelines.grids import sampling_top, solver_config


def grid_key(t) -> float:
    """A grid point's key in a reference: its timestep (an integer for ε/v models, σ·1000 for flow models)."""
    return round(float(t), 3)


def mse(a, b) -> float:
    return float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean())


# --------------------------------------------------------------------------------------------------
# sampling with any diffusers multistep scheduler, driven step by step


class Run:
    """A sampler part-way through a run: scheduler state, current state x, model output at x, step index."""

    def __init__(self, scheduler, denoise, noise):
        self.scheduler, self.denoise, self.i = scheduler, denoise, 0
        self.x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at x = noise
        self.out = denoise(self._scaled(self.x, scheduler.timesteps[0]), scheduler.timesteps[0])

    def _scaled(self, x, t):
        scale = getattr(self.scheduler, "scale_model_input", None)  # FlowMatchEuler has none
        return x if scale is None else scale(x, t)

    @property
    def done(self) -> bool:
        return self.i >= len(self.scheduler.timesteps)

    def advance(self):
        """One scheduler step, then the model call at the new state (none after the final step)."""
        timesteps = self.scheduler.timesteps
        self.x = self.scheduler.step(self.out, timesteps[self.i], self.x).prev_sample
        self.i += 1
        if not self.done:
            t = timesteps[self.i]
            self.out = self.denoise(self._scaled(self.x, t), t)
        return self

    def settled_state(self):
        """The state at the current timestep as the solver continues from it: after UniPC's corrector."""
        if self.done or not isinstance(self.scheduler, DCSolverScheduler):
            return self.x
        probe = copy.deepcopy(self.scheduler)
        probe.step(self.out, self.scheduler.timesteps[self.i], self.x)
        return probe.last_sample if probe.last_sample is not None else self.x

    def clone(self):
        twin = copy.copy(self)
        twin.scheduler = copy.deepcopy(self.scheduler)
        return twin

    def finish(self):
        while not self.done:
            self.advance()
        return self.x


def sample(scheduler, denoise, noise, steps: int, **set_kwargs):
    """Final output of an N-step run of `scheduler` from `noise` (set_timesteps resets the scheduler)."""
    scheduler.set_timesteps(steps, **set_kwargs)
    return Run(scheduler, denoise, noise).finish()


# --------------------------------------------------------------------------------------------------
# the fine reference trajectory


def fine_grid(start: int, coarse_timesteps, max_gap: int) -> list:
    """Descending integer timesteps from `start` to 0 that contain every coarse timestep, gaps <= max_gap, and a
    dense tail below t = 20: log-SNR changes fastest near t = 0 (on the Gaussian test bed this tail takes the
    reference's final error from 5e-4 to 4e-7 for SD's schedule)."""
    tail = {t for t in [*range(1, 11), 12, 14, 16, 18] if t < start}
    points = {int(start), 0} | {int(t) for t in coarse_timesteps if int(t) <= start} | tail
    anchors = sorted(points, reverse=True)
    grid = [anchors[0]]
    for a, b in zip(anchors[:-1], anchors[1:]):
        pieces = max(1, int(np.ceil((a - b) / max_gap)))
        grid += [int(round(a + (b - a) * k / pieces)) for k in range(1, pieces + 1)]
    return grid


def ddim_reference(denoise, noise, grid, alphas_cumprod, prediction_type: str, final_sigmas_type: str = "zero",
                   progress=None) -> dict:
    """Deterministic DDIM (eta 0) over `grid`, recording the state at every grid timestep.
    Returns {timestep: state, "final": output}; "final" is the clean prediction at t=0 for final_sigmas_type
    "zero" (what the coarse solvers output) and the t=0 state for "sigma_min"."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    x = noise.to(torch.float32)
    states = {grid[0]: x}

    def split(out, x, t):
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        out, xx = out.to(torch.float64), x.to(torch.float64)
        if prediction_type == "v_prediction":
            x0 = a * xx - s * out
            return x0, a * out + s * xx
        if prediction_type == "epsilon":
            return (xx - s * out) / a, out
        raise ValueError(f"the reference supports epsilon and v prediction, not '{prediction_type}'")

    for t, t_next in zip(grid[:-1], grid[1:]):
        x0, eps = split(denoise(x, torch.tensor(t)), x, t)
        x = (abar[t_next].sqrt() * x0 + (1 - abar[t_next]).sqrt() * eps).to(torch.float32)
        states[t_next] = x
        if progress is not None:
            progress(1)
    if final_sigmas_type == "zero":
        states["final"] = split(denoise(x, torch.tensor(grid[-1])), x, grid[-1])[0].to(torch.float32)
    else:
        states["final"] = x
    return states


def solver_reference(denoise, noise, grid, config, progress=None) -> dict:
    """DPM-Solver++(2M) over the fine grid (timesteps > 0), recording the state at every grid timestep; its
    final step goes to the coarse solvers' own final sigma. On the Gaussian test bed ~100 such steps come
    about as close to the exact ODE solution as 999 DDIM steps, at a tenth of the model calls."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, euler_at_final=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
        final_sigmas_type=config.get("final_sigmas_type", "zero"))
    scheduler.set_timesteps(timesteps=[t for t in grid if t > 0])
    run = Run(scheduler, denoise, noise.to(torch.float32))
    states = {}
    while not run.done:
        states[grid_key(scheduler.timesteps[run.i])] = run.x
        run.advance()
        if progress is not None:
            progress(1)
    states["final"] = run.x
    return states


def fine_flow_grid(coarse_timesteps, max_gap: float, num_train_timesteps: int = 1000) -> list:
    """Descending flow timesteps (σ·1000) from the first coarse one down to σ = 1e-4 that contain every coarse
    timestep, with gaps <= max_gap and a geometric tail (ratio 1.25) below the first gap: the coarse solvers' last
    step goes from their lowest σ to 0, which the reference resolves."""
    anchors = sorted({float(t) for t in coarse_timesteps} | {0.0}, reverse=True)
    grid = [anchors[0]]
    for a, b in zip(anchors[:-1], anchors[1:]):
        pieces = max(1, int(np.ceil((a - b) / max_gap)))
        grid += [a + (b - a) * k / pieces for k in range(1, pieces)] + [b]
    grid.pop()  # σ = 0: the tail below replaces the last linear piece
    low = 1e-4 * num_train_timesteps
    pieces = max(1, int(np.ceil(np.log(grid[-1] / low) / np.log(1.25))))
    return grid + [float(v) for v in np.geomspace(grid[-1], low, pieces + 1)[1:]]


def flow_reference(denoise, noise, grid, config, progress=None) -> dict:
    """The flow analogue of solver_reference: UniPC's flow mode (the DC-Solver's own predictor-corrector, which
    DPM-Solver++ cannot take an explicit σ grid in) over the fine `grid` of σ·1000, already shifted, ending at σ = 0."""
    from pipelines.grids import RefinedUniPCScheduler

    config = {**dict(config), "flow_shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None,
              "final_sigmas_type": "zero"}
    config = {k: v for k, v in config.items() if not k.startswith(("dc_", "cpr_")) and k != "guidance_scale"}
    scheduler = RefinedUniPCScheduler.from_config(config)
    n = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(sigmas=np.array([float(t) / n for t in grid]))
    run = Run(scheduler, denoise, noise.to(torch.float32))
    states = {}
    for t in grid:  # keyed by the asked grid point: the scheduler's float32 σ·1000 is within 1e-4 of it
        states[grid_key(t)] = run.x
        run.advance()
        if progress is not None:
            progress(1)
    states["final"] = run.x
    return states


def converged_reference(denoise, noise, config, check_steps: int = 400, progress=None) -> dict:
    """What the model really draws from `noise`: deterministic DDIM through every training timestep from the usable T
    (sampling_top) to 0, independent of any coarse grid. Convergence is shown by a second, different solver
    (DPM-Solver++(2M), about check_steps steps over the same range) landing on the same sample. -> {"final": DDIM's final
    latent, "check": DPM-Solver++'s, "top": T}."""
    ddim, top = converged_final(denoise, noise, config, progress)
    grid = fine_grid(top, [], max(1, int(np.ceil(top / check_steps))))  # with its dense tail near t = 0
    check = solver_reference(denoise, noise, grid, {**dict(config), "final_sigmas_type": "zero"}, progress)["final"]
    return {"final": ddim, "check": check, "top": top}


def converged_final(denoise, noise, config, progress=None) -> tuple:
    """(DDIM's final latent through every training timestep from the usable T, that T): converged_reference without
    the second solver's check."""
    from diffusers import DDIMScheduler

    betas = DDIMScheduler.from_config(config).betas
    abar = torch.cumprod(1 - betas.double(), 0)
    top = sampling_top(abar)
    final = ddim_reference(denoise, noise, list(range(top, -1, -1)), abar, config.get("prediction_type", "epsilon"),
                           "zero", progress)["final"]
    return final, top


def targets_for(scheduler, reference: dict) -> list:
    """Reference states aligned to the scheduler's grid: [x(t_0), ..., x(t_{N-1}), final]."""
    return [reference[grid_key(t)] for t in scheduler.timesteps] + [reference["final"]]


# --------------------------------------------------------------------------------------------------
# the search


def _brent(loss, bounds, xatol):
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": xatol, "maxiter": 40})
    return float(result.x), float(result.fun)


def _quadratic_in_rho(values, probes):
    """A stand-in for f(rho) through f at three probe ratios (Lagrange, like the compensation itself)."""
    return lambda rho: lagrange_compensate(values, list(probes), float(rho))


def search_ratios(scheduler, denoise, noise, targets, bounds=(0.0, 2.0), xatol=2e-3, probes=(0.5, 1.0, 1.5),
                  progress=None) -> dict:
    """Greedy per-step ratios for the N-step grid the scheduler was set to (set_timesteps already called).
    targets: the aligned reference [x(t_0), ..., x(t_{N-1}), final]. Returns ratios and per-step losses.

    The predicted state x_{i+1} is exactly quadratic in rho (so is the compensated output), so the model
    output there is nearly so: three model calls at probe ratios give a quadratic stand-in that Brent
    minimises for free, and one more call checks the chosen ratio (4 calls per step instead of ~20)."""
    steps = len(scheduler.timesteps)
    scheduler.compensation_ratios = [1.0] * steps
    run = Run(scheduler, denoise, noise)
    losses = []

    def trial_loss(i, rho, model=None):
        trial = run.clone()
        trial.scheduler.compensation_ratios[i] = float(rho)
        if model is not None:
            trial.denoise = lambda x, t: model(rho)
        return mse(trial.advance().settled_state(), targets[i + 1]), trial

    while not run.done:
        i = run.i
        if i >= scheduler.config.dc_order:
            if i == steps - 1:  # the last step calls no model: search the real loss
                rho, best = _brent(lambda r: trial_loss(i, r)[0], bounds, xatol)
                plain = trial_loss(i, 1.0)[0]
            else:
                outputs = [trial_loss(i, p)[1].out for p in probes]
                model = _quadratic_in_rho(outputs, probes)
                rho, _ = _brent(lambda r: trial_loss(i, r, model)[0], bounds, xatol)
                best = trial_loss(i, rho)[0]  # the real loss at the chosen ratio
                plain = trial_loss(i, 1.0, model)[0] if 1.0 in probes else trial_loss(i, 1.0)[0]
            if plain <= best:  # never accept a ratio that is worse than none
                rho, best = 1.0, plain
            scheduler.compensation_ratios[i] = rho
            losses.append({"step": i, "ratio": rho, "loss": best, "loss_plain": plain})
            if progress is not None:
                progress(1)
        run.advance()
    return {"ratios": list(scheduler.compensation_ratios), "steps": losses}


def refine_ratios(scheduler, denoise, noise, final_target, ratios, bounds=(0.0, 2.0), xatol=2e-3, spread=0.25,
                  progress=None) -> list:
    """One sweep of coordinate descent on the *final* error, from the greedy ratios (an option beyond the
    paper: greedy per-step matching is not the final-error objective). Per step, the final output is
    probed at three ratios around the current one (rerunning only the rest of the trajectory), a
    quadratic stand-in is minimised, and one more run checks the choice."""
    scheduler.set_timesteps(len(ratios))
    scheduler.compensation_ratios = [float(r) for r in ratios]
    run = Run(scheduler, denoise, noise)

    def finish_with(i, rho):
        trial = run.clone()
        trial.scheduler.compensation_ratios[i] = float(rho)
        return trial.finish()

    while not run.done:
        i = run.i
        if i >= scheduler.config.dc_order:
            current = scheduler.compensation_ratios[i]
            probes = [current - spread, current, current + spread]
            finals = [finish_with(i, p) for p in probes]
            model = _quadratic_in_rho(finals, probes)
            rho, _ = _brent(lambda r: mse(model(r), final_target), bounds, xatol)
            if mse(finish_with(i, rho), final_target) < mse(finals[1], final_target):
                scheduler.compensation_ratios[i] = rho
            if progress is not None:
                progress(1)
        run.advance()
    return list(scheduler.compensation_ratios)


def final_error(scheduler, denoise, noise, final_target, ratios) -> float:
    scheduler.set_timesteps(len(ratios))
    scheduler.compensation_ratios = [float(r) for r in ratios]
    return mse(Run(scheduler, denoise, noise).finish(), final_target)


def validate_ratios(scheduler, denoise, noise, final_target, ratios, per_step: bool = False) -> dict:
    """On held-out noise: keep the fitted ratios only if they beat rho = 1 there (else all ones).
    per_step: also fall back to rho = 1, step by step, wherever that lowers the held-out error (each check reruns
    only the rest of the trajectory). Off by default: with ~10 held-out samples whose errors are heavy-tailed
    these per-step decisions follow the noise (on the embedded model it reverted the one step that cuts the
    5-step error by 16% on 90 fresh seeds)."""
    ratios = [float(r) for r in ratios]
    plain = final_error(scheduler, denoise, noise, final_target, [1.0] * len(ratios))
    best = final_error(scheduler, denoise, noise, final_target, ratios)
    scheduler.set_timesteps(len(ratios))
    scheduler.compensation_ratios = list(ratios)
    run = Run(scheduler, denoise, noise)
    while per_step and not run.done:
        i = run.i
        if ratios[i] != 1.0:
            trial = run.clone()
            trial.scheduler.compensation_ratios[i] = 1.0
            error = mse(trial.finish(), final_target)
            if error < best:
                ratios[i], best = 1.0, error
                scheduler.compensation_ratios[i] = 1.0
        run.advance()
    if best >= plain:
        ratios, best = [1.0] * len(ratios), plain
    return {"ratios": ratios, "mse_plain": plain, "mse_dc": best}


def fit_cpr(table, dc_order: int) -> tuple:
    """Least-squares CPR coefficients from fitted ratio tables -> (36 coefficients, max abs error on the table).
    Fitted on the compensated steps only, i > dc_order (1-based): the first dc_order ratios are always 1."""
    rows, values = [], []
    for entry in table:
        steps = int(entry["steps"])
        for i in range(dc_order + 1, steps + 1):
            rows.append(cpr_features(i, steps, float(entry["guidance"])))
            values.append(float(entry["ratios"][i - 1]))
    if not rows:
        return [0.0] * CPR_TERMS, 0.0
    a, y = np.asarray(rows, dtype=np.float64), np.asarray(values, dtype=np.float64)
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0  # column scaling keeps lstsq well conditioned; undone below
    coeffs = np.linalg.lstsq(a / scale, y, rcond=None)[0] / scale
    return [float(c) for c in coeffs], float(np.abs(a @ coeffs - y).max())


def cpr_check_points(steps_list, guidances) -> list:
    """Where CPR is held-out-checked: every grid point, plus one point inside each grid cell (mean guidance, mean
    step count rounded down), where the scheduler relies on CPR alone. -> sorted [(steps, guidance)]."""
    steps_list, guidances = sorted(set(steps_list)), sorted(set(guidances))

    def middles(values, between):
        return [between(a, b) for a, b in zip(values[:-1], values[1:])] or values

    points = {(s, g) for s in steps_list for g in guidances}
    points |= {(s, g) for s in middles(steps_list, lambda a, b: (a + b) // 2)
               for g in middles(guidances, lambda a, b: (a + b) / 2)}
    return sorted(points)


def validated_range(steps_list, guidances, checks) -> dict:
    """The largest grid-aligned (steps, guidance) box in which CPR showed no held-out loss against UniPC at any
    checked point -> {"steps": [lo, hi], "guidance": [lo, hi], "cpr": True}. A box must span every axis the grid
    spans (CPR is only needed between grid points). Without one: the grid's box with "cpr": False (table only)."""
    steps_list, guidances = sorted(set(steps_list)), sorted(set(guidances))
    points = [(c["steps"], c["guidance"]) for c in checks]
    lost = {(c["steps"], c["guidance"]) for c in checks if c["heldout_mse_cpr"] > c["heldout_mse_plain"]}

    def spans(values):  # every [lo, hi] of grid values, lo < hi unless the grid has a single value
        return [(lo, hi) for i, lo in enumerate(values) for hi in values[i + (len(values) > 1):]]

    best, best_score = None, None
    for (s_lo, s_hi), (g_lo, g_hi) in itertools.product(spans(steps_list), spans(guidances)):
        inside = [(s, g) for s, g in points if s_lo <= s <= s_hi and g_lo <= g <= g_hi]
        if lost & set(inside):
            continue
        score = (sum(s_lo <= s <= s_hi for s in steps_list) * sum(g_lo <= g <= g_hi for g in guidances), len(inside))
        if best_score is None or score > best_score:
            best, best_score = {"steps": [s_lo, s_hi], "guidance": [g_lo, g_hi], "cpr": True}, score
    if best is None:
        return table_range([{"steps": s, "guidance": g} for s in steps_list for g in guidances])
    return best


# --------------------------------------------------------------------------------------------------
# pipelines: prompt embeddings once, a guided denoiser closure, seeded noise


def pipeline_denoiser(pipe, prompts, guidance: float, negative: str = ""):
    """denoise(x, t) -> the pipeline's guided model output for these prompts (one per sample), through the family
    layer: the same conditioning and model call the family's own pipeline uses."""
    from pipelines.families import family_of

    family = family_of(pipe)
    device = pipe.device
    size = family.native_size()
    cond = family.sized(family.encode_text(list(prompts), device), size, size)
    uncond = family.sized(family.encode_negative([negative] * len(prompts), device), size, size) if guidance > 1 else None

    @torch.no_grad()
    def denoise(x, t):
        out = family.sampling_output(x.to(device), torch.as_tensor(t, device=device), cond, uncond, guidance)
        return out.to(x.dtype).to(x.device)

    return denoise


def pipeline_noise(pipe, seeds):
    """The initial latents the pipeline itself would draw for these seeds (one CPU generator per image)."""
    from diffusers.utils.torch_utils import randn_tensor

    from pipelines.hipa import latent_shape

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return randn_tensor((len(seeds), *latent_shape(pipe)), generator=generators, dtype=torch.float32)


def default_prompts(count: int):
    from studio.fashion import PRETRAINED_CLASSES, prompt_for

    return [prompt_for(PRETRAINED_CLASSES[k % len(PRETRAINED_CLASSES)]) for k in range(count)]


SOLVERS = {"unipc": DCSolverScheduler, "dpm++": DCDPMSolverScheduler}


def search_config(pipe) -> dict:
    """The scheduler config the search fits on: the model's own, in UniPC's flow mode for a flow model. A shift
    that grows with the image size (Flux dev, SD3.5 with dynamic shifting) is fixed at the native size's (time_shift
    with mu equals the static shift e^mu, or mu for the linear kind), where the ratios are then valid."""
    config = solver_config(pipe.scheduler.config)
    if config.get("use_flow_sigmas") and config.get("use_dynamic_shifting"):
        from pipelines.families import family_of

        family = family_of(pipe)
        size = family.native_size()
        mu = family._shift(pipe.scheduler, size, size)["mu"]
        shift = float(np.exp(mu)) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)
        config = {**config, "use_dynamic_shifting": False, "flow_shift": shift}
    return config


def make_dc_scheduler(config, solver: str = "unipc", **overrides):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}': choose {' or '.join(SOLVERS)}")
    scheduler = SOLVERS[solver].from_config(config, **overrides)
    scheduler._warned_range = True  # the search sets the ratios itself: "no fitted ratios" is not news here
    return scheduler


def reference_plan(scheduler, steps_list, reference_steps, max_gap=None) -> list:
    """One fine grid per distinct start timestep (spacings like "leading" start lower for fewer steps), each
    containing every coarse grid that starts there. -> [(fine grid, {steps: coarse grid})]."""
    flow = bool(scheduler.config.get("use_flow_sigmas"))
    grids = {}
    for steps in steps_list:
        scheduler.set_timesteps(steps)
        grids[steps] = [grid_key(t) for t in scheduler.timesteps]
    plan = []
    for start in sorted({g[0] for g in grids.values()}, reverse=True):
        members = {s: g for s, g in grids.items() if g[0] == start}
        coarse = [t for g in members.values() for t in g]
        if flow:
            fine = fine_flow_grid(coarse, max_gap or start / reference_steps, scheduler.config.num_train_timesteps)
        else:
            fine = fine_grid(int(start), coarse, max_gap or max(1, int(np.ceil(start / reference_steps))))
        plan.append((fine, members))
    return plan


def references_for(denoise, noise, scheduler, steps_list, reference_steps, progress=None, max_gap=None,
                   method: str = "dpm++") -> dict:
    """Fine references from `noise`, aligned to each coarse grid. -> {steps: [x(t_0), ..., final]}.
    method: "dpm++" (DPM-Solver++(2M), the default) or "ddim" (the paper's protocol, needs ~1000 steps). A flow
    model's reference is always fine UniPC in its flow mode (flow_reference)."""
    out = {}
    flow = bool(scheduler.config.get("use_flow_sigmas"))
    if method not in ("dpm++", "ddim"):
        raise ValueError(f"unknown reference method '{method}': use dpm++ or ddim")
    for grid, members in reference_plan(scheduler, steps_list, reference_steps, max_gap):
        if flow:
            reference = flow_reference(denoise, noise, grid, scheduler.config, progress)
        elif method == "ddim":
            reference = ddim_reference(denoise, noise, grid, scheduler.alphas_cumprod,
                                       scheduler.config.prediction_type, scheduler.config.final_sigmas_type, progress)
        else:
            reference = solver_reference(denoise, noise, grid, scheduler.config, progress)
        for steps, coarse in members.items():
            out[steps] = [reference[t] for t in coarse] + [reference["final"]]
    return out


def check_cpr(pipe, coeffs, scheduler, noise, prompts, points, known, reference_steps, reference="dpm++",
              progress=None, finals=None) -> list:
    """CPR's ratios against rho = 1 (UniPC) on held-out noise at each (steps, guidance) point. known: {(steps,
    guidance): (final target, UniPC's held-out MSE)} from the search; finals: {guidance: the held-out converged
    sample}, the target of every other point at that guidance; without one a point gets its own reference."""
    checks = []
    finals = finals or {}
    for guidance in sorted({g for _, g in points}):
        steps_here = [s for s, g in points if g == guidance]
        denoise = pipeline_denoiser(pipe, prompts, guidance)
        missing = [s for s in steps_here if (s, guidance) not in known and guidance not in finals]
        references = references_for(denoise, noise, scheduler, missing, reference_steps, progress,
                                    method=reference) if missing else {}
        for steps in steps_here:
            target, plain = known.get((steps, guidance)) or (
                finals[guidance] if guidance in finals else references[steps][-1], None)
            if plain is None:
                plain = final_error(scheduler, denoise, noise, target, [1.0] * steps)
            ratios = cpr_ratios(coeffs, steps, guidance, scheduler.config.dc_order)
            checks.append({"steps": steps, "guidance": guidance, "grid": (steps, guidance) in known, "ratios": ratios,
                           "heldout_mse_plain": plain,
                           "heldout_mse_cpr": final_error(scheduler, denoise, noise, target, ratios)})
            if progress is not None:
                progress(1)
    return checks


def run_search(pipe, steps_list, guidances, samples: int = 10, solver: str = "unipc", seed: int = 0,
               reference_steps: int = 60, bounds=(0.0, 2.0), default_guidance: float = 2.0,
               prompts=None, progress_factory=None, scheduler_overrides=None, refine: bool = False,
               reference: str = "dpm++", step_fallback: bool = False, validate: str = "reference") -> dict:
    """Search ratios for every (steps, guidance), validate on held-out noise, fit the CPR. Returns the JSON dict.

    The ratios are fitted to the fine reference's states on the grid (they need a target at every step). They are
    validated, and CPR checked, on the held-out half against validate="converged": the converged sample (DDIM
    through every timestep from the usable T, what the model really draws), or "reference": the fine reference's
    final state. Both compare latents. A fit can beat UniPC against a 200-step reference and lose against the
    converged sample in image MSE (embedded, 6 steps at CFG 7.5), and the converged latent check rejects a row
    that gains 65% in image MSE (5 steps at CFG 3; docs/dc-solver.md): the check should compare decoded images,
    so "reference" stays the default. Flow models have no converged DDIM; they validate on the reference."""
    if validate not in ("converged", "reference"):
        raise ValueError(f"unknown validation target '{validate}': use converged or reference")
    started = time.time()
    steps_list = sorted({int(s) for s in steps_list})
    guidances = [float(g) for g in guidances]
    if not steps_list or min(steps_list) < 3:
        raise ValueError("give step counts of at least 3 (the first two steps are never compensated)")
    fit_seeds = list(range(seed, seed + samples))
    val_seeds = list(range(seed + samples, seed + 2 * samples))
    prompts = list(prompts or default_prompts(samples))
    prompts = (prompts * samples)[:samples]
    noise = pipeline_noise(pipe, fit_seeds + val_seeds)
    scheduler = make_dc_scheduler(search_config(pipe), solver, **(scheduler_overrides or {}))
    searched = sum(max(0, s - scheduler.config.dc_order) for s in steps_list) * len(guidances) * (2 if refine else 1)
    points = cpr_check_points(steps_list, guidances)
    between = {}  # guidance -> step counts checked off the grid (they need their own references)
    for n, g in points:
        if n not in steps_list or g not in guidances:
            between.setdefault(g, []).append(n)
    converged = validate == "converged" and not scheduler.config.get("use_flow_sigmas")
    top = sampling_top(scheduler.alphas_cumprod) if converged else 0
    checked_calls = len(points) + (len(guidances) * top if converged else sum(
        len(grid) - 1 for g, ss in between.items() for grid, _ in reference_plan(scheduler, ss, reference_steps)))
    total = (sum(len(g) - 1 for g, _ in reference_plan(scheduler, steps_list, reference_steps)) * len(guidances)
             + searched + checked_calls)
    bar = progress_factory(total) if progress_factory else None
    tick = bar.update if bar is not None else None
    table, known, finals = [], {}, {}
    for guidance in guidances:
        denoise = pipeline_denoiser(pipe, prompts + prompts, float(guidance))  # fit and held-out halves
        references = references_for(denoise, noise, scheduler, steps_list, reference_steps, tick, method=reference)
        fit_denoise = pipeline_denoiser(pipe, prompts, float(guidance))  # the held-out half has the same prompts
        if converged:
            finals[guidance] = converged_final(fit_denoise, noise[samples:], scheduler.config, tick)[0]
        for steps in steps_list:
            targets = references[steps]
            fit_targets = [t[:samples] for t in targets]
            scheduler.set_timesteps(steps)
            found = search_ratios(scheduler, fit_denoise, noise[:samples], fit_targets, bounds, progress=tick)
            ratios = found["ratios"]
            if refine:
                ratios = refine_ratios(scheduler, fit_denoise, noise[:samples], fit_targets[-1], ratios, bounds,
                                       progress=tick)
            heldout_target = finals[guidance] if converged else targets[-1][samples:]
            checked = validate_ratios(scheduler, fit_denoise, noise[samples:], heldout_target, ratios,
                                      per_step=step_fallback)
            table.append({"steps": steps, "guidance": float(guidance), "ratios": checked["ratios"],
                          "greedy_ratios": found["ratios"], "step_losses": found["steps"],
                          "heldout_mse_plain": checked["mse_plain"], "heldout_mse_dc": checked["mse_dc"]})
            known[(steps, guidance)] = (heldout_target, checked["mse_plain"])
            if bar is not None:
                bar.set_postfix_str(f"steps {steps} cfg {guidance:g}: held-out MSE {checked['mse_plain']:.3g} -> "
                                    f"{checked['mse_dc']:.3g}")
    coeffs, cpr_error = fit_cpr(table, scheduler.config.dc_order)
    if bar is not None:
        bar.set_postfix_str("held-out check of CPR")
    checks = check_cpr(pipe, coeffs, scheduler, noise[samples:], prompts, points, known, reference_steps, reference, tick,
                       finals)
    if bar is not None:
        bar.close()
    keep = ("solver_order", "solver_type", "disable_corrector", "lower_order_final", "final_sigmas_type", "dc_order",
            "algorithm_type", "use_karras_sigmas")
    return {
        "method": "dc-solver", "solver": solver, "base": str(getattr(pipe, "source", "")),
        "scheduler_fingerprint": scheduler_fingerprint(pipe.scheduler.config),
        "scheduler_overrides": dict(scheduler_overrides or {}),
        "solver_config": {k: scheduler.config[k] for k in keep if k in scheduler.config},
        "fit_seeds": fit_seeds, "heldout_seeds": val_seeds, "prompts": prompts,
        "reference": {"sampler": {"dpm++": "DPM-Solver++(2M)", "ddim": "DDIM"}[reference], "steps": reference_steps,
                      "grid": "contains every coarse timestep; targets are the states at exactly those timesteps",
                      "heldout_target": "converged sample" if converged else "reference final state"},
        "search": {"kind": "greedy bounded Brent per step" + (", then one coordinate sweep on the final error" if refine
                            else ""), "bounds": list(bounds), "target": "corrected state at t_{i+1}",
                   "validation": "held-out noise: the ratios are kept only if they beat rho = 1 there, against " +
                                 ("the converged sample (DDIM through every timestep from T)" if converged else
                                  "the fine reference's final state") +
                                 ("; steps that do not help fall back to rho = 1" if step_fallback else "") +
                                 "; CPR is checked against rho = 1 at every grid point and inside every grid cell, "
                                 "and used only in the validated box where it never lost"},
        "default_guidance": float(default_guidance), "table": table, "cpr_coeffs": coeffs,
        "cpr_max_abs_error": cpr_error, "validated": validated_range(steps_list, guidances, checks),
        "cpr_check": checks, "seconds": round(time.time() - started, 1),
    }
