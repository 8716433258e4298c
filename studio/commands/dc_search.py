"""studio dc-search: fit DC-Solver compensation ratios and the CPR for a model; write them as JSON."""
import argparse


def _numbers(text, kind, name):
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers, got '{text}'") from None
    if not values:
        raise ValueError(f"--{name} needs at least one value")
    return values


def spacing_overrides(spacing: str) -> dict:
    if spacing == "model":
        return {}
    return {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}


def add_arguments(p):
    p.add_argument("--base", default="embedded", help="embedded, embedded-dit, or a diffusers folder")
    p.add_argument("--steps", default="5,6,8,10", help="step counts to fit, comma-separated")
    p.add_argument("--guidance", default="1,2,4", help="guidance scales to fit, comma-separated (1 = no CFG)")
    p.add_argument("--samples", type=int, default=10, help="noise samples to fit on (as many again are held out)")
    p.add_argument("--solver", default="unipc", choices=["unipc", "dpm++"], help="the solver DC compensates")
    p.add_argument("--reference", default="dpm++", choices=["dpm++", "ddim"],
                   help="sampler of the fine reference: DPM-Solver++(2M) (accurate in few calls) or DDIM")
    p.add_argument("--validate", default="reference", choices=["reference", "converged"],
                   help="held-out target the ratios must beat UniPC on, in latent MSE: the fine reference's final state "
                        "(default) or the converged sample (DDIM through every timestep from the usable T; see "
                        "docs/dc-solver.md for why it is not the default yet)")
    p.add_argument("--reference-steps", type=int, default=60,
                   help="steps of the fine reference (its grid always contains every coarse timestep)")
    p.add_argument("--bounds", default="0,2", help="search interval for each ratio")
    p.add_argument("--default-guidance", type=float, default=None,
                   help="guidance the scheduler assumes when not told (default: the model's own, from studio.json)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="after the paper's greedy per-step search, one coordinate sweep on the final error, the "
                        "quantity that matters (default on; --no-refine for the paper's search alone)")
    p.add_argument("--step-fallback", action="store_true",
                   help="on the held-out noise, also fall back to rho = 1 step by step where that helps (noisy with "
                        "few samples; by default a table is kept or dropped as a whole)")
    p.add_argument("--timestep-spacing", default="model", choices=["model", "linspace", "leading", "trailing"],
                   help="fit (and ship) the ratios for this spacing; leading also sets steps_offset 1, as SD does "
                        "(needed where a cosine schedule's t=999 blows up data prediction)")
    p.add_argument("--dc-order", type=int, default=1,
                   help="K: compensate with a Lagrange interpolation over K+1 buffered outputs, from step K+1 on. "
                        "1 (linear; also compensates the second step) is what the embedded model fits best; "
                        "2 is the paper's choice for SD")
    p.add_argument("--seed", type=int, default=0, help="first noise seed (fit: seed.., held out: seed+samples..)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="the JSON file to write (ship it as <model folder>/dc_solver.json)")


def run(args):
    from tqdm import tqdm

    from pipelines import load_pipeline
    from studio.dcsearch import run_search
    from studio.files import write_json

    steps = _numbers(args.steps, int, "steps")
    guidances = _numbers(args.guidance, float, "guidance")
    bounds = _numbers(args.bounds, float, "bounds")
    if len(bounds) != 2 or bounds[0] >= bounds[1]:
        raise ValueError(f"--bounds takes two increasing numbers, got '{args.bounds}'")
    if args.dc_order < 1:
        raise ValueError(f"--dc-order must be at least 1, got {args.dc_order}")
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    if min(guidances) < 1:
        raise ValueError("--guidance values must be >= 1 (1 means no classifier-free guidance)")
    pipe = load_pipeline(args.base, device=args.device)
    default_guidance = args.default_guidance
    if default_guidance is None:
        from studio.evaluate import default_sampling

        default_guidance = float(default_sampling(args.base).get("guidance", 2.0))
    result = run_search(pipe, steps, guidances, samples=args.samples, solver=args.solver,
                        seed=args.seed, reference_steps=args.reference_steps, bounds=tuple(bounds),
                        default_guidance=default_guidance, scheduler_overrides={**spacing_overrides(args.timestep_spacing), "dc_order": args.dc_order},
                        refine=args.refine, reference=args.reference, step_fallback=args.step_fallback,
                        validate=args.validate,
                        progress_factory=lambda total: tqdm(total=total, desc="dc-search", unit="call"))
    write_json(args.out, result)
    for entry in result["table"]:
        print(f"steps {entry['steps']:>2} cfg {entry['guidance']:g}: ratios {[round(r, 3) for r in entry['ratios']]} "
              f"held-out MSE {entry['heldout_mse_plain']:.4g} -> {entry['heldout_mse_dc']:.4g}")
    checks, box = result["cpr_check"], result["validated"]
    lost = [f"{c['steps']} steps cfg {c['guidance']:g}" for c in checks if c["heldout_mse_cpr"] > c["heldout_mse_plain"]]
    print(f"CPR max abs error on the table: {result['cpr_max_abs_error']:.3g}; held-out check against UniPC at "
          f"{len(checks)} points, lost at {len(lost)}{': ' + ', '.join(lost) if lost else ''}")
    print(f"validated: steps {box['steps'][0]}-{box['steps'][1]}, cfg {box['guidance'][0]:g}-{box['guidance'][1]:g} "
          f"({'CPR between table points' if box['cpr'] else 'table points only'}; elsewhere the scheduler is UniPC); "
          f"{result['seconds']} s; wrote {args.out}")
    return 0
