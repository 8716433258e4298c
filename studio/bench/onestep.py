"""One-step generation: HiPA at 1 step against the 25-step teacher, plain 1-step and DC-Solver at 5 steps.

Per method: prompt accuracy and Fréchet distance from the studio's evaluator (stand-ins for CLIP score
and FID), the FD to the teacher's own images, high-frequency energy relative to the teacher, wall time
per image and model calls per image. Evaluation seeds start at 10,000 so they never overlap the seeds
of the teacher pairs HiPA was trained on.
"""
import json
import time
from pathlib import Path

import torch

from pipelines.assets import shipped_hipa

EVAL_SEED = 10_000


def add_arguments(p):
    p.add_argument("--base", default="embedded", help="the model (embedded, or a diffusers folder)")
    p.add_argument("--adapter", default=None, help="the HiPA adapter folder (default: the one shipped for an embedded "
                                                   "model, assets/hipa or assets/hipa-dit)")
    p.add_argument("--per-class", type=int, default=15, help="images per prompt class")
    p.add_argument("--teacher-steps", type=int, default=None, help="default: the adapter's teacher (hipa.json)")
    p.add_argument("--dc-steps", type=int, default=5)
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG (default: the adapter's teacher, else the model's)")
    p.add_argument("--cutoff", type=float, default=0.25,
                   help="high-frequency cutoff as a fraction of Nyquist (pipelines.image_metrics.hf_energy_ratio)")
    p.add_argument("--grid", default=None, help="also write a picture grid PNG here (rows: methods, columns: classes)")
    p.add_argument("--device", default="cpu")


class CallCounter:
    """Counts denoiser forward calls (each call may carry several images)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self.handle.remove()


def teacher_settings(args) -> dict:
    """The teacher the adapter was distilled from (its hipa.json), else the model's own sampler."""
    from studio.evaluate import default_sampling

    model = {"scheduler": "default", "guidance": 2.0, **default_sampling(args.base)}
    info = Path(args.adapter) / "hipa.json"
    teacher = json.loads(info.read_text()).get("teacher") or {} if info.is_file() else {}
    return {"scheduler": teacher.get("scheduler") or "default", "steps": int(args.teacher_steps or teacher.get("steps") or 25),
            "guidance": float(args.guidance if args.guidance is not None else teacher.get("guidance") or model["guidance"]),
            "spacing": teacher.get("spacing"), "model_scheduler": model["scheduler"]}


def _methods(args, teacher):
    from pipelines.text2image import SCHEDULERS

    sampler = teacher["model_scheduler"] if teacher["scheduler"] == "default" else teacher["scheduler"]
    spacing = f", {teacher['spacing']} spacing" if teacher["spacing"] else ""
    rows = [{"name": f"teacher ({sampler}{spacing}, {teacher['steps']} steps)", "kind": "teacher", **teacher}]
    if "dc-solver" in SCHEDULERS:
        rows.append({"name": f"DC-Solver ({args.dc_steps} steps)", "kind": "multi", "scheduler": "dc-solver",
                     "steps": args.dc_steps})
    rows.append({"name": "plain base (1 step)", "kind": "one", "adapter": None})
    rows.append({"name": "HiPA (1 step)", "kind": "one", "adapter": args.adapter})
    return rows


def _generate(pipe, method, prompt, count, seed, guidance):
    from pipelines.hipa import drop_adapter, one_step, teacher_images
    from pipelines.text2image import GenerationSettings, generate_from, seeded_generators

    if method["kind"] == "one":
        if method["adapter"] is None:
            drop_adapter(pipe)
        return one_step(pipe, prompt, adapter=method["adapter"], num_images_per_prompt=count,
                        generator=seeded_generators(seed, count)).images
    drop_adapter(pipe)
    if method["kind"] == "teacher":
        return teacher_images(pipe, prompt, count, seed, method["scheduler"], method["steps"], guidance, method["spacing"])
    settings = GenerationSettings(prompt=prompt, steps=method["steps"], guidance=guidance, seed=seed,
                                  num_images=count, scheduler=method["scheduler"])
    return generate_from(pipe, settings)


def run(args):
    from pipelines import load_pipeline
    from pipelines.hipa import denoiser, drop_adapter
    from pipelines.image_metrics import hf_energy_ratio
    from studio.evaluate import frechet_distance, load_evaluator, statistics
    from studio.fashion import PRETRAINED_CLASSES, prompt_for
    from studio.hipa import adapter_summary

    if args.per_class < 2:
        raise ValueError(f"--per-class must be at least 2 (FD needs several images), got {args.per_class}")
    if args.adapter is None:
        shipped = shipped_hipa(args.base)
        if shipped is None:
            raise ValueError(f"no HiPA adapter is shipped for {args.base}: pass --adapter FOLDER "
                             f"(train one with `studio hipa --base {args.base}`)")
        args.adapter = str(shipped)
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no HiPA adapter at {args.adapter}: train one with `studio hipa --base {args.base}`")
    torch.manual_seed(0)
    pipe = load_pipeline(args.base, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    unet_params = sum(p.numel() for p in denoiser(pipe).parameters())  # before any adapter is attached
    evaluator = load_evaluator()
    teacher = teacher_settings(args)
    guidance = teacher["guidance"]
    results, grids, teacher_stats, teacher_energy = [], [], None, None
    for method in _methods(args, teacher):
        counter = CallCounter(denoiser(pipe))
        images_by_class, seconds = {}, 0.0
        for k, name in enumerate(PRETRAINED_CLASSES):
            start = time.perf_counter()
            images_by_class[name] = _generate(pipe, method, prompt_for(name), args.per_class,
                                              EVAL_SEED + 1000 * k, guidance)
            seconds += time.perf_counter() - start
        counter.close()
        everything = [img for images in images_by_class.values() for img in images]
        energy = float(hf_energy_ratio(everything, args.cutoff).mean())
        stats = statistics(evaluator.features(everything))
        if teacher_stats is None:
            teacher_stats, teacher_energy = stats, energy
        accuracy = sum(float(evaluator.prompt_accuracy(images_by_class[c], c)) for c in PRETRAINED_CLASSES)
        row = {"method": method["name"],
               "prompt_accuracy": accuracy / len(PRETRAINED_CLASSES),
               "fd": float(evaluator.fd(everything, "pretrained")),
               "fd_to_teacher": float(frechet_distance(*stats, *teacher_stats)),
               "hf_energy_ratio": energy,
               "hf_energy_vs_teacher": energy / max(teacher_energy, 1e-12),
               "ms_per_image": 1000 * seconds / len(everything),
               "model_calls_per_image": counter.calls / len(PRETRAINED_CLASSES)}
        results.append(row)
        grids.append([images_by_class[c][0] for c in PRETRAINED_CLASSES])
        print(f"{row['method']}: accuracy {row['prompt_accuracy']:.3f}, FD {row['fd']:.3g}", flush=True)
    teacher = results[0]
    hipa_row = results[-1]
    plain = results[-2]
    summary = {
        "hipa_accuracy_share_of_teacher": hipa_row["prompt_accuracy"] / max(teacher["prompt_accuracy"], 1e-12),
        "hipa_fd_gap_to_teacher": abs(hipa_row["fd"] - teacher["fd"]),
        "plain_fd_gap_to_teacher": abs(plain["fd"] - teacher["fd"]),
        **adapter_summary(args.adapter, unet_params),
    }
    summary["goal_met"] = bool(summary["hipa_accuracy_share_of_teacher"] >= 0.9
                               and summary["hipa_fd_gap_to_teacher"] < summary["plain_fd_gap_to_teacher"]
                               and summary["trainable_share_of_unet"] < 0.05)
    if args.grid:
        write_grid(args.grid, grids, [r["method"] for r in results], PRETRAINED_CLASSES)
    drop_adapter(pipe)
    return {"rows": results, "summary": summary, "per_class": args.per_class, "guidance": guidance, "teacher": teacher,
            "eval_seed": EVAL_SEED, "base": args.base, "adapter": str(args.adapter), "cutoff": args.cutoff,
            "columns": ["method", "prompt_accuracy", "fd", "fd_to_teacher", "hf_energy_vs_teacher", "ms_per_image",
                        "model_calls_per_image"],
            "notes": {"fd": "FD-classifier to the real test split without the held-out class (stand-in for FID)",
                      "prompt_accuracy": "share of images the studio evaluator puts in the prompt's class (stand-in for CLIP score)",
                      "hf_energy_vs_teacher": "mean hf_energy_ratio over the images divided by the teacher's",
                      "model_calls_per_image": "denoiser forward calls per image (CFG runs both halves in one batched call)"}}


def write_grid(path, rows, row_names, column_names, scale=3):
    """A picture grid: one row per method, one column per class, labels on the left and on top."""
    from PIL import Image, ImageDraw

    from studio.files import atomic_path

    cell = rows[0][0].width * scale
    left, top = 240, 16
    grid = Image.new("RGB", (left + cell * len(column_names), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(column_names):
        draw.text((left + c * cell + 2, 2), name, fill="black")
    for r, (name, images) in enumerate(zip(row_names, rows)):
        draw.text((4, top + r * cell + cell // 2 - 6), name, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * cell))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
