"""subject: fine-tune the embedded model on the held-out class with each method; subject accuracy, prior preservation, FD.

For each method: `studio train` runs in its own process (so wall time and peak memory are that run's alone),
then the evaluator scores (a) images of the subject prompt (subject accuracy: share classified as the
held-out class), (b) images of the 9 pretrained class prompts (prior preservation: their prompt accuracy
after fine-tuning, next to the base model's) and (c) FD-classifier of those pretrained-class images.
A learning curve (subject accuracy of the validation samples every few steps, and the loss) is kept per
method, so a method that falls short shows where it stalled.

Prior preservation (on by default, --prior N): every run also trains on N images per pretrained class prompt
that the base model generated itself (made once, up front, shared by all methods). Without it every method
that learns the subject also drifts the other prompts toward it. Evaluation seeds start at --eval-seed, clear
of every seed used for training, class images or validation samples.

--defaults measures what a new user gets (issue #22): each method is trained by `studio train --base B --images I
--prompt "a photo of sks bag" --method M` (+ --out, --cpu-threads, --quiet) and nothing else, so every other
setting, prior preservation on the derived class prompt included, comes from the defaults table
(studio/defaults.py). Subject = share of the prompt's own images classified as the held-out class; prior = prompt
accuracy on the 9 pretrained class prompts, against the base's; a row meets the target (TARGET) with subject >= 0.8,
prior within 5 points and a wall time <= 10 minutes.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ALL_METHODS = ["lora", "dora", "loldu", "flora", "sara", "tlora", "full"]
# The per-method settings tuned on this benchmark live in ONE table, studio/defaults.py, which `studio train`,
# YAML configs, TrainConfig and the Train tab read too (docs/training.md has what was tried); --steps and
# --set METHOD.KEY=VALUE override them here. Every run uses prior preservation on the 9 pretrained class
# prompts unless --prior 0.
DEFAULTS_PROMPT = "a photo of sks bag"  # issue #22: what a new user types
TRAINING_KEYS = ("rank", "targets", "lr", "steps", "batch_size")  # the table's fields this protocol takes
# (its own prior preservation replaces the table's derived class prompt)


def method_settings(method: str, dit: bool) -> dict:
    """The table's training settings for a method on the UNet or the DiT family."""
    from studio.defaults import values

    settings = values(method, family="dit" if dit else "unet")
    return {k: settings[k] for k in TRAINING_KEYS if not (method == "full" and k in ("rank", "targets"))}


def add_arguments(p):
    from studio.fashion import HELD_OUT, prompt_for

    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated methods (and 'full')")
    p.add_argument("--steps", type=int, default=None, help="training steps for every method (default: each method's own)")
    p.add_argument("--base", default="embedded")
    p.add_argument("--images", default=None, help=f"subject folder (default: assets/subjects/{HELD_OUT})")
    p.add_argument("--prompt", default=None, help=f"instance prompt = the evaluated subject prompt (default: "
                                                  f"'{prompt_for(HELD_OUT)}'; with --defaults '{DEFAULTS_PROMPT}')")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method table's (studio/defaults.py)")
    p.add_argument("--defaults", action="store_true",
                   help="measure what a new user gets: each method trained by `studio train` with ONLY --base "
                        "--images --prompt --method (+ --out, --cpu-threads, --quiet), every other setting from the "
                        "method table; scores the --prompt images (subject) and the 9 pretrained class prompts "
                        "(prior, against the base's). Use with --prompt 'a photo of sks bag'")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a training setting for one method (or all.KEY=VALUE)")
    p.add_argument("--per-class", type=int, default=20, help="evaluation images per class prompt")
    p.add_argument("--eval-seed", type=int, default=100_000,
                   help="first evaluation seed (clear of the training, validation and class-image seeds)")
    p.add_argument("--prior", type=int, default=8, metavar="N",
                   help="prior preservation on the 9 pretrained class prompts, N class images each, generated once "
                        "by the base model and shared by all methods (0 = off)")
    p.add_argument("--curve-every", type=int, default=0, help="learning-curve points every N steps (default steps/5)")
    p.add_argument("--curve-images", type=int, default=8, help="validation images per learning-curve point")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temp folder beside --json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")


def _overrides(items) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set needs METHOD.KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "3e-3" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out.setdefault(method, {})[name.replace("-", "_")] = parsed
    return out


def _subject_folder(args) -> Path:
    from pipelines.assets import assets_dir
    from studio.fashion import HELD_OUT

    folder = Path(args.images) if args.images else assets_dir() / "subjects" / HELD_OUT
    if not folder.is_dir():
        raise FileNotFoundError(f"subject images not found: {folder} (give --images DIR)")
    return folder


def _train_in_subprocess(config: dict, folder: Path) -> dict:
    """`python -m studio train --config` in a fresh process: its own wall time and peak memory."""
    import yaml

    from studio.files import write_text

    config_path = folder.with_suffix(".yaml")
    write_text(config_path, yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "studio", "train", "--config", str(config_path), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0], "wall_seconds": round(seconds, 1)}
    return {"wall_seconds": round(seconds, 1)}


def _is_dit(args) -> bool:
    from pipelines.families import family_of
    from studio.generate import get_pipeline

    return family_of(get_pipeline(args.base, device=args.device)).component == "transformer"  # cached: evaluated anyway


def _class_images(args, prior) -> float:
    """Generate the shared class images once, up front, so no method's wall time includes them.
    Same cache keys and seeds as `studio train` (training seed 0), so every run finds them cached."""
    from pipelines import load_pipeline
    from pipelines.text2image import native_size
    from studio.data import class_cache_folder, ensure_class_images
    from studio.train import TrainConfig

    defaults = TrainConfig(images=".", out=".")
    began = time.perf_counter()
    pipe = load_pipeline(args.base, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    size = native_size(pipe)
    for prompt in prior["class_prompt"]:
        folder = class_cache_folder(prior["class_cache"], str(args.base), f"{prompt}|{defaults.class_sampling_steps}", size)
        ensure_class_images(pipe, prompt, prior["class_images"], folder, size, steps=defaults.class_sampling_steps,
                            seed=0)
    seconds = round(time.perf_counter() - began, 1)
    print(f"[subject] class images for prior preservation: {seconds} s", file=sys.stderr, flush=True)
    return seconds


def _curve(run_dir: Path, evaluator, class_name) -> list:
    """(step, subject accuracy of that step's validation samples, mean loss of the steps before it)."""
    from PIL import Image

    from studio.files import read_jsonl

    losses = [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r]
    points, previous = [], 0
    for folder in sorted(p for p in (run_dir / "samples").glob("step-*") if p.is_dir()):  # not the grids
        step = int(folder.name[5:])
        images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
        window = [loss for s, loss in losses if previous < s <= step]
        points.append({"step": step, "subject_accuracy": round(evaluator.prompt_accuracy(images, class_name), 3),
                       "loss": round(sum(window) / len(window), 4) if window else None})
        previous = step
    return points


def _evaluate(args, method, run_dir, evaluate_base, keep_pipe=False):
    """Score the fine-tuned model: all 10 class prompts, the held-out one being the subject prompt."""
    from pipelines import load_pipeline

    from pipelines.families import family_of

    pipe = load_pipeline(args.base, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    if method == "full":  # the fine-tuned denoiser replaces the pipeline's (UNet or transformer)
        trained = type(family.denoiser).from_pretrained(run_dir / family.component).to(pipe.device)
        setattr(pipe, family.component, trained)
    else:
        from adapters import load_adapter

        load_adapter(family.denoiser, run_dir / "adapter", name="subject")
    scores = evaluate_base(args.base, per_class=args.per_class, pipe=pipe, device=args.device, seed=args.eval_seed)
    return (scores, pipe) if keep_pipe else scores


def subject_accuracy(pipe, base, prompt, per_class, seed, evaluator) -> float:
    """Share of `per_class` images of `prompt` the evaluator calls the held-out class, on the seeds
    evaluate_base gives the held-out class's own prompt (so the two are comparable)."""
    from pipelines.text2image import GenerationSettings, generate_from
    from studio.evaluate import default_sampling
    from studio.fashion import CLASSES, HELD_OUT

    sampling = default_sampling(base)
    settings = GenerationSettings(prompt=prompt, steps=25, guidance=float(sampling.get("guidance", 2.0)),
                                  seed=int(seed) + 1000 * CLASSES.index(HELD_OUT), num_images=int(per_class))
    return float(evaluator.prompt_accuracy(generate_from(pipe, settings), HELD_OUT))


def _train_command(argv: list, folder: Path) -> dict:
    """`python -m studio train ARGV` in a fresh process (its own wall time); its output kept in FOLDER.log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "studio", "train", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    seconds = round(time.perf_counter() - began, 1)
    folder.with_suffix(".log").write_text((proc.stdout or "") + (proc.stderr or ""))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0], "wall_seconds": seconds}
    lines = (proc.stdout or "").splitlines()
    return {"wall_seconds": seconds, "defaults_line": next((l for l in lines if l.startswith("defaults for ")), None)}


TARGET = {"subject": 0.8, "prior_points": 5, "wall_seconds": 600}  # issue #22's Number


def run_defaults(args):
    """--defaults: `studio train` with only --base --images --prompt --method, as a new user runs it."""
    import yaml

    from studio.evaluate import evaluate_base
    from studio.files import read_jsonl
    from studio.generate import get_pipeline
    from studio.train import run_status

    if args.set or args.steps or args.batch_size:
        raise ValueError("--defaults measures the method table as it is: leave out --set, --steps and --batch-size")
    methods, images, work, stamp, evaluator, base = _setup(args)
    base_subject = subject_accuracy(get_pipeline(args.base, device=args.device), args.base, args.prompt,
                                    args.per_class, args.eval_seed, evaluator)
    rows = [{"method": "base (no fine-tuning)", "subject_accuracy": round(base_subject, 3),
             "prior_accuracy": round(base["prompt_accuracy"], 3), "prior_delta": 0.0, "fd": round(base["fd"], 3)}]
    details = {"base": base, "protocol": "defaults", "target": TARGET}
    curves = {}
    for method in methods:
        run_dir = work / f"{stamp}-{method}"
        argv = ["--base", str(args.base), "--images", str(images), "--prompt", args.prompt, "--method", method,
                "--out", str(run_dir), "--cpu-threads", str(args.threads), "--quiet"]
        if args.device != "cpu":
            argv += ["--device", args.device]
        print(f"[subject] {method}: studio train {' '.join(argv)}", file=sys.stderr, flush=True)
        outcome = _train_command(argv, run_dir)
        if "error" in outcome:
            rows.append({"method": method, "error": outcome["error"], "wall_seconds": outcome["wall_seconds"]})
            _save(args, rows, curves, details, images)
            continue
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        status = run_status(run_dir)
        print(f"[subject] {method}: evaluating", file=sys.stderr, flush=True)
        scores, pipe = _evaluate(args, method, run_dir, evaluate_base, keep_pipe=True)
        subject = subject_accuracy(pipe, args.base, args.prompt, args.per_class, args.eval_seed, evaluator)
        curves[method] = _curve(run_dir, evaluator, "bag")
        delta = scores["prompt_accuracy"] - base["prompt_accuracy"]
        meets = (subject >= TARGET["subject"] and delta >= -TARGET["prior_points"] / 100
                 and outcome["wall_seconds"] <= TARGET["wall_seconds"])
        details[method] = {"argv": argv, "config": config, "status": status, "eval": scores,
                           "defaults_line": outcome.get("defaults_line"),
                           "defaults": json.loads((run_dir / "data.json").read_text()).get("defaults")}
        peak = max((r.get("peak_mem_mb") or 0 for r in read_jsonl(run_dir / "log.jsonl")), default=None)
        rows.append({"method": method, "steps": config["steps"], "lr": config["lr"],
                     "rank": config["rank"] if method != "full" else None, "targets": config["targets"] if method != "full" else None,
                     "batch_size": config["batch_size"], "class_prompt": "; ".join(config["class_prompt"]),
                     "class_images": config["class_images"] if config["prior_preservation"] else 0,
                     "trainable_params": status.get("trainable_params"), "wall_seconds": outcome["wall_seconds"],
                     "train_seconds": status.get("seconds"), "peak_mem_mb": peak,
                     "subject_accuracy": round(subject, 3), "prior_accuracy": round(scores["prompt_accuracy"], 3),
                     "prior_delta": round(delta, 3), "fd": round(scores["fd"], 3),
                     "class_prompt_accuracy": round(scores["held_out_accuracy"], 3), "meets_target": meets})
        _save(args, rows, curves, details, images)
    return _result(args, rows, curves, details, images)


def _setup(args):
    """What both protocols start from: the methods, the subject folder, the work folder and its run stamp, the
    evaluator and the base model's scores."""
    import torch

    from studio.evaluate import evaluate_base, load_evaluator

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("name at least one method with --methods")
    torch.set_num_threads(args.threads)
    images = _subject_folder(args)
    work = Path(args.work) if args.work else (Path(args.json).resolve().parent if args.json else Path.cwd()) / "subject-runs"
    work.mkdir(parents=True, exist_ok=True)
    evaluator = load_evaluator()
    base = evaluate_base(args.base, per_class=args.per_class, device=args.device, seed=args.eval_seed)
    return methods, images, work, time.strftime("%Y%m%d-%H%M%S"), evaluator, base


def run(args):
    from adapters import METHODS
    from studio.evaluate import default_sampling, evaluate_base
    from studio.fashion import HELD_OUT

    if args.prompt is None:
        from studio.fashion import HELD_OUT, prompt_for

        args.prompt = DEFAULTS_PROMPT if args.defaults else prompt_for(HELD_OUT)
    if args.defaults:
        return run_defaults(args)
    overrides = _overrides(args.set)
    methods, images, work, stamp, evaluator, base = _setup(args)
    rows = [{"method": "base (no fine-tuning)", "trainable_params": 0, "adapter_bytes": 0, "wall_seconds": 0.0,
             "peak_mem_mb": None, "subject_accuracy": round(base["held_out_accuracy"], 3),
             "prior_accuracy": round(base["prompt_accuracy"], 3), "prior_delta": 0.0, "fd": round(base["fd"], 3)}]
    curves, details = {}, {"base": base}
    prior = {}
    if args.prior:
        from studio.fashion import PRETRAINED_CLASSES, prompt_for

        prior = {"prior_preservation": True, "class_prompt": [prompt_for(c) for c in PRETRAINED_CLASSES],
                 "class_images": args.prior, "class_cache": str(work / "class-images")}
        details["prior_images_seconds"] = _class_images(args, prior)
    sampling = default_sampling(args.base)  # learning-curve samples use the evaluation's guidance and steps
    dit = _is_dit(args)
    for method in methods:
        if method not in METHODS and method != "full":
            rows.append({"method": method, "error": "not available in adapters.METHODS yet"})
            continue
        run_dir = work / f"{stamp}-{method}"
        settings = {**method_settings(method, dit), **({"batch_size": args.batch_size} if args.batch_size else {}),
                    **({"steps": args.steps} if args.steps else {}),
                    **overrides.get("all", {}), **overrides.get(method, {})}
        steps = int(settings.setdefault("steps", 300))
        config = {"base": args.base, "images": str(images), "prompt": args.prompt, "method": method,
                  "device": args.device, "out": str(run_dir), "prior_preservation": False,
                  "validate_every": args.curve_every or max(1, steps // 4), "validation_prompts": [args.prompt],
                  "validation_seeds": list(range(args.curve_images)),
                  "validation_steps": int(sampling.get("steps", 25)),
                  "validation_guidance": float(sampling.get("guidance", 2.0)),
                  "checkpoint_every": steps, "keep_checkpoints": 1, "seed": 0, "cpu_threads": args.threads,
                  **prior, **settings}
        print(f"[subject] {method}: training {steps} steps -> {run_dir}", file=sys.stderr, flush=True)
        outcome = _train_in_subprocess(config, run_dir)
        if "error" in outcome:
            rows.append({"method": method, "error": outcome["error"], "wall_seconds": outcome["wall_seconds"]})
            _save(args, rows, curves, details, images)
            continue
        from studio.files import read_jsonl
        from studio.train import run_status

        status = run_status(run_dir)
        peak = max((r.get("peak_mem_mb") or 0 for r in read_jsonl(run_dir / "log.jsonl")), default=None)
        print(f"[subject] {method}: evaluating", file=sys.stderr, flush=True)
        scores = _evaluate(args, method, run_dir, evaluate_base)
        curves[method] = _curve(run_dir, evaluator, HELD_OUT)
        details[method] = {"config": config, "status": status, "eval": scores}
        rows.append({"method": method, "steps": steps, "lr": config["lr"], "trainable_params": status.get("trainable_params"),
                     "adapter_bytes": status.get("result_bytes"), "wall_seconds": outcome["wall_seconds"],
                     "train_seconds": status.get("seconds"), "peak_mem_mb": peak,
                     "subject_accuracy": round(scores["held_out_accuracy"], 3),
                     "prior_accuracy": round(scores["prompt_accuracy"], 3),
                     "prior_delta": round(scores["prompt_accuracy"] - base["prompt_accuracy"], 3),
                     "fd": round(scores["fd"], 3)})
        _save(args, rows, curves, details, images)
    return _result(args, rows, curves, details, images)


def _save(args, rows, curves, details, images):
    """A long benchmark keeps what it has measured (failures too) if it is stopped part-way."""
    if args.json:
        from studio.files import write_json

        write_json(args.json, _result(args, rows, curves, details, images))


def _result(args, rows, curves, details, images) -> dict:
    if details.get("protocol") == "defaults":
        columns = ["method", "steps", "lr", "rank", "targets", "batch_size", "class_prompt", "class_images",
                   "trainable_params", "wall_seconds", "subject_accuracy", "prior_accuracy", "prior_delta", "fd",
                   "meets_target", "error"]
    else:
        columns = ["method", "steps", "lr", "trainable_params", "adapter_bytes", "wall_seconds", "peak_mem_mb",
                   "subject_accuracy", "prior_accuracy", "prior_delta", "fd", "error"]
    return {"rows": rows, "columns": columns, "curves": curves, "details": details, "prior_images": None if details.get("protocol") == "defaults" else args.prior,
            "subject_prompt": args.prompt, "per_class": args.per_class, "images": str(images),
            "notes": ("subject_accuracy = share of subject-prompt images the evaluator calls the held-out class; "
                      "prior_accuracy = prompt accuracy on the 9 pretrained classes (delta vs the base model); "
                      "fd = FD-classifier of the pretrained-class images (a stand-in for FID); wall_seconds includes "
                      "process start, model load and validation samples; peak_mem_mb is the training process's "
                      "peak RSS on CPU (or CUDA allocated memory on GPU)")}

