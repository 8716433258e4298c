"""Few-step samplers: DC-Solver against UniPC, DPM-Solver++ and DDIM at 5/6/8/10 steps.

Protocol (the DC-Solver paper's, with a cheaper reference): from the same noise, the MSE of each sampler's
final latent to a fine reference whose grid contains every coarse timestep. The paper uses 999 DDIM steps
(--reference ddim --reference-steps 999); by default we use ~100 DPM-Solver++(2M) steps, which on the
Gaussian test bed are about as close to the exact solution (5e-7 vs 5e-7 unguided, 2e-6 vs 6e-7 at CFG 4),
far below the solvers' own errors (>= 4e-4 at 10 steps), at a tenth of the calls; plus the evaluator's prompt
accuracy and FD-classifier of the decoded images (stand-ins for CLIP score and FID). The noise seeds
here (default 1000..) are disjoint from the seeds dc-search fits and validates ratios on (0..19), so
DC-Solver is measured on held-out noise.
"""
import json
import time

import torch


def add_arguments(p):
    p.add_argument("--base", default="embedded,embedded-dit", help="models, comma-separated (missing ones are skipped)")
    p.add_argument("--steps", default="5,6,8,10", help="step counts, comma-separated")
    p.add_argument("--guidance", default="1,default", help="guidance scales; 'default' = the model's own")
    p.add_argument("--samplers", default="dc-solver,unipc,dpm++,ddim,dc-dpm++",
                   help="comma-separated; dc-dpm++ runs only where fitted DPM-Solver++ ratios were shipped")
    p.add_argument("--per-class", type=int, default=4, help="images per prompt class (9 classes)")
    p.add_argument("--seed", type=int, default=1000, help="first noise seed (keep clear of dc-search's 0..19)")
    p.add_argument("--reference", default="dpm++", choices=["dpm++", "ddim"],
                   help="reference sampler: DPM-Solver++(2M) (default; ~100 of its steps are about as exact as 999 DDIM "
                        "steps) or DDIM (the paper's protocol: --reference ddim --reference-steps 999)")
    p.add_argument("--reference-steps", type=int, default=100, help="steps of the reference")
    p.add_argument("--timestep-spacing", default="fitted", choices=["fitted", "model", "linspace", "leading", "trailing"],
                   help="grid of every sampler: the one the shipped DC ratios were fitted on (default) or another")
    p.add_argument("--device", default="cpu")


def _scheduler(pipe, name, guidance, overrides):
    """Every sampler on the same grid: the model's scheduler config plus the overrides (e.g. spacing)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from pipelines.dcsolver import DCDPMSolverScheduler, DCSolverScheduler

    config = {**pipe.scheduler.config, **overrides}
    if name == "dc-solver":
        return DCSolverScheduler.for_pipeline(pipe, guidance_scale=guidance, **overrides)
    if name == "dc-dpm++":
        return DCDPMSolverScheduler.for_pipeline(pipe, guidance_scale=guidance, **overrides)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False)  # plain deterministic DDIM, as in the paper
    raise ValueError(f"unknown sampler '{name}': choose from dc-solver, unipc, dpm++, ddim, dc-dpm++")


def _decode(pipe, latents):
    """Final latents -> images (B, 3, H, W) in [0, 1], decoded as the model's family does."""
    from pipelines.families import family_of

    with torch.no_grad():
        images = family_of(pipe).decode_latents(latents)
    return (images.float().cpu() / 2 + 0.5).clamp(0, 1)


def _scores(evaluator, pipe, latents, classes):
    if evaluator is None:
        return {}
    images = _decode(pipe, latents)
    return {"prompt_acc": 100.0 * evaluator.prompt_accuracy(images, classes), "fd": evaluator.fd(images)}


def bench_base(base, args, evaluator, rows, notes):
    from pipelines import load_pipeline
    from pipelines.dcsolver import fitted_file
    from studio.dcsearch import mse, pipeline_denoiser, pipeline_noise, references_for, sample
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
    overrides = {}
    if args.timestep_spacing == "fitted" and fitted_file(base, "unipc").is_file():
        fitted = json.loads(fitted_file(base, "unipc").read_text()).get("scheduler_overrides", {})
        # the grid settings only: the DC settings (dc_order) reach dc-solver through for_pipeline
        overrides = {k: v for k, v in fitted.items() if k in ("timestep_spacing", "steps_offset")}
    elif args.timestep_spacing not in ("fitted", "model"):
        overrides = {"timestep_spacing": args.timestep_spacing, "steps_offset": int(args.timestep_spacing == "leading")}
    if overrides:
        notes.append(f"{base}: every sampler runs with {overrides} on top of the model's scheduler config")
    n = int(args.per_class)
    classes = [c for c in PRETRAINED_CLASSES for _ in range(n)]
    prompts = [prompt_for(c) for c in classes]
    noise = pipeline_noise(pipe, range(int(args.seed), int(args.seed) + len(classes)))
    for guidance in guidances:
        denoise = pipeline_denoiser(pipe, prompts, guidance)
        started = time.perf_counter()
        probe = _scheduler(pipe, "unipc", guidance, overrides)
        references = references_for(denoise, noise, probe, steps_list, args.reference_steps, method=args.reference)
        reference_final = references[steps_list[0]][-1]
        rows.append({"base": base, "guidance": guidance, "sampler": f"{args.reference}-reference", "steps": args.reference_steps,
                     "mse": 0.0, **_scores(evaluator, pipe, reference_final, classes),
                     "seconds": time.perf_counter() - started})
        print(f"  {base} cfg {guidance:g}: reference done ({rows[-1]['seconds']:.0f} s)", flush=True)
        for steps in steps_list:
            target = references[steps][-1]
            unipc_mse = None
            for name in samplers:
                started = time.perf_counter()
                scheduler = _scheduler(pipe, name, guidance, overrides)
                final = sample(scheduler, denoise, noise, steps)
                row = {"base": base, "guidance": guidance, "sampler": name, "steps": steps, "mse": mse(final, target),
                       **_scores(evaluator, pipe, final, classes), "seconds": time.perf_counter() - started}
                if hasattr(scheduler, "ratio_source"):  # table, cpr, or unvalidated (outside the fit: = UniPC)
                    row["ratios"] = scheduler.ratio_source
                if name == "unipc":
                    unipc_mse = row["mse"]
                rows.append(row)
            for row in rows[-len(samplers):]:
                if unipc_mse:
                    row["mse_vs_unipc_%"] = 100.0 * (row["mse"] / unipc_mse - 1.0)
            print(f"  {base} cfg {guidance:g} steps {steps}: " + ", ".join(
                f"{r['sampler']} {r['mse']:.4g}" for r in rows[-len(samplers):]), flush=True)


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
    columns = ["base", "guidance", "steps", "sampler", "ratios", "mse", "mse_vs_unipc_%", "prompt_acc", "fd", "seconds"]
    return {"rows": rows, "columns": columns, "notes": notes,
            "settings": {"steps": args.steps, "guidance": args.guidance, "per_class": args.per_class,
                         "seed": args.seed, "reference": args.reference, "reference_steps": args.reference_steps,
                         "metric": "final-latent MSE to a fine reference from the same noise whose grid contains "
                                   "every coarse timestep (the paper's protocol uses 999 DDIM steps)",
                         "fd_name": "FD-classifier (evaluator features; a stand-in for FID)"}}
