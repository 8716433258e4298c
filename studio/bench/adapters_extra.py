"""Rows that adapters-micro's one-row-per-method loop cannot give: full fine-tuning (the memory ceiling
SaRA must stay under), SaRA at the paper's setting (every tensor of the UNet, a budget given as a
fraction of its scalars) and TLoRA at the paper's two SD1.5 configurations, TLoRA(2,6) and TLoRA*(2,4).

`extra_rows(label, unet, batch, measure, args, device)` returns row dicts shaped like adapters-micro's
(model, method, rank, trainable, file_bytes, step_ms, memory_MB) plus peak_live_MB: the peak bytes of
tensors alive during one training step beyond the frozen weights (studio.bench.live_memory; on CUDA the
peak allocated bytes instead), which also counts what a step builds and frees (SaRA's adapted weights,
gradients before AdamW consumes them).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

# (row name, AdapterConfig keywords). SaRA's fractions are the paper's SD1.5 budgets, 5M and 50M of 860M.
SETTINGS = [
    ("sara all 0.6%", dict(method="sara", targets="all", options={"fraction": 0.0058})),
    ("sara all 5.8%", dict(method="sara", targets="all", options={"fraction": 0.058})),
    ("tlora(2,6)", dict(method="tlora", rank=6, alpha=1.0, rslora=True, targets="attn",
                        options={"transform_rank": 2, "residual": "tr"})),
    ("tlora*(2,4)", dict(method="tlora", rank=4, alpha=1.0, rslora=True, targets="attn",
                         options={"transform_rank": 2, "residual": "lora"})),
    ("lora attn", dict(method="lora", rank=4, targets="attn")),
]


def _peak_live_mb(model, params, batch, device) -> float:
    """Peak over two training steps (the second one also holds AdamW's moments)."""
    from contextlib import nullcontext

    from studio.bench.live_memory import LiveTensorBytes

    opt = torch.optim.AdamW(params, lr=1e-4)
    tensors = [t for t in batch.values() if torch.is_tensor(t)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    meter = LiveTensorBytes().ignore(model.parameters(), model.buffers(), tensors)
    with meter if device.type != "cuda" else nullcontext():
        for _ in range(2):
            model(**batch, return_dict=False)[0].float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    return meter.peak / 2**20


def extra_rows(label, unet, batch, measure, args, device) -> list[dict]:
    from adapters import AdapterConfig, attach, save_adapter

    rows = []
    # full fine-tuning: every parameter trains
    unet.requires_grad_(True)
    params = list(unet.parameters())
    step_ms, mem = measure(unet, params, batch, args, device)
    rows.append({"model": label, "method": "full", "rank": "-", "trainable": sum(p.numel() for p in params),
                 "file_bytes": sum(p.numel() * p.element_size() for p in params), "step_ms": step_ms, "memory_MB": mem,
                 "peak_live_MB": _peak_live_mb(unet, params, batch, device)})
    unet.requires_grad_(False)
    for name, kwargs in SETTINGS:
        handle = attach(unet, AdapterConfig(**kwargs), name="bench-extra")
        params = handle.trainable_parameters()
        step_ms, mem = measure(unet, params, batch, args, device)
        peak = _peak_live_mb(unet, params, batch, device)
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(unet, tmp, name="bench-extra")
            size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        handle.detach()
        rows.append({"model": label, "method": name, "rank": kwargs.get("rank", "-"),
                     "trainable": sum(p.numel() for p in params), "file_bytes": size, "step_ms": step_ms,
                     "memory_MB": mem, "peak_live_MB": peak})
    return rows
