"""Sampling grids that start at the model's usable T: the "refined" timestep spacing.

diffusers' `leading` spacing (SD's and the embedded models' configs) starts a 5-step run at t = 801 and a 25-step
run at t = 961, so even 25 steps land far from what the model draws from that noise (docs/dc-solver.md). The
refined grid starts at the highest usable timestep T (sampling_top) and follows Karras' ρ = 7 spacing of σ, snapped
to integer timesteps (so the model is called at exactly the σ the solver steps with), with two measured changes
(`studio bench samplers`, the embedded UNet against its converged sample):

- its lowest timestep is T / (4 n), not 0: a few-step run cannot resolve the last, fastest-changing stretch of
  log-SNR, and its final step (to σ = 0) does that stretch in one data prediction;
- in the top tenth of the schedule steps are at least max(5, T / (8 n)) timesteps apart: Karras' grid puts unit
  steps there (995, 994, 993, ...), where an ε-model's data prediction x̂0 = (x − σ ε̂)/α is amplified by 1/α; a
  multistep solver divides differences of those predictions by the tiny step, and 40 such steps stall at 20x the
  error floor, where the same grid with 5-timestep steps at the top reaches it.

`RefinedGrid` gives a diffusers multistep scheduler `timestep_spacing="refined"` and a `timesteps=` argument to
set_timesteps (an explicit descending integer grid). Stock diffusers classes do not know "refined": stock_config()
turns such a config into one they accept (trailing spacing from the usable T).

Flow-matching models (SD3, Flux) take UniPC and DPM-Solver++ through flow_solver_config(). diffusers' flow mode there
casts the timesteps σ·1000 to integers, so the model is called up to 1e-3 in σ below the σ the solver steps with;
RefinedGrid keeps them exact (float), as FlowMatchEulerDiscreteScheduler does.
"""
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

# diffusers' lambda_min_clipped for cosine schedules (DPMSolverMultistepScheduler's docs): below this half log-SNR
# an ε-model's x̂0 = (x − σ ε̂)/α amplifies its error past use.
LAMBDA_MIN = -5.1
REFINED = "refined"
KARRAS_RHO = 7.0


def sampling_top(alphas_cumprod, lambda_min: float = LAMBDA_MIN) -> int:
    """The highest training timestep a sampler can start from: the last one whose λ = log(α/σ) >= lambda_min.
    SD's scaled-linear schedule keeps 999 (λ = -2.7); a capped cosine schedule (squaredcos_cap_v2, the embedded
    models: ᾱ_999 = 2.4e-9, α = 4.9e-5) stops at 995, since any solver that evaluates the model at 999 (trailing or
    linspace spacing, a 999-step DDIM) multiplies its ε error by up to 1/α and blows the latents up (std ~500)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    lam = 0.5 * torch.log(abar / (1 - abar))
    keep = torch.nonzero(lam >= lambda_min).flatten()
    return int(keep.max()) if len(keep) else len(abar) - 1


def refined_timesteps(alphas_cumprod, steps: int, top: int | None = None) -> list:
    """The refined grid: `steps` descending integer timesteps from the usable T (see the module docstring)."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps}")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    top = sampling_top(abar) if top is None else int(top)
    if steps == 1:
        return [top]
    log_sigmas = (0.5 * torch.log((1 - abar) / abar)).numpy()
    low = int(round(top / (4 * steps)))
    min_gap, top_region = max(5, int(round(top / (8 * steps)))), 0.9 * top
    s_hi, s_lo = np.exp(log_sigmas[top]) ** (1 / KARRAS_RHO), np.exp(log_sigmas[low]) ** (1 / KARRAS_RHO)
    if steps > top + 1:
        raise ValueError(f"{steps} steps need more distinct timesteps than the schedule has ({top + 1} from t = {top})")
    # Thinning drops points: densify the continuous grid until exactly `steps` integer timesteps remain.
    points = steps
    while points <= 16 * (top + 1):
        targets = np.log((s_hi + np.linspace(0.0, 1.0, points) * (s_lo - s_hi)) ** KARRAS_RHO)
        grid = [top]
        for target in targets[1:]:
            t = _nearest_timestep(log_sigmas, float(target), top)
            if grid[-1] - t >= (min_gap if grid[-1] > top_region else 1):
                grid.append(t)
        if len(grid) >= steps:
            return grid[:steps]
        points += max(1, steps - len(grid))
    return list(range(top, top - steps, -1))  # so many steps that the gaps cannot hold: every timestep from T


def _nearest_timestep(log_sigmas, target: float, top: int) -> int:
    """The timestep in [0, top] whose log σ (ascending in t) is nearest `target`."""
    index = int(np.searchsorted(log_sigmas[:top + 1], target))
    candidates = [i for i in (index - 1, index) if 0 <= i <= top]
    return min(candidates, key=lambda i: abs(log_sigmas[i] - target))


class RefinedGrid:
    """Mixin for diffusers' multistep schedulers (UniPC, DPM-Solver++): `timestep_spacing="refined"` samples on
    refined_timesteps, and set_timesteps(timesteps=[...]) on any explicit descending integer grid. Either way the
    σ the solver steps with is the training schedule's σ at each integer timestep the model is called at."""

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, **kwargs):
        if self.config.get("use_flow_sigmas"):
            if timesteps is not None:
                raise ValueError("a flow-matching scheduler takes an explicit grid as sigmas=[...], not timesteps")
            super().set_timesteps(num_inference_steps, device=device, **kwargs)
            self.timesteps = (self.sigmas[:-1].to(torch.float64) * self.config.num_train_timesteps).to(
                device=device, dtype=torch.float32)
            return
        if timesteps is None and self.config.timestep_spacing != REFINED:
            return super().set_timesteps(num_inference_steps, device=device, **kwargs)
        if timesteps is None:
            timesteps = refined_timesteps(self.alphas_cumprod, num_inference_steps)
        grid = [int(t) for t in timesteps]
        if not grid or any(a <= b for a, b in zip(grid[:-1], grid[1:])) or grid[-1] < 0 \
                or grid[0] >= len(self.alphas_cumprod):
            raise ValueError(f"timesteps must be distinct integers in [0, {len(self.alphas_cumprod) - 1}], "
                             f"descending, got {grid}")
        spacing = self.config.timestep_spacing
        self.register_to_config(timestep_spacing="trailing")  # the parent builds its state for len(grid) steps
        try:
            super().set_timesteps(len(grid), device=device, **kwargs)
        finally:
            self.register_to_config(timestep_spacing=spacing)
        abar = self.alphas_cumprod.to(torch.float64)[grid]
        sigmas = ((1 - abar) / abar).sqrt().tolist()
        final = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.tensor(sigmas + [final], dtype=torch.float32)
        self.timesteps = torch.tensor(grid, dtype=torch.int64, device=device)
        self.num_inference_steps = len(grid)


class RefinedUniPCScheduler(RefinedGrid, UniPCMultistepScheduler):
    """UniPC that also takes timestep_spacing="refined" and set_timesteps(timesteps=...); otherwise diffusers' own."""


class RefinedDPMSolverScheduler(RefinedGrid, DPMSolverMultistepScheduler):
    """DPM-Solver++ that also takes timestep_spacing="refined"; otherwise diffusers' own."""


# FlowMatchEulerDiscreteScheduler settings with a different name in UniPC's and DPM-Solver++'s flow mode.
FLOW_RENAMED = {"shift": "flow_shift"}
# ...and those neither solver has (the pipelines still read the shift bounds from the scheduler config).
FLOW_ONLY = ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def is_flow_config(config) -> bool:
    """Whether a scheduler config samples by flow matching (FlowMatchEuler's, or a solver in flow mode)."""
    config = dict(config)
    # FlowMatchEuler's config has a "shift" and no noise schedule (betas); a fresh instance's lacks _class_name
    flow_match = str(config.get("_class_name", "")).startswith("FlowMatch") or (
        "shift" in config and "beta_schedule" not in config)
    return flow_match or bool(config.get("use_flow_sigmas")) or config.get("prediction_type") == "flow_prediction"


def flow_solver_config(config) -> dict:
    """A flow-matching model's scheduler config (FlowMatchEulerDiscreteScheduler's) as UniPC / DPM-Solver++ take it:
    flow sigmas with the same shift (or dynamic shifting), velocity prediction, final σ = 0. A config already in
    that form is returned as is."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if config.get("use_flow_sigmas"):
        return config
    out = {FLOW_RENAMED.get(k, k): v for k, v in config.items() if k not in FLOW_ONLY}
    out.update(use_flow_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="zero")
    return out


def solver_config(config) -> dict:
    """A scheduler config as UniPC / DPM-Solver++ (and the DC variants) take it: a flow-matching model's in their
    flow mode, any other as it is."""
    return flow_solver_config(config) if is_flow_config(config) else dict(config)


def stock_config(config) -> dict:
    """A scheduler config stock diffusers classes accept: "refined" spacing becomes trailing spacing from the usable
    T (the same betas up to it), the nearest they come to the refined grid."""
    config = dict(config)
    if config.get("timestep_spacing") != REFINED:
        return config
    return {**config, **start_at_top(config), "timestep_spacing": "trailing", "steps_offset": 0}


def start_at_top(config) -> dict:
    """Scheduler-config overrides that end the schedule at sampling_top: the same betas up to it (trained_betas),
    so every diffusers scheduler's trailing/linspace grid starts at the model's usable T. Empty where it is 999."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in dict(config).items() if k != "timestep_spacing"}
    betas = DDIMScheduler.from_config(config).betas
    top = sampling_top(torch.cumprod(1 - betas.double(), 0))
    if top >= len(betas) - 1:
        return {}
    return {"trained_betas": betas[:top + 1].tolist(), "num_train_timesteps": top + 1}
