"""gpu: SD1.5-shaped UNet training steps per adapter vs PEFT LoRA vs full fine-tuning; sampling with xformers vs SDPA.

On CUDA: the UNet from SD1.5's published config (random init unless --base names a local folder), 64x64
latents (512x512 images), bf16 base weights with fp32 adapter parameters, batch 1 and 4. On a CPU it runs a
small UNet of the same block layout in fp32 so the suite itself stays testable; `--sd15 --latent 32` runs the
SD1.5 UNet on a CPU for its memory column (CPU peak = bytes of every live tensor: the model, optimiser state
and what a step allocates, counted by studio.bench.live_memory).

SaRA on a random-init UNet selects its entries by fraction (5.8%, the paper's ~50M of 860M at θ = 2e-3 on the
pretrained SD1.5 weights): θ = 2e-3 on random weights would select 17.8%, a different method setting.
"""
import argparse
import statistics
import time

import torch

# SD1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), the fields that shape compute.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SMALL_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=4,
                  sample_size=16, norm_num_groups=16)
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TOKENS = 77


def add_arguments(p):
    p.add_argument("--methods", default="lora,dora,loldu,flora,sara,tlora",
                   help="our adapter methods to time (peft-lora and full are always added)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row (after 3 warm-up steps)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--base", default=None, help="a local diffusers folder whose UNet to use instead of random init")
    p.add_argument("--small", action="store_true", help="use the small UNet even on CUDA (for testing)")
    p.add_argument("--sd15", action="store_true", help="use the SD1.5 UNet even on a CPU (memory column)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default: the UNet's, 64 for SD1.5)")
    p.add_argument("--compile", action="store_true", help="also time each variant with torch.compile(unet)")
    p.add_argument("--channels-last", action="store_true", help="UNet and latents in channels-last memory order")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="add the peft-lora and full fine-tuning rows (--no-baselines: only --methods)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _build_unet(args, device, dtype):
    from diffusers import UNet2DConditionModel

    if args.base:
        unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    else:
        config = SD15_UNET if _sd15(args, device) else SMALL_UNET
        torch.manual_seed(0)
        with torch.device(device):  # initialise in place: an 860M UNet is slow to build on the CPU
            unet = UNet2DConditionModel(**config)
    return unet.to(device=device, dtype=dtype)


def _lora_rank_for(args, device, budget: int) -> int:
    """The LoRA rank (attention projections) whose trainable count is closest to `budget`: the SaRA paper
    compares methods at equal parameter budgets (5M / 20M / 50M)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(args.base, subfolder="unet") if args.base else \
        (SD15_UNET if _sd15(args, device) else SMALL_UNET)
    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel.from_config(config) if args.base else UNet2DConditionModel(**config)
    per_rank = sum(m.in_features + m.out_features for name, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in ATTN_TARGETS))
    return max(1, round(budget / per_rank))


def _variant(spec, rows, args, device):
    """'lora' -> ('lora', --rank); 'lora@r64' -> rank 64; 'lora@sara' -> the rank matching the SaRA row's
    trainable count (measured earlier in this run)."""
    method, _, rank = spec.partition("@")
    if not rank:
        return method, args.rank
    if rank.startswith("r") and rank[1:].isdigit():
        return method, int(rank[1:])
    if rank == "sara":
        counts = [row["trainable_params"] for row in rows if row.get("variant") == "sara" and "trainable_params" in row]
        if not counts:
            raise ValueError(f"{spec}: list sara before it in --methods (its trainable count sets the rank)")
        return method, _lora_rank_for(args, device, counts[-1])
    raise ValueError(f"{spec}: write METHOD, METHOD@rN or METHOD@sara")


def _sd15(args, device) -> bool:
    return not getattr(args, "small", False) and (device.type == "cuda" or getattr(args, "sd15", False))


# SaRA's selection on a random-init UNet: the paper's count on pretrained SD1.5 (θ = 2e-3 ≈ 50M of 860M).
SARA_RANDOM_INIT = {"fraction": 0.058}


def _prepare(unet, variant, rank, pretrained=False):
    """Freeze the base, add the variant's trainable parameters (kept in fp32), return them."""
    unet.requires_grad_(False)
    if variant == "full":
        unet.requires_grad_(True)
        return [p for p in unet.parameters()]
    if variant == "peft-lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ATTN_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return params
    from adapters import AdapterConfig, attach

    targets = "all" if variant == "sara" else "attn"
    options = SARA_RANDOM_INIT if variant == "sara" and not pretrained else {}
    handle = attach(unet, AdapterConfig(method=variant, rank=rank, targets=targets, options=dict(options)), name="bench")
    params = list(handle.trainable_parameters())
    for p in params:
        p.data = p.data.float()
    return params


def _flops_per_step(unet, inputs):
    """FLOPs of one forward+backward, counted by torch's FlopCounterMode (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = unet(*inputs).sample
        out.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _train_row(args, variant, batch, device, dtype, compile_unet=False, rank=None):
    import gc

    gc.collect()  # earlier rows' modules hold reference cycles: free them before measuring this row
    if device.type == "cuda":
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    unet = _build_unet(args, device, dtype)
    rank = rank or args.rank
    params = _prepare(unet, variant.partition("@")[0], rank, pretrained=bool(args.base))
    unet.train()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    unet.to(memory_format=layout)
    model = torch.compile(unet) if compile_unet else unet
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = args.latent or unet.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(batch, 4, size, size, generator=gen).to(device, dtype).to(memory_format=layout)
    text = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, generator=gen).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    target = torch.randn(batch, 4, size, size, generator=gen).to(device, dtype)

    def step():
        pred = model(latents, timesteps, text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if device.type == "cuda" else 1):  # on a CPU one step creates the optimiser state: enough
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else cpu_peak_bytes(unet, optimizer, step) / 2**20
    flops = _flops_per_step(unet, (latents, timesteps, text))
    seconds = statistics.median(times)
    ranked = variant.partition("@")[0] not in ("sara", "full")
    row = {"variant": variant + ("+compile" if compile_unet else ""), "batch": batch, "rank": rank if ranked else None, "resident_before_mib": resident, "trainable_params": sum(p.numel() for p in params),
           "step_ms": 1000 * seconds, "peak_mem_mib": peak, "tflops": flops / seconds / 1e12}
    del unet, optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def resident_tensors(model, optimizer) -> list:
    """The tensors a training step starts with: weights, buffers, optimiser state, and the gradients of earlier
    micro-batches when it accumulates."""
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [*model.parameters(), *model.buffers(), *state, *grads]


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each storage once (views and shared tensors share it)."""
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def cpu_peak_bytes(model, optimizer, step) -> int:
    """What max_memory_allocated reports on CUDA, for a CPU: resident tensors (weights, buffers, optimiser
    state) plus the peak of the tensors one more step allocates. `studio plan --measure` measures with it; the
    plan's prediction counts the same way on fake tensors."""
    from studio.bench.live_memory import LiveTensorBytes

    resident = resident_tensors(model, optimizer)
    with LiveTensorBytes().ignore(resident) as meter:
        step()
    return storage_bytes(resident) + meter.peak


def _sampling_row(args, attention, device, dtype, batch=4):
    """Images/s for `batch` images at --sample-steps DDIM steps with CFG (2 UNet rows per image) plus VAE decode."""
    from diffusers import AutoencoderKL, DDIMScheduler

    unet = _build_unet(args, device, dtype).eval()
    if attention == "xformers":
        # Set the processor directly: diffusers' enable_xformers probe runs an fp32 query, which builds of
        # xformers without their own CUDA kernels refuse even though the bf16 path (PyTorch's flash op) works.
        from diffusers.models.attention_processor import XFormersAttnProcessor

        unet.set_attn_processor(XFormersAttnProcessor())
    vae_config = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    if device.type != "cuda" or args.small:
        vae_config.update(block_out_channels=(16, 32, 32, 32), norm_num_groups=16)
    vae = AutoencoderKL(**vae_config).to(device, dtype).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    size = args.latent or unet.config.sample_size
    text = torch.randn(2 * batch, TEXT_TOKENS, unet.config.cross_attention_dim).to(device, dtype)

    @torch.no_grad()
    def sample():
        scheduler.set_timesteps(args.sample_steps, device=device)
        latents = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
        for t in scheduler.timesteps:
            eps = unet(torch.cat([latents] * 2), t, text).sample
            uncond, cond = eps.chunk(2)
            latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
        return vae.decode(latents / 0.18215).sample

    sample()
    _sync(device)
    start = time.perf_counter()
    runs = 2
    for _ in range(runs):
        sample()
    _sync(device)
    seconds = (time.perf_counter() - start) / runs
    return {"variant": f"sampling-{attention}", "batch": batch, "images_per_s": batch / seconds,
            "seconds_per_batch": seconds}


def _bf16_peak_tflops(device):
    """Measured bf16 matmul peak (8192^3, median of 10 after warm-up): the denominator for utilisation."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def run(args):
    from pipelines.loading import quiet_libraries, use_tf32

    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_tf32(device)
    batches = [int(b) for b in args.batches.split(",")]
    variants = [m for m in args.methods.split(",") if m]
    variants += [v for v in ("peft-lora", "full") if v not in variants and args.baselines]
    rows = []
    for batch in batches:
        for variant in variants:
            try:
                _, rank = _variant(variant, [r for r in rows if r.get("batch") == batch], args, device)
                rows.append(_train_row(args, variant, batch, device, dtype, rank=rank))
                if args.compile:
                    rows.append(_train_row(args, variant, batch, device, dtype, compile_unet=True, rank=rank))
            except torch.OutOfMemoryError:
                rows.append({"variant": variant, "batch": batch, "note": "out of memory"})
                torch.cuda.empty_cache()
            except RuntimeError as exc:  # a method that cannot run in this precision: report, keep going
                rows.append({"variant": variant, "batch": batch, "note": str(exc).splitlines()[0][:120]})
    attentions = ["sdpa"]
    try:
        import xformers.ops  # noqa: F401

        if device.type == "cuda":
            attentions.append("xformers")
    except ImportError:
        pass
    for attention in attentions:
        try:
            rows.append(_sampling_row(args, attention, device, dtype))
        except (RuntimeError, NotImplementedError) as exc:
            rows.append({"variant": f"sampling-{attention}", "note": str(exc).splitlines()[0][:120]})
    peak = _bf16_peak_tflops(device)
    for row in rows:
        if "tflops" in row and peak == peak:
            row["util_of_bf16_peak"] = row["tflops"] / peak
    unet_kind = "SD1.5 config" if _sd15(args, device) else "small UNet (SD1.5 block layout)"
    side = args.latent or (64 if unet_kind == "SD1.5 config" else 16)
    return {"rows": rows, "bf16_peak_tflops": peak, "unet": args.base or unet_kind, "dtype": str(dtype),
            "channels_last": bool(args.channels_last),
            "resolution": f"{side}x{side} latents ({8 * side}x{8 * side})",
            "sara_selection": "threshold (pretrained base)" if args.base else SARA_RANDOM_INIT,
            "columns": ["variant", "batch", "rank", "trainable_params", "step_ms", "peak_mem_mib", "tflops",
                        "util_of_bf16_peak", "images_per_s", "note"]}
