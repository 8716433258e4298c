"""studio hipa: train a HiPA one-step adapter (the shared training loop; resumable; --submit queues it as a job).

A frozen multi-step teacher makes (prompt, noise, image) pairs, cached in RUN_DIR/teacher (or
--teacher-cache); a low-rank adapter then learns to reproduce each image in ONE model call from the
same noise: at T on SD, SDXL and PixArt, one Euler step from σ = 1 on SD3 and Flux (--base any of them;
--resolution sets the training size). Every `studio train` flag works here too (--method, --rank, --steps,
--lr, --resume, ...); HiPA's own defaults differ: see studio/hipa.py TRAIN_DEFAULTS. Use the result with
`studio generate --one-step RUN_DIR/adapter`.
"""
import argparse

# flag -> objective_options key (HiPA's own settings; part of what a resume must match)
OPTION_FLAGS = {
    "pairs": (int, "number of teacher pairs (default 512)"),
    "teacher_scheduler": (str, "teacher sampler: default (the model's own), ddim, euler, unipc, dpm++, ...; "
                               "flow-matching models (SD3, Flux) always sample with their own"),
    "teacher_steps": (int, "teacher sampling steps (default 25)"),
    "teacher_guidance": (float, "teacher CFG scale, baked into the adapter (default: the model's own)"),
    "teacher_spacing": (str, "teacher timestep spacing: leading (default; first step below t=999), trailing, "
                             "linspace, or model (the scheduler's own); not for flow-matching models"),
    "teacher_cache": (str, "folder for the teacher pairs (default RUN_DIR/teacher); reusable across runs"),
    "pair_seed": (int, "seed of pair 0's noise (pair i uses seed + i; default 0)"),
    "prompts": (str, "prompts for the pairs, separated by '|' (default: every pretrained class prompt)"),
    "timestep": (int, "the one-step timestep T (default: the latest with signal scale >= 0.06; 999 for SD); "
                      "flow-matching models start at sigma = 1 (1000)"),
}
# flag -> HiPALossConfig field
LOSS_FLAGS = {
    "spatial_loss": ("spatial", str, "pixel term: l1 or l2 (default l1; LPIPS is not available offline)"),
    "spatial_weight": ("spatial_weight", float, "weight of the pixel term (default 1)"),
    "fft_weight": ("fft_weight", float, "weight of the FFT high-pass term (default 1)"),
    "edge_weight": ("edge_weight", float, "weight of the Sobel edge term (default 1)"),
    "laplacian_weight": ("laplacian_weight", float, "weight of the Laplacian term (default 0)"),
    "latent_weight": ("latent_weight", float, "weight of the latent L2 term (default 0.1)"),
    "feature_weight": ("feature_weight", float, "weight of the evaluator-feature term (default 0)"),
    "hf_cutoff": ("cutoff", float, "high-pass cutoff in cycles per pixel (default 0.125)"),
}


def add_arguments(p):
    from studio.commands.train import add_config_arguments

    add_config_arguments(p)
    group = p.add_argument_group("HiPA")
    for name, (kind, help_text) in OPTION_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), dest="hipa_" + name, type=kind, default=argparse.SUPPRESS,
                           help=help_text)
    for name, (_, kind, help_text) in LOSS_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), dest="loss_" + name, type=kind, default=argparse.SUPPRESS,
                           help=help_text)
    group.add_argument("--submit", action="store_true", help="queue the run in the job store instead of running it now")


def config_from_args(args) -> dict:
    from studio.commands.train import config_from_args as train_settings
    from studio.hipa import hipa_config

    settings = train_settings(args)
    options = dict(settings.pop("objective_options", None) or {})
    loss = dict(options.get("loss") or {})
    for name in OPTION_FLAGS:
        if hasattr(args, "hipa_" + name):
            value = getattr(args, "hipa_" + name)
            options[name] = [p.strip() for p in value.split("|") if p.strip()] if name == "prompts" else value
    for name, (field, _, _) in LOSS_FLAGS.items():
        if hasattr(args, "loss_" + name):
            loss[field] = getattr(args, "loss_" + name)
    options["loss"] = loss
    return hipa_config({**settings, "objective_options": options})


def run(args):
    from studio.hipa import train_hipa
    from studio.train import TrainConfig, run_status

    config = config_from_args(args)
    if args.submit:
        from studio.jobs import JobStore

        TrainConfig.from_dict({**config, "out": config.get("out") or "placeholder"})
        job = JobStore().submit(config, kind="hipa")
        print(f"queued job {job.id} ({job.name}): {job.run_dir}")
        return 0
    run_dir = train_hipa(config)
    status = run_status(run_dir)
    print(status.get("result") or run_dir)
    return 0 if status.get("state") == "done" else 1
