"""adapters-micro: every adapter method's trainable params, file size, step time and memory against PEFT LoRA.

Models: the embedded UNet (assets/embedded; if it is not there yet, the tiny SD UNet from pipelines.tiny,
named as such) and a UNet built from SD1.5's published config (random init; 860M parameters) at a reduced
latent size on CPU. Each row is one adapter on the same targets and rank: a training step is
zero_grad + forward + MSE loss + backward + AdamW step; the time is the median over --steps steps after
--warmup steps. Memory: on CUDA the peak allocated bytes of a step; on CPU the bytes the step must hold
beyond the frozen weights: activations saved for backward (unique storages, model parameters excluded)
+ trainable parameters, their gradients and AdamW's two moments.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
TEXT_TOKENS = 77


def add_arguments(p):
    p.add_argument("--methods", default=None, help="comma list (default: every method in adapters.METHODS)")
    p.add_argument("--models", default="embedded,sd15", help="comma list of: embedded, sd15")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="attn", help="preset or comma list of module names (same for PEFT)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sd15-latent", type=int, default=16, help="SD1.5 latent side (64 = 512px; 16 keeps CPU runs short)")
    p.add_argument("--extra-rows", action="store_true", help="also full fine-tuning, SaRA on every tensor at the paper's "
                   "budgets, TLoRA(2,6)/TLoRA*(2,4), with peak_live_MB (studio/bench/adapters_extra.py)")


def _models(names, args):
    from diffusers import UNet2DConditionModel

    for name in names:
        if name == "embedded":
            if (Path("assets/embedded") / "model_index.json").is_file():
                from pipelines import load_pipeline

                yield "embedded", load_pipeline("embedded").unet.float(), None, "assets/embedded"
            else:
                from pipelines.tiny import tiny_sd_pipeline

                yield "tiny-sd (embedded missing)", tiny_sd_pipeline().unet.float(), None, "assets/embedded not built yet"
        elif name == "sd15":
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD15_UNET)
            yield "sd15-shaped", unet, args.sd15_latent, f"random init, latent {args.sd15_latent}x{args.sd15_latent}"
        else:
            raise ValueError(f"unknown model {name!r} for adapters-micro: use embedded, sd15")


def _inputs(unet, batch, side, device):
    cfg = unet.config
    side = side or cfg.sample_size
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device),
                timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.cross_attention_dim, generator=g).to(device))


class _SavedBytes:
    """Sum of unique tensor storages autograd saves for backward, excluding the model's parameters."""

    def __init__(self, model):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = {}

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self):
        return sum(self.seen.values())


def _measure(model, params, batch, args, device):
    opt = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(model(**batch, return_dict=False)[0].detach())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, saved = [], 0
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        counter = _SavedBytes(model)
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = torch.nn.functional.mse_loss(model(**batch, return_dict=False)[0], target)
        loss.backward()
        opt.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        saved = counter.total
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated()
    else:
        memory = saved + 4 * trainable_bytes  # params + grads + 2 AdamW moments
    return statistics.median(times) * 1000, memory / 2**20


def _peft_row(model, targets, rank, batch, args, device):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    step_ms, mem = _measure(model, params, batch, args, device)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, f"{tmp}/a.safetensors")
        size = Path(f"{tmp}/a.safetensors").stat().st_size
    return {"trainable": sum(p.numel() for p in params), "file_bytes": size, "step_ms": step_ms, "memory_MB": mem}


def run(args):
    from adapters import METHODS, AdapterConfig, attach, save_adapter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    targets = args.targets if "," not in args.targets and args.targets in ("attn", "attn+ff", "conv", "all") \
        else args.targets.split(",")
    rows, notes = [], {}
    for label, unet, side, note in _models(args.models.split(","), args):
        notes[label] = note
        unet = unet.to(device).train()
        batch = _inputs(unet, args.batch, side, device)
        per_model, target_names = [], None
        for method in methods:
            row = {"model": label, "method": method, "rank": args.rank}
            try:
                handle = attach(unet, AdapterConfig(method=method, rank=args.rank, targets=targets), name="bench")
            except ValueError as err:  # e.g. a method that needs options this suite does not set
                rows.append({**row, "note": str(err)})
                continue
            target_names = target_names or sorted(handle.layers)
            params = handle.trainable_parameters()
            step_ms, mem = _measure(unet, params, batch, args, device)
            with tempfile.TemporaryDirectory() as tmp:
                save_adapter(unet, tmp, name="bench")
                size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
            handle.detach()  # restores the model exactly: the next row starts from the same weights
            per_model.append({**row, "trainable": handle_count(params), "file_bytes": size, "step_ms": step_ms,
                              "memory_MB": mem})
            print(f"adapters-micro: {per_model[-1]}", file=sys.stderr, flush=True)
        if getattr(args, "extra_rows", False):
            from studio.bench.adapters_extra import extra_rows

            per_model += extra_rows(label, unet, batch, _measure, args, device)  # before PEFT is injected into unet
        peft = {"model": label, "method": "peft-lora", "rank": args.rank,
                **_peft_row(unet, target_names or targets, args.rank, batch, args, device)}
        lora = next((r for r in per_model if r["method"] == "lora"), None)
        for row in per_model + [peft]:
            row["step_vs_peft"] = row["step_ms"] / peft["step_ms"]
            row["memory_vs_peft"] = row["memory_MB"] / peft["memory_MB"]
            if lora:
                row["step_vs_lora"] = row["step_ms"] / lora["step_ms"]
                row["memory_vs_lora"] = row["memory_MB"] / lora["memory_MB"]
        rows += per_model + [peft]
        del unet
    memory_kind = "peak CUDA allocated" if device.type == "cuda" else \
        "saved activations (unique storages, excluding weights) + 4x trainable bytes (param, grad, 2 AdamW moments)"
    columns = ["model", "method", "rank", "trainable", "file_bytes", "step_ms", "memory_MB", "step_vs_peft",
               "memory_vs_peft", "step_vs_lora", "memory_vs_lora"]
    if getattr(args, "extra_rows", False):
        columns.append("peak_live_MB")
    return {"rows": rows, "columns": columns, "models": notes, "memory": memory_kind, "targets": args.targets,
            "batch": args.batch, "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup, "text_tokens": TEXT_TOKENS}


def handle_count(params):
    return sum(p.numel() for p in params)
