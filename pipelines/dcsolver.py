"""DC-Solver: UniPC with dynamic compensation (Zhao et al., ECCV 2024), as a diffusers scheduler.

UniPC evaluates the model at the *predicted* point x_i but then moves the state to the *corrected*
point x_i^c; the next predictor still uses the stale model output. Dynamic compensation replaces the
newest buffered data prediction by a Lagrange interpolation over the last dc_order+1 buffered
outputs, evaluated at a shifted time tau_i = t_{i-1} + rho_i (t_i - t_{i-1}). rho_i = 1 is plain UniPC.

Ratios for a run of N steps come from, in order: `dc_ratios` (explicit, length N) -> `dc_table` (fitted
ratios for exactly this (N, guidance)) -> `cpr_coeffs` (cascade polynomial regression) -> all ones.
`studio dc-search` fits tables and CPR coefficients into the model's folder; `DCSolverScheduler.for_pipeline(pipe)`
and `DCSolverScheduler.from_pretrained(model_folder, subfolder="scheduler")` load them (a scheduler with no fit
says once that it is plain UniPC). A fitted file also records the (N, guidance) range its ratios were
validated on (`dc_validated`): outside it, or where CPR was not validated, CPR is not used (ratios 1 =
UniPC, with one warning), since its polynomials extrapolate into harm.

DCDPMSolverScheduler applies the same compensation to DPM-Solver++ (a predictor-only solver).

Flow matching (SD3, Flux; neither the authors nor diffusers have it): the same compensation on UniPC's flow mode
(use_flow_sigmas, prediction_type "flow_prediction", the model's shift), whose data prediction is x̂0 = x − σ v̂;
the Lagrange nodes are the exact timesteps σ·1000 (RefinedGrid keeps them float). Build one from a model's
FlowMatchEuler config with `DCSolverScheduler.from_config(flow_solver_config(config))`; for_pipeline does it.
"""
import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config

from pipelines.grids import RefinedGrid, flow_solver_config, is_flow_config, solver_config

FITTED_FILES = {"unipc": "dc_solver.json", "dpm++": "dc_dpmsolver.json"}  # per model folder
CPR_TERMS = 36
logger = logging.getLogger(__name__)


def lagrange_compensate(values, times, tau: float):
    """Value at `tau` of the polynomial through (times[k], values[k]) (oldest first, newest last)."""
    out = None
    for k, (value, t_k) in enumerate(zip(values, times)):
        weight = 1.0
        for l, t_l in enumerate(times):
            if l != k:
                weight *= (tau - t_l) / (t_k - t_l)
        term = value * weight
        out = term if out is None else out + term
    return out


def cpr_features(step: int, steps: int, guidance: float) -> list:
    """The 36 monomials x^k g^(2-j) n^(2-l) (index 9k+3j+l) of the cascade polynomial regression.
    step is 1-based; inputs are normalised as the authors do (g = CFG/12, n = NFE/50, x = step/NFE)."""
    x, g, n = step / steps, guidance / 12.0, steps / 50.0
    return [x ** k * g ** (2 - j) * n ** (2 - l) for k in range(4) for j in range(3) for l in range(3)]


def cpr_ratios(coeffs, steps: int, guidance: float, dc_order: int) -> list:
    """Ratios predicted by CPR for an N-step run at this guidance. The first dc_order (K) steps are never
    compensated (K + 1 buffered outputs are needed); the authors' K = 2 gives their "steps 1 and 2"."""
    if len(coeffs) != CPR_TERMS:
        raise ValueError(f"CPR needs {CPR_TERMS} coefficients, got {len(coeffs)}")
    c = np.asarray(coeffs, dtype=np.float64)
    return [1.0 if i <= dc_order else float(np.dot(c, cpr_features(i, steps, guidance))) for i in range(1, steps + 1)]


def table_ratios(table, steps: int, guidance):
    """Fitted ratios for exactly (steps, guidance) from a dc_table (list of {steps, guidance, ratios}), or None."""
    for entry in table or []:
        if int(entry["steps"]) == steps and guidance is not None and abs(float(entry["guidance"]) - guidance) < 1e-6:
            return [float(r) for r in entry["ratios"]]
    return None


def fitted_file(source, solver: str = "unipc") -> Path:
    """Where the fitted ratios for a model source live: assets/<name>/ for the embedded models, else inside the folder."""
    from pipelines.loading import EMBEDDED_SOURCES

    folder = EMBEDDED_SOURCES.get(str(source), Path(str(source)).expanduser())
    return Path(folder) / FITTED_FILES[solver]


def table_range(table) -> dict:
    """The (steps, guidance) box a dc_table spans, as a `dc_validated` value with CPR not validated."""
    steps = [int(e["steps"]) for e in table]
    guidances = [float(e["guidance"]) for e in table]
    return {"steps": [min(steps), max(steps)], "guidance": [min(guidances), max(guidances)], "cpr": False}


def in_range(validated, steps: int, guidance) -> bool:
    lo, hi = validated["steps"]
    g_lo, g_hi = validated["guidance"]
    return guidance is not None and lo <= steps <= hi and g_lo - 1e-6 <= guidance <= g_hi + 1e-6


def load_fitted(path) -> dict:
    """Config overrides from a dc-search JSON file: dc_table, cpr_coeffs, the validated range, guidance_scale,
    and the scheduler settings the ratios were fitted with (e.g. the timestep spacing), since ratios only hold
    for those. Files written before dc-search checked CPR count as validated at their table's points only."""
    data = json.loads(Path(path).read_text())
    table = [{"steps": int(e["steps"]), "guidance": float(e["guidance"]), "ratios": [float(r) for r in e["ratios"]]}
             for e in data.get("table", [])]
    validated = data.get("validated") or (table_range(table) if table else None)
    if validated is not None:
        validated = {"steps": [int(s) for s in validated["steps"]],
                     "guidance": [float(g) for g in validated["guidance"]], "cpr": bool(validated.get("cpr"))}
    out = {**data.get("scheduler_overrides", {}), "dc_table": table, "cpr_coeffs": data.get("cpr_coeffs"),
           "dc_validated": validated}
    if data.get("default_guidance") is not None:
        out["guidance_scale"] = float(data["default_guidance"])
    return out


DC_KEYS = ("dc_ratios", "dc_table", "cpr_coeffs")  # a config holding any of these carries its own ratios


def fit_in_folder(folder, subfolder=None, solver: str = "unipc"):
    """The dc-search file of a model folder: beside the scheduler's config, else at the folder's top, where
    `studio dc-search --base FOLDER` writes it (None when neither exists or the path is not a local folder)."""
    root = Path(str(folder)).expanduser()
    for place in ([root / subfolder] if subfolder else []) + [root]:
        if (place / FITTED_FILES[solver]).is_file():
            return place / FITTED_FILES[solver]
    return None


class DynamicCompensation:
    """Ratio bookkeeping and the Lagrange step shared by the UniPC and DPM-Solver++ variants."""

    _solver = "unipc"  # which dc-search file (FITTED_FILES) belongs to this scheduler

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """diffusers' from_pretrained, plus the model's fit: `from_pretrained(model_folder, subfolder="scheduler")`
        on a folder `studio dc-search` fitted loads its ratios (a saved DC-Solver config keeps its own)."""
        if not any(kwargs.get(k) is not None for k in DC_KEYS) and pretrained_model_name_or_path is not None:
            path = fit_in_folder(pretrained_model_name_or_path, subfolder, cls._solver)
            if path is not None:
                config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
                if not any(config.get(k) is not None for k in DC_KEYS) and fits(path, config):
                    kwargs = {**load_fitted(path), **kwargs}
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                       return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _check_dc_config(self):
        if self.config.dc_order < 1:
            raise ValueError(f"dc_order must be at least 1, got {self.config.dc_order}")
        if self.config.cpr_coeffs is not None and len(self.config.cpr_coeffs) != CPR_TERMS:
            raise ValueError(f"cpr_coeffs must hold {CPR_TERMS} numbers, got {len(self.config.cpr_coeffs)}")
        validated = self.config.dc_validated
        if validated is not None and not all(len(validated.get(k) or []) == 2 for k in ("steps", "guidance")):
            raise ValueError(f"dc_validated needs 'steps' and 'guidance' as [min, max], got {validated}")
        self.compensation_ratios = []
        self.ratio_source = None
        self._dc_history = []  # (timestep, data prediction), oldest first; compensated values persist
        self._warned_range = False

    def _source(self, steps: int, guidance) -> str:
        """Where an N-step run's ratios come from: "explicit", "table", "cpr", "unvalidated" (a fitted file's
        ratios do not cover this point: ones) or "ones"."""
        if self.config.dc_ratios is not None:
            return "explicit"
        if table_ratios(self.config.dc_table, steps, guidance) is not None:
            return "table"
        validated = self.config.dc_validated
        if validated is not None:
            return "cpr" if validated["cpr"] and self.config.cpr_coeffs is not None and in_range(
                validated, steps, guidance) else "unvalidated"
        if self.config.cpr_coeffs is not None and guidance is not None:
            return "cpr"  # coefficients given directly (e.g. the authors' released ones): the caller's choice
        return "ones"

    def resolve_ratios(self, steps: int, guidance=None) -> list:
        """The ratios an N-step run uses (see the module docstring for the order of sources)."""
        guidance = self.config.guidance_scale if guidance is None else guidance
        source = self._source(steps, guidance)
        if source == "explicit":
            explicit = self.config.dc_ratios
            if len(explicit) != steps:
                raise ValueError(f"dc_ratios has {len(explicit)} values but sampling uses {steps} steps")
            return [float(r) for r in explicit]
        if source == "table":
            return table_ratios(self.config.dc_table, steps, guidance)
        if source == "cpr":
            return cpr_ratios(self.config.cpr_coeffs, steps, guidance, self.config.dc_order)
        return [1.0] * steps

    def _reset_compensation(self, guidance=None):
        steps = self.num_inference_steps
        guidance = self.config.guidance_scale if guidance is None else guidance
        self.compensation_ratios = self.resolve_ratios(steps, guidance)
        self.ratio_source = self._source(steps, guidance)
        self._dc_history = []
        if self.ratio_source == "ones" and not any(self.config.get(k) is not None for k in DC_KEYS):
            if not self._warned_range:
                self._warned_range = True
                logger.warning("DC-Solver has no fitted ratios for this model, so it samples exactly as UniPC. Load "
                               "the model's fit with %s.for_pipeline(pipe) or .from_pretrained(model_folder, "
                               "subfolder=\"scheduler\"), or fit one with `studio dc-search --base MODEL`.",
                               type(self).__name__)
        elif self.ratio_source == "unvalidated" and not self._warned_range:
            self._warned_range = True
            validated = self.config.dc_validated
            cfg = "unknown CFG" if guidance is None else f"CFG {guidance:g}"
            logger.warning("DC-Solver: no validated ratios for %d steps at %s (fitted file validated for steps %d-%d, "
                           "CFG %g-%g%s); sampling as plain UniPC (ratios 1). Fit this range with `studio dc-search`.",
                           steps, cfg, *validated["steps"], *validated["guidance"],
                           "" if validated["cpr"] else ", table points only")

    def _compensate(self, data_prediction):
        """Push the newest data prediction, return its compensated value (which also replaces it in the history)."""
        index = self.step_index
        t_now = float(self.timesteps[index])
        self._dc_history = (self._dc_history + [(t_now, data_prediction)])[-(self.config.dc_order + 1):]
        rho = self.compensation_ratios[index] if index < len(self.compensation_ratios) else 1.0
        if len(self._dc_history) <= self.config.dc_order or rho == 1.0:
            return data_prediction  # the first dc_order steps are never compensated
        t_prev = self._dc_history[-2][0]
        tau = t_prev + rho * (t_now - t_prev)
        times = [t for t, _ in self._dc_history]
        values = [v.to(torch.float64) if v.dtype == torch.float16 else v for _, v in self._dc_history]
        compensated = lagrange_compensate(values, times, tau).to(data_prediction.dtype)
        self._dc_history[-1] = (t_now, compensated)
        return compensated


class DCSolverScheduler(DynamicCompensation, RefinedGrid, UniPCMultistepScheduler):
    """UniPC (multistep, predictor-corrector, data prediction) with dynamic compensation from step dc_order + 1 on.

    pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios=[...])
    pipe.scheduler = DCSolverScheduler.for_pipeline(pipe, guidance_scale=2.0)   # shipped fitted ratios
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list = [],  # noqa: B006 - diffusers' own default, stored in the config
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min=None,
        sigma_max=None,
        shift_terminal=None,
        dc_order: int = 2,
        dc_ratios: list = None,
        dc_table: list = None,
        cpr_coeffs: list = None,
        dc_validated: dict = None,
        guidance_scale: float = None,
    ):
        if solver_p is not None:
            raise ValueError("DC-Solver compensates UniPC's own predictor; solver_p is not supported")
        if not predict_x0:
            raise ValueError("DC-Solver compensates data predictions: predict_x0 must be True")
        if use_flow_sigmas != (prediction_type == "flow_prediction"):
            raise ValueError("a flow-matching DC-Solver needs both use_flow_sigmas=True and prediction_type="
                             "'flow_prediction' (build it with pipelines.grids.flow_solver_config)")
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, solver_order=solver_order,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            predict_x0=predict_x0, solver_type=solver_type, lower_order_final=lower_order_final,
            disable_corrector=disable_corrector, solver_p=solver_p, use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
            use_flow_sigmas=use_flow_sigmas, flow_shift=flow_shift, timestep_spacing=timestep_spacing,
            steps_offset=steps_offset, final_sigmas_type=final_sigmas_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr, use_dynamic_shifting=use_dynamic_shifting,
            time_shift_type=time_shift_type, sigma_min=sigma_min, sigma_max=sigma_max, shift_terminal=shift_terminal)
        self._check_dc_config()

    @classmethod
    def for_pipeline(cls, pipe, guidance_scale=None, **overrides):
        """This scheduler on `pipe`'s config (its flow mode on a flow-matching model), with the ratios fitted for
        the loaded model when they were shipped."""
        return cls.from_config(solver_config(pipe.scheduler.config),
                               **{**fitted_for(pipe, "unipc", guidance_scale), **overrides})

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, guidance_scale=None,
                      timesteps=None):
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        # diffusers keeps timestep_list and this_order across runs; a new run must not see the last one.
        self.timestep_list = [None] * self.config.solver_order
        self.this_order = None
        self._reset_compensation(guidance_scale)

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        # Called by step() after the corrector and after the buffer push: exactly where DC belongs.
        self.model_outputs[-1] = self._compensate(self.model_outputs[-1])
        return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)


class DCDPMSolverScheduler(DynamicCompensation, RefinedGrid, DPMSolverMultistepScheduler):
    """DPM-Solver++ (multistep, data prediction) with dynamic compensation of the newest data prediction."""

    _solver = "dpm++"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        dc_order: int = 2,
        dc_ratios: list = None,
        dc_table: list = None,
        cpr_coeffs: list = None,
        dc_validated: dict = None,
        guidance_scale: float = None,
    ):
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"DC needs data prediction: use algorithm_type 'dpmsolver++', not '{algorithm_type}'")
        if use_flow_sigmas != (prediction_type == "flow_prediction"):
            raise ValueError("a flow-matching DC-Solver needs both use_flow_sigmas=True and prediction_type="
                             "'flow_prediction' (build it with pipelines.grids.flow_solver_config)")
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, solver_order=solver_order,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            algorithm_type=algorithm_type, solver_type=solver_type, lower_order_final=lower_order_final,
            euler_at_final=euler_at_final, use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
            use_lu_lambdas=use_lu_lambdas, use_flow_sigmas=use_flow_sigmas, flow_shift=flow_shift,
            final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped, variance_type=variance_type,
            timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr, use_dynamic_shifting=use_dynamic_shifting,
            time_shift_type=time_shift_type)
        self._check_dc_config()

    @classmethod
    def for_pipeline(cls, pipe, guidance_scale=None, **overrides):
        return cls.from_config(solver_config(pipe.scheduler.config),
                               **{**fitted_for(pipe, "dpm++", guidance_scale), **overrides})

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None, guidance_scale=None):
        super().set_timesteps(num_inference_steps, device=device, mu=mu, timesteps=timesteps)
        self._reset_compensation(guidance_scale)

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        # DPM-Solver++ has no corrector: the data prediction goes straight into the buffer, so compensate here.
        return self._compensate(super().convert_model_output(model_output, *args, sample=sample, **kwargs))


def fitted_for(pipe, solver: str = "unipc", guidance_scale=None) -> dict:
    """Config overrides with the ratios shipped for the pipeline's model (empty when none were fitted)."""
    source = getattr(pipe, "source", None)
    # the file from_pretrained finds too: beside the scheduler config, else at the model folder's top
    path = fit_in_folder(fitted_file(source, solver).parent, "scheduler", solver) if source else None
    out = load_fitted(path) if path is not None and fits(path, pipe.scheduler.config) else {}
    if guidance_scale is not None:
        out["guidance_scale"] = float(guidance_scale)
    return out


def dc_solver_from_config(config):
    """The `studio generate --scheduler dc-solver` factory: the scheduler config is all it sees, so it uses the
    shipped fitting whose recorded scheduler settings match this config (the embedded models), else plain ratios."""
    from pipelines.loading import EMBEDDED_SOURCES

    for name in EMBEDDED_SOURCES:
        path = fitted_file(name, "unipc")
        if fits(path, config):
            return DCSolverScheduler.from_config(config, **load_fitted(path))
    return DCSolverScheduler.from_config(config)


def scheduler_fingerprint(config) -> dict:
    """The model's noise-schedule settings that fitted ratios depend on (its flow shift for a flow model)."""
    if is_flow_config(config):
        config = flow_solver_config(config)
        keys = ("num_train_timesteps", "prediction_type", "flow_shift", "use_dynamic_shifting", "time_shift_type",
                "shift_terminal")
    else:
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                "rescale_betas_zero_snr")
    return {k: config.get(k) for k in keys}


def fits(path, config) -> bool:
    """Whether a fitted file exists and was fitted for a model with this noise schedule."""
    path = Path(path)
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text()).get("scheduler_fingerprint")
    if recorded is not None and recorded != scheduler_fingerprint(config):
        import logging

        logging.getLogger("pipelines").info("not using %s: fitted for another noise schedule", path)
        return False
    return True
