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
"""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ALL_METHODS = ["lora", "dora", "loldu", "flora", "sara", "tlora", "full"]
# Per-method settings tuned on this benchmark (docs/training.md has what was tried); --steps and
# --set METHOD.KEY=VALUE override them. Every run uses prior preservation unless --prior 0.
METHOD_DEFAULTS = {
    "lora": {"rank": 4, "lr": 3e-3, "targets": "attn", "steps": 600},
    "dora": {"rank": 4, "lr": 3e-3, "targets": "attn", "steps": 600},
    "loldu": {"rank": 64, "lr": 2e-3, "targets": "attn+conv", "steps": 1000},
    "flora": {"rank": 4, "lr": 3e-3, "targets": "attn", "steps": 600},
    "tlora": {"rank": 4, "lr": 3e-3, "targets": "attn", "steps": 600},
    "sara": {"rank": 4, "lr": 3e-3, "targets": "all", "steps": 600},
    "full": {"lr": 1e-4, "steps": 300},
}
# DiT denoisers (the embedded PixArt-style DiT) hold no convolutions, so "attn+conv" is attention alone there:
# LoLDU and TLoRA take the MLPs instead (tuned on embedded-dit, 2026-11-29; docs/training.md).
DIT_DEFAULTS = {
    "loldu": {"targets": "attn+ff", "steps": 600},
    "tlora": {"targets": "attn+ff", "steps": 400},
}


def add_arguments(p):
    from studio.fashion import HELD_OUT, prompt_for

    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated methods (and 'full')")
    p.add_argument("--steps", type=int, default=None, help="training steps for every method (default: each method's own)")
    p.add_argument("--base", default="embedded")
    p.add_argument("--images", default=None, help=f"subject folder (default: assets/subjects/{HELD_OUT})")
    p.add_argument("--prompt", default=prompt_for(HELD_OUT), help="instance prompt = the evaluated subject prompt")
    p.add_argument("--batch-size", type=int, default=4)
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
    for folder in sorted((run_dir / "samples").glob("step-*")):
        step = int(folder.name[5:])
        images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
        window = [loss for s, loss in losses if previous < s <= step]
        points.append({"step": step, "subject_accuracy": round(evaluator.prompt_accuracy(images, class_name), 3),
                       "loss": round(sum(window) / len(window), 4) if window else None})
        previous = step
    return points


def _evaluate(args, method, run_dir, evaluate_base):
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
    return evaluate_base(args.base, per_class=args.per_class, pipe=pipe, device=args.device, seed=args.eval_seed)


def run(args):
    from studio.evaluate import default_sampling, evaluate_base, load_evaluator
    from studio.fashion import HELD_OUT

    import torch

    from adapters import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("name at least one method with --methods")
    torch.set_num_threads(args.threads)
    overrides = _overrides(args.set)
    images = _subject_folder(args)
    work = Path(args.work) if args.work else (Path(args.json).resolve().parent if args.json else Path.cwd()) / "subject-runs"
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    evaluator = load_evaluator()

    base = evaluate_base(args.base, per_class=args.per_class, device=args.device, seed=args.eval_seed)
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
        settings = {**METHOD_DEFAULTS.get(method, {}), **(DIT_DEFAULTS.get(method, {}) if dit else {}),
                    **({"steps": args.steps} if args.steps else {}),
                    **overrides.get("all", {}), **overrides.get(method, {})}
        steps = int(settings.setdefault("steps", 300))
        config = {"base": args.base, "images": str(images), "prompt": args.prompt, "method": method,
                  "batch_size": args.batch_size, "device": args.device, "out": str(run_dir),
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
    columns = ["method", "steps", "lr", "trainable_params", "adapter_bytes", "wall_seconds", "peak_mem_mb", "subject_accuracy",
               "prior_accuracy", "prior_delta", "fd", "error"]
    return {"rows": rows, "columns": columns, "curves": curves, "details": details, "prior_images": args.prior,
            "subject_prompt": args.prompt, "per_class": args.per_class, "images": str(images),
            "notes": ("subject_accuracy = share of subject-prompt images the evaluator calls the held-out class; "
                      "prior_accuracy = prompt accuracy on the 9 pretrained classes (delta vs the base model); "
                      "fd = FD-classifier of the pretrained-class images (a stand-in for FID); wall_seconds includes "
                      "process start, model load and validation samples; peak_mem_mb is the training process's "
                      "peak RSS on CPU (or CUDA allocated memory on GPU)")}

