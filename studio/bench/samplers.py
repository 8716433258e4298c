"""Few-step samplers judged by what the model really draws: DC-Solver, UniPC (on several grids), DPM-Solver++ and
DDIM against the converged sample from the same noise.

Protocol: for each (model, guidance) the converged sample is deterministic DDIM through every training timestep
from the model's usable T (pipelines.grids.sampling_top: 999 for SD schedules, 995 for the embedded models' capped
cosine) to 0; a second solver (DPM-Solver++(2M), --check-steps steps) from the same noise shows it has converged,
and their distance is the floor no sampler can be judged below. Each sampler's error is the MSE of its decoded
image (0-1 range, what a user sees) to the converged sample's image, and the final-latent MSE beside it; plus the
evaluator's prompt accuracy and FD-classifier (stand-ins for CLIP score and FID). Grids: a plain name samples on
the model's own spacing (the embedded models: "refined", pipelines/grids.py); "-leading" is the spacing their
diffusers config and SD's say (5 steps start at t = 801, 25 at t = 961); "-trailing" and "-karras" are diffusers'
grids from the usable T. DC-Solver runs on the grid its shipped ratios were fitted on. The noise seeds (default
1000..) are disjoint from those dc-search fits and validates on (0..19). --strip saves one same-seed image per step
count for the leading and the model's grid beside the converged sample.
"""
import json
import time
from pathlib import Path

import torch


GRIDS = {"model": {}, "leading": {"timestep_spacing": "leading", "steps_offset": 1},
         "trailing": {"timestep_spacing": "trailing", "steps_offset": 0},
         "karras": {"timestep_spacing": "trailing", "steps_offset": 0, "use_karras_sigmas": True}}
TOP_GRIDS = ("trailing", "karras")  # diffusers' grids that start at the usable T once the betas end there


def add_arguments(p):
    p.add_argument("--base", default="embedded,embedded-dit", help="models, comma-separated (missing ones are skipped)")
    p.add_argument("--steps", default="5,6,8,10,25,30", help="step counts, comma-separated")
    p.add_argument("--guidance", default="1,default,7.5", help="guidance scales; 'default' = the model's own")
    p.add_argument("--samplers", default="dc-solver,unipc,unipc-leading,unipc-trailing,unipc-karras,dpm++,ddim",
                   help="comma-separated: dc-solver (its fitted grid), dc-dpm++ (where fitted ratios were shipped), "
                        "unipc, dpm++, ddim (the model's own spacing; DDIM: trailing from the usable T where that is "
                        "'refined'), each optionally -leading, -trailing or -karras")
    p.add_argument("--strip", default=None, metavar="PNG",
                   help="save a same-seed strip (a row for leading and one for the model's grid: per image, --strip-steps "
                        "then the converged sample) at the model's guidance")
    p.add_argument("--strip-steps", default="5,10,25,50")
    p.add_argument("--per-class", type=int, default=2, help="images per prompt class (9 classes)")
    p.add_argument("--seed", type=int, default=1000, help="first noise seed (keep clear of dc-search's 0..19)")
    p.add_argument("--check-steps", type=int, default=400,
                   help="steps of the DPM-Solver++ run that checks the converged DDIM sample (their distance: the floor)")
    p.add_argument("--device", default="cpu")


def _scheduler(pipe, name, guidance):
    """A sampler by name: 'dc-solver' / 'dc-dpm++' with the model's fit (on the grid it was fitted on), else
    'unipc', 'dpm++' or 'ddim' with an optional grid suffix ('-trailing', '-karras': from the usable T)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from pipelines.dcsolver import DCDPMSolverScheduler, DCSolverScheduler
    from pipelines.grids import start_at_top, stock_config
    from pipelines.text2image import SCHEDULERS

    if name == "dc-solver":
        return DCSolverScheduler.for_pipeline(pipe, guidance_scale=guidance)
    if name == "dc-dpm++":
        return DCDPMSolverScheduler.for_pipeline(pipe, guidance_scale=guidance)
    solver, _, grid = name.partition("-")
    if grid and grid not in GRIDS or grid == "model":
        raise ValueError(f"unknown grid in '{name}': use -leading, -trailing or -karras")
    if solver not in ("unipc", "dpm++", "ddim"):
        raise ValueError(f"unknown sampler '{name}': choose from dc-solver, dc-dpm++, unipc, dpm++, ddim "
                         f"(+ -leading/-trailing/-karras)")
    config = dict(pipe.scheduler.config)
    if grid:
        config = {**config, **(start_at_top(config) if grid in TOP_GRIDS else {}), **GRIDS[grid]}
    if solver == "ddim":  # plain deterministic DDIM, as in the paper
        return DDIMScheduler.from_config(stock_config(config), clip_sample=False)
    if not grid:  # the model's own spacing, as `studio generate --scheduler NAME` samples it
        return SCHEDULERS[solver](config)
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def _decode(pipe, latents):
    """Final latents -> images (B, 3, H, W) in [0, 1], decoded as the model's family does."""
    from pipelines.families import family_of

    with torch.no_grad():
        images = family_of(pipe).decode_latents(latents)
    return (images.float().cpu() / 2 + 0.5).clamp(0, 1)


def _scores(evaluator, images, classes):
    if evaluator is None:
        return {}
    return {"prompt_acc": 100.0 * evaluator.prompt_accuracy(images, classes), "fd": evaluator.fd(images)}


def bench_base(base, args, evaluator, rows, notes):
    from pipelines import load_pipeline
    from pipelines.dcsolver import fitted_file
    from studio.dcsearch import converged_reference, mse, pipeline_denoiser, pipeline_noise, sample
    from studio.evaluate import default_sampling
    from studio.fashion import PRETRAINED_CLASSES, prompt_for

    try:
        pipe = load_pipeline(base, device=args.device)
    except ValueError as exc:
        notes.append(f"{base}: skipped ({exc})")
        return
    steps_list = [int(s) for s in str(args.steps).split(",") if s.strip()]
    model_guidance = float(default_sampling(base).get("guidance", 2.0))
    guidances = []
    for g in str(args.guidance).split(","):
        value = model_guidance if g.strip() == "default" else float(g)
        if value not in guidances:
            guidances.append(value)
    samplers = [s.strip() for s in str(args.samplers).split(",") if s.strip()]
    if "dc-dpm++" in samplers and not fitted_file(base, "dpm++").is_file():
        samplers.remove("dc-dpm++")
        notes.append(f"{base}: dc-dpm++ skipped (no fitted DPM-Solver++ ratios shipped)")
    if not fitted_file(base, "unipc").is_file():
        notes.append(f"{base}: no fitted DC-Solver ratios shipped: dc-solver runs with rho = 1 (= UniPC)")
    n = int(args.per_class)
    classes = [c for c in PRETRAINED_CLASSES for _ in range(n)]
    prompts = [prompt_for(c) for c in classes]
    noise = pipeline_noise(pipe, range(int(args.seed), int(args.seed) + len(classes)))
    for guidance in guidances:
        denoise = pipeline_denoiser(pipe, prompts, guidance)
        started = time.perf_counter()
        reference = converged_reference(denoise, noise, pipe.scheduler.config, args.check_steps)
        target = _decode(pipe, reference["final"])
        floor = mse(_decode(pipe, reference["check"]), target)
        rows.append({"base": base, "guidance": guidance, "sampler": f"converged: DDIM {reference['top'] + 1} steps",
                     "steps": reference["top"] + 1, "image_mse": 0.0, "x_floor": 0.0, "latent_mse": 0.0,
                     **_scores(evaluator, target, classes), "seconds": time.perf_counter() - started})
        rows.append({"base": base, "guidance": guidance, "sampler": "check: DPM-Solver++", "steps": args.check_steps,
                     "image_mse": floor, "x_floor": 1.0, "latent_mse": mse(reference["check"], reference["final"])})
        print(f"  {base} cfg {guidance:g}: converged sample from t = {reference['top']} "
              f"(floor {floor:.3g}, {rows[-2]['seconds']:.0f} s)", flush=True)
        if args.strip and guidance == model_guidance:
            _save_strip(pipe, base, args, prompts, guidance, noise, target, notes)
        for steps in steps_list:
            unipc_mse = None
            for name in samplers:
                started = time.perf_counter()
                scheduler = _scheduler(pipe, name, guidance)
                try:
                    final = sample(scheduler, denoise, noise, steps)
                except (AssertionError, IndexError, RuntimeError) as exc:  # e.g. karras grids that repeat a timestep
                    rows.append({"base": base, "guidance": guidance, "sampler": name, "steps": steps,
                                 "error": f"{type(exc).__name__}: {exc}".strip()[:120]})
                    continue
                images = _decode(pipe, final)
                error = mse(images, target)
                row = {"base": base, "guidance": guidance, "sampler": name, "steps": steps, "image_mse": error,
                       "x_floor": error / floor if floor > 0 else None, "latent_mse": mse(final, reference["final"]),
                       "start_t": int(scheduler.timesteps[0]), **_scores(evaluator, images, classes),
                       "seconds": time.perf_counter() - started}
                if hasattr(scheduler, "ratio_source"):  # table, cpr, or unvalidated (outside the fit: = UniPC)
                    row["ratios"] = scheduler.ratio_source
                if name == "unipc":
                    unipc_mse = error
                rows.append(row)
            done = [r for r in rows[-len(samplers):] if "image_mse" in r]
            for row in done:
                if unipc_mse:
                    row["vs_unipc_%"] = 100.0 * (row["image_mse"] / unipc_mse - 1.0)
            print(f"  {base} cfg {guidance:g} steps {steps}: " + ", ".join(
                f"{r['sampler']} {r['image_mse']:.4g}" for r in done), flush=True)


def _save_strip(pipe, base, args, prompts, guidance, noise, target, notes):
    """One row per grid (the config's leading, the model's own), one column per step count, then the converged
    sample: the same noise throughout (one image of each of the first three classes)."""
    from PIL import Image

    from studio.dcsearch import pipeline_denoiser, sample

    picks = [i * int(args.per_class) for i in range(min(3, len(noise) // int(args.per_class)))]
    denoise = pipeline_denoiser(pipe, [prompts[i] for i in picks], guidance)
    steps = [int(n) for n in str(args.strip_steps).split(",") if n.strip()]
    rows = []
    for name in ("unipc-leading", "unipc"):
        cells = [_decode(pipe, sample(_scheduler(pipe, name, None), denoise, noise[picks], n)) for n in steps]
        rows.append(torch.cat(cells + [target[picks]], dim=3))  # (images, 3, H, W x columns)
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # a row per grid: the images side by side
    scale = max(1, 256 // int(target.shape[-1]))
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    out = Path(args.strip)
    if len([b for b in str(args.base).split(",") if b.strip()]) > 1:
        out = out.with_name(f"{out.stem}-{base}{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(out)
    notes.append(f"{base}: strip {out}: rows leading then {pipe.scheduler.config.timestep_spacing} UniPC, the images side "
                 f"by side, each as {', '.join(map(str, steps))} steps, then the converged sample")


def run(args):
    try:
        from studio.evaluate import load_evaluator

        evaluator = load_evaluator()
    except (ImportError, FileNotFoundError) as exc:
        evaluator = None
        print(f"evaluator unavailable ({exc}); reporting MSE only", flush=True)
    rows, notes = [], []
    for base in [b.strip() for b in str(args.base).split(",") if b.strip()]:
        bench_base(base, args, evaluator, rows, notes)
    for note in notes:
        print(note)
    columns = ["base", "guidance", "steps", "sampler", "start_t", "ratios", "image_mse", "x_floor", "vs_unipc_%",
               "latent_mse", "prompt_acc", "fd", "seconds", "error"]
    return {"rows": rows, "columns": columns, "notes": notes,
            "settings": {"steps": args.steps, "guidance": args.guidance, "per_class": args.per_class,
                         "seed": args.seed, "check_steps": args.check_steps,
                         "metric": "MSE of the decoded image (0-1) to the converged sample from the same noise: DDIM "
                                   "through every training timestep from the usable T; x_floor = that error over the "
                                   "distance between the converged DDIM and DPM-Solver++ samples",
                         "fd_name": "FD-classifier (evaluator features; a stand-in for FID)"}}
