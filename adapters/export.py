"""Export any attached adapter as a plain LoRA / LoCon file (for diffusers, A1111, ComfyUI).

Per adapted layer: ΔW (dense, in W0's shape; several adapters summed with their weights) ->
flatten to (out, in·kh·kw) -> truncated SVD U_r S_r V_rᵀ -> up = U_r·S_r (out, r[, 1, 1]),
down = V_rᵀ (r, in[, kh, kw]), alpha = r so that the loaded scale is 1. Conv layers become LoCon
(down is a kh×kw conv, up a 1×1 conv), which is exactly how diffusers/PEFT LoRA runs a Conv2d.

Formats:
  "diffusers": pytorch_lora_weights.safetensors with keys "<prefix>.<module path>.lora_A.weight" /
               ".lora_B.weight" (prefix "unet" for UNets, "transformer" for DiTs) and no alpha (scale 1), as
               diffusers' own save_lora_weights writes them: what `pipe.load_lora_weights(folder)` reads on
               SD1.x/SDXL/SD3/Flux, and the keys ComfyUI's loader reads for SD3, Flux and PixArt (diffusers has
               no LoRA loader for PixArt pipelines; peft loads the file onto the transformer).
  "kohya":     one .safetensors with "lora_unet_<path with _>.lora_down.weight", ".lora_up.weight", ".alpha"
               plus ss_* metadata (A1111, ComfyUI, diffusers' kohya conversion); every layer gets the same rank
               (smaller ones zero-padded) so any alpha fallback still gives scale 1. Other models get the prefix
               "lora_transformer" (OneTrainer's keys, which ComfyUI reads for SD3 and Flux; diffusers does not:
               give DiTs the diffusers format). PixArt has no reader of kohya keys, so that export is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapters.core import AdaptedModule, AdaptedParameter, _records
from adapters.io import _atomic_write

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def _prefix(model, fmt):
    unet = "UNet" in type(model).__name__
    if fmt == "diffusers":
        return "unet" if unet else "transformer"
    if "PixArt" in type(model).__name__:
        raise ValueError("no tool reads kohya keys for PixArt: export it with format='diffusers' "
                         "(transformer.* keys, which ComfyUI reads)")
    return "lora_unet" if unet else "lora_transformer"


def dense_deltas(model, name: str | None = None) -> tuple[dict, list[str]]:
    """module path -> (ΔW as it acts now: Σ weight·ΔW over the chosen adapters, the base module), and the
    sites that cannot become a LoRA (e.g. SaRA deltas on biases or norms)."""
    records = _records(model)
    names = list(records) if name is None else [name]
    if not names or any(n not in records for n in names):
        raise ValueError(f"no adapter {'attached' if name is None else repr(name)} to export "
                         f"(attached: {', '.join(records) or 'none'})")
    deltas, skipped = {}, []
    with torch.no_grad():
        for n in names:
            for path, site in records[n].sites.items():
                if isinstance(site, AdaptedModule):
                    module, module_path = site.base, path
                else:
                    module, module_path = site._owner, path.rpartition(".")[0]
                    if site.pname != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
                        skipped.append(path)
                        continue
                weight = site.base_weight()
                merged = site.merged.get(n)
                if merged is not None:  # the weight already holds this adapter's ΔW: take it out to see W0
                    site.unmerge(n)
                    delta = merged[0] * site.adapters[n].delta_weight(site.base_weight())
                    site.merge(n)
                else:
                    delta = site.weights[n] * site.adapters[n].delta_weight(weight)
                delta = delta.detach().float()
                if module_path in deltas:
                    deltas[module_path] = (deltas[module_path][0] + delta, module)
                else:
                    deltas[module_path] = (delta, module)
    return deltas, skipped


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (out, r), down (r, in·kh·kw), relative Frobenius error of up·down against ΔW)."""
    flat = delta.reshape(delta.shape[0], -1).float()
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, S.numel())
    up, down = U[:, :r] * S[:r], Vh[:r]
    norm = flat.norm()
    error = float((flat - up @ down).norm() / norm) if norm > 0 else 0.0
    return up, down, error


def export_lora(model, path, rank: int, format: str = "diffusers", name: str | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """Write the adapter(s) on `model` as a plain LoRA of at most `rank` per layer.
    name=None exports the sum of all attached adapters with their weights. Returns
    {"path", "format", "layers": {module path: {"rank", "relative_error"}}, "skipped": [...]}."""
    from safetensors.torch import save_file

    if format not in ("diffusers", "kohya"):
        raise ValueError(f"unknown export format {format!r}: use 'diffusers' or 'kohya'")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"export rank must be a positive integer, got {rank!r}")
    prefix = _prefix(model, format)
    deltas, skipped = dense_deltas(model, name)
    factors = {path: low_rank_factors(delta, rank) for path, (delta, _) in deltas.items()}
    # kohya files get one rank for every layer (zero-padded, ΔW unchanged): diffusers' kohya conversion
    # drops some alphas (e.g. mid_block attention) and falls back to the first layer's alpha.
    uniform = max(up.shape[1] for up, _, _ in factors.values()) if format == "kohya" else None
    tensors, report = {}, {}
    for module_path, (delta, module) in deltas.items():
        up, down, error = factors[module_path]
        report[module_path] = {"rank": up.shape[1], "relative_error": error}
        if uniform and up.shape[1] < uniform:
            pad = uniform - up.shape[1]
            up = torch.cat([up, up.new_zeros(up.shape[0], pad)], 1)
            down = torch.cat([down, down.new_zeros(pad, down.shape[1])], 0)
        r = up.shape[1]
        if delta.dim() == 4:
            up, down = up[:, :, None, None], down.reshape(r, *delta.shape[1:])
        up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
        if format == "diffusers":
            tensors[f"{prefix}.{module_path}.lora_A.weight"] = down
            tensors[f"{prefix}.{module_path}.lora_B.weight"] = up
        else:
            key = f"{prefix}_{module_path.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(r), dtype=dtype)
    path = Path(path)
    if format == "diffusers" and path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / DIFFUSERS_WEIGHTS
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "exported_from": ",".join(sorted(_records(model)) if name is None else [name])}
    if format == "kohya":  # kohya's own training metadata, which A1111 shows
        metadata.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank))
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return {"path": str(path), "format": format, "layers": report, "skipped": skipped}
