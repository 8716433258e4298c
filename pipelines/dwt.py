"""One-level 2-D discrete wavelet transform in torch (fp32), matching PyWavelets' dwt2/idwt2 with
mode="symmetric": coefficient length floor((N + F - 1) / 2) per axis (F = filter length) and exact inverse.

DiffuseHigh takes the low band (LL) of an image as its structure reference; the transform must be
exact so that swapping LL changes nothing else.
"""
import math

import torch
import torch.nn.functional as F

# Reconstruction low-pass taps (PyWavelets `Wavelet(name).rec_lo`, i.e. Daubechies' published
# coefficients normalised to sum sqrt(2)). The other three filters follow by the quadrature-mirror rules
# in filter_bank(), exactly as PyWavelets derives them.
RECONSTRUCTION_LOWPASS = {
    "haar": (1 / math.sqrt(2), 1 / math.sqrt(2)),
    "db4": (0.23037781330885523, 0.7148465705525415, 0.6308807679295904, -0.02798376941698385,
            -0.18703481171888114, 0.030841381835986965, 0.032883011666982945, -0.010597401784997278),
}
WAVELETS = tuple(RECONSTRUCTION_LOWPASS)


def filter_bank(wavelet: str = "db4"):
    """-> (dec_lo, dec_hi, rec_lo, rec_hi) as float64 tensors, PyWavelets' conventions."""
    if wavelet not in RECONSTRUCTION_LOWPASS:
        raise ValueError(f"unknown wavelet '{wavelet}': choose one of {', '.join(WAVELETS)}")
    rec_lo = torch.tensor(RECONSTRUCTION_LOWPASS[wavelet], dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** (k + 1) for k in range(len(rec_lo))], dtype=torch.float64)
    dec_hi = signs * rec_lo
    return rec_lo.flip(0), dec_hi, rec_lo, dec_hi.flip(0)


def _symmetric_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a half-sample symmetric extension (x[-1] = x[0]) by `pad` on each side; any n >= 1."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _analysis_last(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """1-D analysis along the last axis -> (low, high), each (..., floor((N + F - 1) / 2))."""
    n, taps = x.shape[-1], lo.numel()
    extended = x.index_select(-1, _symmetric_index(n, taps - 1, x.device))[..., 1:]
    # PyWavelets convolves (flipped taps) and keeps every odd output; conv1d correlates, hence the flip.
    weight = torch.stack([lo.flip(0), hi.flip(0)])[:, None, :].to(x)
    out = F.conv1d(extended.reshape(-1, 1, extended.shape[-1]), weight, stride=2)
    out = out[..., : (n + taps - 1) // 2]
    low, high = out[:, 0], out[:, 1]
    shape = x.shape[:-1] + (low.shape[-1],)
    return low.reshape(shape), high.reshape(shape)


def _synthesis_last(low: torch.Tensor, high: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, length: int):
    """Inverse of _analysis_last: upsample, filter, sum, keep the `length` samples PyWavelets keeps."""
    taps = lo.numel()
    coeffs = torch.stack([low, high], dim=-2).reshape(-1, 2, low.shape[-1])
    weight = torch.stack([lo, hi])[:, None, :].to(low)
    full = F.conv_transpose1d(coeffs, weight, stride=2)
    out = full[..., taps - 2: taps - 2 + length]
    return out.reshape(low.shape[:-1] + (length,))


def _along_height(fn, *tensors):
    """Apply a last-axis function to the height axis (-2)."""
    result = fn(*(t.transpose(-1, -2) for t in tensors))
    if isinstance(result, tuple):
        return tuple(r.transpose(-1, -2) for r in result)
    return result.transpose(-1, -2)


def dwt2(x: torch.Tensor, wavelet: str = "db4"):
    """x (..., H, W) -> (LL, highs): LL (..., h, w); highs (..., 3, h, w) in PyWavelets order
    (cH: detail along H, cV: detail along W, cD: diagonal). Computed in fp32."""
    dec_lo, dec_hi, _, _ = filter_bank(wavelet)
    x = x.float()
    lo_w, hi_w = _analysis_last(x, dec_lo, dec_hi)
    ll, hl = _along_height(lambda t: _analysis_last(t, dec_lo, dec_hi), lo_w)  # hl: high along H
    lh, hh = _along_height(lambda t: _analysis_last(t, dec_lo, dec_hi), hi_w)  # lh: high along W
    return ll, torch.stack([hl, lh, hh], dim=-3)


def idwt2(ll: torch.Tensor, highs: torch.Tensor, size, wavelet: str = "db4") -> torch.Tensor:
    """Inverse of dwt2. size = (H, W) of the original (odd sizes cannot be told from the coefficients)."""
    _, _, rec_lo, rec_hi = filter_bank(wavelet)
    height, width = int(size[0]), int(size[1])
    ll, highs = ll.float(), highs.float()
    hl, lh, hh = highs.unbind(dim=-3)
    lo_w = _along_height(lambda a, b: _synthesis_last(a, b, rec_lo, rec_hi, height), ll, hl)
    hi_w = _along_height(lambda a, b: _synthesis_last(a, b, rec_lo, rec_hi, height), lh, hh)
    return _synthesis_last(lo_w, hi_w, rec_lo, rec_hi, width)


def low_band(x: torch.Tensor, wavelet: str = "db4") -> torch.Tensor:
    """The LL band of dwt2 (the image's coarse structure), fp32."""
    return dwt2(x, wavelet)[0]
