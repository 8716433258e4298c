"""Image measures for high-resolution and one-step sampling: how much high-frequency detail an image has,
and how well its coarse structure agrees with a reference. Images: PIL list or a (B, C, H, W) tensor in [0, 1].
"""
import numpy as np
import torch
import torch.nn.functional as F

from pipelines.dwt import low_band


def to_tensor(images) -> torch.Tensor:
    """PIL image(s) or a tensor -> float32 (B, C, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float() if images.dim() == 4 else images.float()[None]
    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def resize(images, size) -> torch.Tensor:
    """Antialiased bilinear resize to size = (H, W); a downscale averages instead of aliasing."""
    x = to_tensor(images)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def hf_energy_ratio(images, cutoff: float = 0.5) -> torch.Tensor:
    """Per image: spectral energy above `cutoff` (a fraction of the Nyquist radius, 0..1) over all
    energy except the mean (DC), summed over channels. Shape (B,). Sharp detail -> larger values."""
    if not 0.0 <= cutoff <= 1.0:
        raise ValueError(f"cutoff is a fraction of the Nyquist frequency in [0, 1], got {cutoff}")
    x = to_tensor(images)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(dim=1)  # (B, H, W)
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    radius = torch.sqrt(fx ** 2 + fy ** 2) / 0.5  # 1.0 = Nyquist along an axis
    high = (power * (radius > cutoff)).sum(dim=(-2, -1))
    return high / power.sum(dim=(-2, -1)).clamp_min(1e-12)


def low_band_psnr(images, reference, wavelet: str = "db4") -> torch.Tensor:
    """Per image: PSNR (dB) between the wavelet low bands of `images` (resized to the reference's size)
    and of `reference`. Measures agreement of coarse structure, ignoring added detail. Shape (B,)."""
    ref = to_tensor(reference)
    x = resize(images, ref.shape[-2:])
    # A 2-D orthonormal low band has gain 2 on a constant: halve so the peak value stays 1.
    error = (low_band(x, wavelet) - low_band(ref, wavelet)).div(2).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / error.clamp_min(1e-12))
