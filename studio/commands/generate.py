"""studio generate: prompt -> PNGs with their settings embedded."""


def add_arguments(p):
    p.add_argument("--base", default="embedded", help="embedded, embedded-dit, a diffusers folder, or a hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="default: the model's own (studio.json), else 25")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1 = off); default: the model's own (studio.json), else 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", default="default", help="default, ddim, euler, unipc, dpm++")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16")
    p.add_argument("--attention", default="auto", choices=["auto", "xformers", "sdpa"],
                   help="auto: xformers on CUDA where installed, else PyTorch SDPA")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory order (GPU convs)")
    p.add_argument("--out", required=True, help="a .png file, or a folder for numbered files")
    p.add_argument("--hires", default=None, help="DiffuseHigh: scales of the native size, e.g. 2 or 2,4 (saves the largest)")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="apply an adapter (repeatable): a studio adapter folder (runs/bag/adapter:0.8) or a LoRA "
                        ".safetensors file in kohya/A1111, diffusers/PEFT, ComfyUI or LyCORIS LoCon layout (style.safetensors:0.6)")
    p.add_argument("--one-step", default=None, metavar="ADAPTER_DIR", help="HiPA: one model call per image with this adapter")


def run(args):
    from tqdm import tqdm

    from pipelines.text2image import GenerationSettings
    from studio.generate import run_generate

    settings = GenerationSettings(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps,
                                  guidance=args.guidance, seed=args.seed, height=args.height, width=args.width,
                                  num_images=args.num_images, scheduler=args.scheduler)
    if args.hires:
        settings.extra["Hires"] = args.hires
    if args.one_step:
        if args.hires:
            raise ValueError("--one-step and --hires cannot be combined")
        settings.extra["One-step"] = args.one_step
        settings.steps, settings.guidance = 1, 1.0  # what actually runs: one call, CFG baked into the adapter
    settings.validate()
    adapters = [parse_adapter(text) for text in args.adapter]
    bars = []  # created at the first step, so loading time does not distort the rate

    def progress(step, total, latents):
        if not bars:
            bars.append(tqdm(total=total, desc="generating", unit="step", leave=False))
        bars[0].update(step - bars[0].n)

    _, paths = run_generate(settings, base=args.base, out=args.out, device=args.device, dtype=args.dtype,
                            attention=args.attention, preview=progress, preview_every=1, adapters=adapters,
                            channels_last=args.channels_last)
    for bar in bars:
        bar.close()
    for path in paths:
        print(path)
    return 0


def parse_adapter(text: str):
    """'PATH' or 'PATH:WEIGHT' -> (PATH, weight); a path that itself holds a ':' is taken whole when it exists."""
    from pathlib import Path

    path, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return path, float(weight)
    except ValueError:
        if Path(text).expanduser().exists():
            return text, 1.0
        raise ValueError(f"--adapter takes PATH or PATH:WEIGHT (a number), got {text!r}") from None
