"""High resolution: DiffuseHigh against direct sampling at the same size and steps (and a bicubic upscale).

Per method and size: wall time per image (DiffuseHigh's includes its native stage and every earlier
stage), the evaluator's prompt accuracy and FD on the result downscaled to the native size (stand-ins
for CLIP score and FID), low-band PSNR against the native image of the same seed (does the layout
survive?) and the share of spectral energy above the native Nyquist frequency (detail a plain upscale
cannot have).
"""
import time

import torch


def add_arguments(p):
    p.add_argument("--base", default="embedded", help="the model (embedded, embedded-dit, or a diffusers folder)")
    p.add_argument("--scales", default="2,4", help="factors of the native size, comma-separated")
    p.add_argument("--per-class", type=int, default=4, help="images per prompt class")
    p.add_argument("--steps", type=int, default=25, help="steps of every sampler (DiffuseHigh's stages use strength of them)")
    p.add_argument("--guidance", type=float, default=None, help="CFG (default: the model's own)")
    p.add_argument("--scheduler", default=None, help="sampler name (default: the model's own)")
    p.add_argument("--strength", type=float, default=0.3, help="DiffuseHigh re-noise strength")
    p.add_argument("--guidance-steps", type=float, default=1 / 3,
                   help="DiffuseHigh: structure-guided fraction of each stage's denoising steps, in [0, 1] "
                        "(default 1/3: the authors' 5 of 15)")
    p.add_argument("--stage-guidance", type=float, default=None, help="CFG of the hires stages (default: --guidance)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--grid", default=None, help="also write a picture grid PNG here (rows: classes, columns: methods)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a crowded machine)")


def _display(images: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour to a common display size, so pixels stay visible."""
    return torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")


def write_grid(path, columns: dict, classes: list):
    """columns: name -> list (one per class) of (3, H, W) tensors in [0, 1]; labels on top."""
    from PIL import Image, ImageDraw

    from pipelines.diffuse_high import _to_pil

    size = max(max(t.shape[-1] for t in cells) for cells in columns.values())
    label_h, pad = 14, 2
    width = len(columns) * (size + pad) + pad
    height = label_h + len(classes) * (size + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for j, (name, cells) in enumerate(columns.items()):
        x = pad + j * (size + pad)
        draw.text((x + 2, 1), name, fill="black")
        for i, cell in enumerate(cells):
            grid.paste(_to_pil(_display(cell[None], size))[0], (x, label_h + pad + i * (size + pad)))
    from studio.files import atomic_path

    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def run(args):
    from pipelines import load_pipeline
    from pipelines.diffuse_high import diffusehigh, parse_scales
    from pipelines.image_metrics import hf_energy_ratio, low_band_psnr, resize
    from pipelines.text2image import GenerationSettings, generate_from, native_size, seeded_generators
    from studio.evaluate import default_sampling, load_evaluator
    from studio.fashion import PRETRAINED_CLASSES, prompt_for

    if args.threads:
        torch.set_num_threads(int(args.threads))
    pipe = load_pipeline(args.base, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    model = default_sampling(args.base)
    guidance = float(args.guidance if args.guidance is not None else model.get("guidance", 2.0))
    scheduler = args.scheduler or model.get("scheduler", "default")
    scales = parse_scales(args.scales)
    native = native_size(pipe)
    evaluator = load_evaluator()
    n = int(args.per_class)

    # method -> size -> {"images": [...], "classes": [...], "seconds": float}
    results = {}
    stage_steps = {}  # hires size -> (guided steps, denoising steps) of that stage

    def record(method, size, images, name, seconds):
        entry = results.setdefault(method, {}).setdefault(size, {"images": [], "classes": [], "seconds": 0.0})
        entry["images"].append(images)
        entry["classes"] += [name] * len(images)
        entry["seconds"] += seconds

    for k, name in enumerate(PRETRAINED_CLASSES):
        prompt, seed = prompt_for(name), int(args.seed) + k * n
        out = diffusehigh(pipe, prompt, scales, num_inference_steps=args.steps, guidance_scale=guidance,
                          generator=seeded_generators(seed, n), num_images_per_prompt=n, scheduler=scheduler,
                          strength=args.strength, guidance_steps=args.guidance_steps,
                          stage_guidance=args.stage_guidance, output_type="pt")
        record("native", native, out.stages[0], name, out.seconds[0])
        for stage, (size, _) in enumerate(out.sizes[1:], start=1):
            stage_steps[size] = (out.guided_steps[stage], out.steps[stage])
            record("DiffuseHigh", size, out.stages[stage], name, out.seconds[stage])
            upscaled = torch.nn.functional.interpolate(out.stages[0], size=(size, size), mode="bicubic",
                                                       align_corners=False).clamp(0, 1)
            record("bicubic", size, upscaled, name, out.seconds[0])
            settings = GenerationSettings(prompt=prompt, steps=args.steps, guidance=guidance, seed=seed,
                                          height=size, width=size, num_images=n, scheduler=scheduler)
            started = time.perf_counter()
            direct = generate_from(pipe, settings, output_type="pt").float().cpu()
            record("direct", size, direct, name, time.perf_counter() - started)
        print(f"  {name}: done", flush=True)

    natives = torch.cat(results["native"][native]["images"])
    rows, grid = [], {}
    direct_seconds = {size: v["seconds"] for size, v in results.get("direct", {}).items()}
    for method in ("native", "bicubic", "direct", "DiffuseHigh"):
        for size, entry in sorted(results.get(method, {}).items()):
            images = torch.cat(entry["images"])
            small = resize(images, (native, native))
            count = len(images)
            row = {"method": method, "size": f"{size}x{size}", "scale": size / native,
                   "wall_s_per_image": entry["seconds"] / count,
                   "prompt_acc": 100.0 * evaluator.prompt_accuracy(small, entry["classes"]),
                   "fd": evaluator.fd(small),
                   "lowband_psnr_db": float(low_band_psnr(images, natives).mean()) if method != "native" else None,
                   "hf_energy": float(hf_energy_ratio(images, cutoff=native / size).mean()) if size > native else None}
            if size in direct_seconds and method != "native":
                row["time_vs_direct"] = entry["seconds"] / direct_seconds[size]
            rows.append(row)
            grid[f"{method} {size}"] = [images[i * n] for i in range(len(PRETRAINED_CLASSES))]
    if args.grid:
        order = [f"native {native}"] + [f"{m} {s}" for s in sorted(direct_seconds) for m in ("direct", "DiffuseHigh")]
        write_grid(args.grid, {key: grid[key] for key in order if key in grid}, PRETRAINED_CLASSES)
    columns = ["method", "size", "wall_s_per_image", "time_vs_direct", "prompt_acc", "fd", "lowband_psnr_db", "hf_energy"]
    return {"rows": rows, "columns": columns,
            "settings": {"base": args.base, "scales": list(scales), "per_class": n, "steps": args.steps,
                         "guidance": guidance, "scheduler": scheduler, "strength": args.strength,
                         "guidance_steps": args.guidance_steps, "stage_guidance": args.stage_guidance,
                         "guided_steps": {f"{size}x{size}": f"{guided} of {count}"
                                          for size, (guided, count) in sorted(stage_steps.items())},
                         "seed": args.seed, "classes": PRETRAINED_CLASSES, "native": native,
                         "hf_energy": "share of spectral energy above the native Nyquist frequency (cutoff native/size)"}}
