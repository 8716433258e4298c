"""studio plan: the peak memory of a training run, predicted before it starts (nothing is allocated); with
--budget, the configurations that fit, fastest first; with --measure, the denoiser's training step run for real
on this machine to check the prediction.

Takes the flags of `studio train` (a run's config YAML works too). --base also takes a published config built
in code: sd15, sdxl, sd35-medium, flux-dev (studio/plan.py PUBLISHED). --device cuda (default) or cpu: the device
the run will train on. See docs/memory.md.
"""


def add_arguments(p):
    from studio.commands.train import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--denoiser", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the denoiser's config (a depth-reduced model: num_layers=2)")
    p.add_argument("--measure", action="store_true",
                   help="also run the denoiser's training step for real here and compare (CPU: live-tensor "
                        "accounting; CUDA: max_memory_allocated); random-init weights for a published config")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args):
    import json

    from studio.commands.train import config_from_args, parse_option
    from studio.plan import Planner, format_prediction, format_search, format_size, parse_size, subject_images
    from studio.train import TrainConfig

    settings = config_from_args(args)
    settings.setdefault("out", "plan")  # a plan writes nothing; the config only wants a run folder named
    config = TrainConfig.from_dict(settings)
    budget = parse_size(config.budget) if config.budget else None
    overrides = dict(parse_option(item) for item in args.denoiser)
    planner = Planner(config.base, device=config.device or "cuda", denoiser=overrides,
                      images=subject_images(config.images))
    search = planner.search(config, budget) if budget else None
    prediction = search.base if search else planner.predict(config)
    result = {"prediction": prediction.to_dict(), "denoiser_overrides": overrides}
    lines = [format_prediction(prediction)]
    if search:
        result["search"] = search.to_dict()
        lines.append(format_search(search, planner.device))
    if args.measure:
        measured = planner.measure(config)
        error = prediction.denoiser_step / measured - 1
        result["measured_denoiser_step"] = measured
        how = "max_memory_allocated" if planner.device == "cuda" else "live-tensor accounting"
        lines.append(f"denoiser training step: predicted {format_size(prediction.denoiser_step)}, measured "
                     f"{format_size(measured)} ({how}; prediction {error:+.1%})")
    print(json.dumps(result, indent=1) if args.json else "\n".join(lines))
    return 1 if search and not search.fits else 0
