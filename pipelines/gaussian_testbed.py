"""Analytic test bed for samplers: Gaussian data, whose denoiser and probability-flow ODE are known exactly.

Data x_0 ~ N(mean, diag(std^2)) per coordinate. In the variables y = x / alpha and s = sigma / alpha
(diffusers' "sigmas") the PF-ODE reads dy/ds = eps(alpha y, s) and each Gaussian contributes
eps = (y - mean) s / (std^2 + s^2). Unguided, every standardised coordinate is transported unchanged;
with classifier-free guidance the ODE is still linear and we integrate it with fine RK4 in float64.

GaussianDenoiser has the UNet call signature (sample, timestep, encoder_hidden_states) so real diffusers
schedulers run on it unchanged. An all-zero text embedding means "unconditional".

FlowGaussianDenoiser is the same data under rectified flow (SD3, Flux): x = (1 − σ) x0 + σ ε at timestep σ·1000,
predicting the velocity ε − x0. It is the same ODE (y = x / (1 − σ), s = σ / (1 − σ)), so the exact solution is
shared.
"""
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn


class GaussianDenoiser(nn.Module):
    def __init__(self, mean, std, alphas_cumprod, prediction_type="epsilon", uncond_mean=None, uncond_std=None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"the Gaussian test bed predicts epsilon or v, not '{prediction_type}'")
        self.prediction_type = prediction_type
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64))
        self.register_buffer("uncond_mean", torch.zeros_like(self.mean) if uncond_mean is None
                             else torch.as_tensor(uncond_mean, dtype=torch.float64))
        self.register_buffer("uncond_std", torch.ones_like(self.std) if uncond_std is None
                             else torch.as_tensor(uncond_std, dtype=torch.float64))
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))

    def noise_to_signal(self, timestep):
        """s = sigma/alpha at a (possibly fractional) training timestep, as a float64 tensor."""
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(self.alphas_cumprod) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(self.alphas_cumprod) - 1)
        abar = self.alphas_cumprod[low] + (t - low) * (self.alphas_cumprod[high] - self.alphas_cumprod[low])
        return ((1 - abar) / abar).sqrt()

    def eps_at(self, x, s, conditional=True):
        """Exact noise prediction at state x and noise-to-signal ratio s (float64)."""
        mean, std = (self.mean, self.std) if conditional else (self.uncond_mean, self.uncond_std)
        y = x * (1 + s ** 2).sqrt()  # x / alpha
        return (y - mean) * s / (std ** 2 + s ** 2)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        x = sample.to(torch.float64)
        s = self.noise_to_signal(timestep).reshape(-1, *([1] * (x.dim() - 1)))
        eps = self.eps_at(x, s, True)
        if encoder_hidden_states is not None:
            conditional = encoder_hidden_states.flatten(1).abs().sum(1) > 0
            eps = torch.where(conditional.reshape(-1, *([1] * (x.dim() - 1))), eps, self.eps_at(x, s, False))
        if self.prediction_type == "v_prediction":
            alpha, sigma = 1 / (1 + s ** 2).sqrt(), s / (1 + s ** 2).sqrt()
            out = (alpha * eps - sigma * (x - sigma * eps) / alpha)  # v = alpha eps - sigma x0
        else:
            out = eps
        out = out.to(sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def guided(self, guidance: float = 1.0):
        """denoise(x, t) -> guided model output, the closure samplers and the ratio search call."""
        def denoise(x, t):
            s = self.noise_to_signal(t)
            xx = x.to(torch.float64)
            eps = self.eps_at(xx, s, True)
            if guidance != 1.0:
                eps = self.eps_at(xx, s, False) + guidance * (eps - self.eps_at(xx, s, False))
            if self.prediction_type == "v_prediction":
                alpha, sigma = 1 / (1 + s ** 2).sqrt(), s / (1 + s ** 2).sqrt()
                eps = alpha * eps - sigma * (xx - sigma * eps) / alpha
            return eps.to(x.dtype)
        return denoise

    def solve(self, x, s_from: float, s_to: float, guidance: float = 1.0, substeps: int = 400):
        """Exact PF-ODE solution from noise-to-signal s_from to s_to (s_to may be 0: the data)."""
        s_from, s_to = float(s_from), float(s_to)
        y = x.to(torch.float64) * (1 + s_from ** 2) ** 0.5
        if guidance == 1.0:
            ratio = ((self.std ** 2 + s_to ** 2) / (self.std ** 2 + s_from ** 2)).sqrt()
            y = self.mean + ratio * (y - self.mean)
        else:
            def slope(yy, s):
                s = torch.tensor(s, dtype=torch.float64)
                unc = (yy - self.uncond_mean) * s / (self.uncond_std ** 2 + s ** 2)
                con = (yy - self.mean) * s / (self.std ** 2 + s ** 2)
                return unc + guidance * (con - unc)

            # classic RK4; nodes uniform in asinh(s/0.05) so that both the huge-s start of cosine schedules
            # and the small-s end are resolved
            u = torch.linspace(float(np.arcsinh(s_from / 0.05)), float(np.arcsinh(s_to / 0.05)), substeps + 1,
                               dtype=torch.float64)
            nodes = (0.05 * torch.sinh(u)).tolist()
            for s, s_next in zip(nodes[:-1], nodes[1:]):
                h = s_next - s
                k1 = slope(y, s)
                k2 = slope(y + h / 2 * k1, s + h / 2)
                k3 = slope(y + h / 2 * k2, s + h / 2)
                k4 = slope(y + h * k3, s_next)
                y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return (y / (1 + s_to ** 2) ** 0.5).to(x.dtype)

    def trajectory(self, noise, sigmas, guidance: float = 1.0):
        """Exact states at every scheduler sigma: [x at sigmas[0] (= noise), ..., x at sigmas[-1]]."""
        states = [noise]
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            states.append(self.solve(states[-1], float(a), float(b), guidance))
        return states


class FlowGaussianDenoiser(GaussianDenoiser):
    """The Gaussian data under rectified flow: timesteps are σ·num_train_timesteps, the output is the velocity."""

    def __init__(self, mean, std, num_train_timesteps: int = 1000, **kwargs):
        super().__init__(mean, std, torch.ones(num_train_timesteps, dtype=torch.float64), "epsilon", **kwargs)
        self.prediction_type = "flow_prediction"
        self.num_train_timesteps = num_train_timesteps

    def _flow_sigma(self, timestep):
        return (torch.as_tensor(timestep, dtype=torch.float64) / self.num_train_timesteps).clamp(0.0, 1.0 - 1e-9)

    def _velocity(self, x, sigma, guidance: float = 1.0, conditional=None):
        s = sigma / (1 - sigma)
        x_vp = x / ((1 - sigma) * (1 + s ** 2).sqrt())  # the same point as a variance-preserving state
        eps = self.eps_at(x_vp, s, True)
        if guidance != 1.0 or conditional is not None:
            unc = self.eps_at(x_vp, s, False)
            eps = unc + guidance * (eps - unc) if conditional is None else torch.where(conditional, eps, unc)
        x0 = x / (1 - sigma) - s * eps
        return eps - x0

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        x = sample.to(torch.float64)
        sigma = self._flow_sigma(timestep).reshape(-1, *([1] * (x.dim() - 1)))
        conditional = None
        if encoder_hidden_states is not None:
            conditional = (encoder_hidden_states.flatten(1).abs().sum(1) > 0).reshape(-1, *([1] * (x.dim() - 1)))
        out = self._velocity(x, sigma, conditional=conditional).to(sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def guided(self, guidance: float = 1.0):
        def denoise(x, t):
            return self._velocity(x.to(torch.float64), self._flow_sigma(t), guidance).to(x.dtype)
        return denoise

    def solve(self, x, s_from: float, s_to: float, guidance: float = 1.0, substeps: int = 400):
        """Exact flow-ODE solution from flow σ = s_from to σ = s_to (0: the data)."""
        sig_from, sig_to = min(float(s_from), 1.0 - 1e-9), float(s_to)
        nsr_from, nsr_to = sig_from / (1 - sig_from), sig_to / (1 - sig_to)
        x_vp = x.to(torch.float64) / ((1 - sig_from) * (1 + nsr_from ** 2) ** 0.5)
        out = super().solve(x_vp, nsr_from, nsr_to, guidance, substeps).to(torch.float64)
        return (out * (1 + nsr_to ** 2) ** 0.5 * (1 - sig_to)).to(x.dtype)


def flow_gaussian_problem(shape=(2, 2, 2), seed: int = 0):
    """gaussian_problem's data (same mean and std for a seed) under rectified flow."""
    vp = gaussian_problem(shape, seed)
    return FlowGaussianDenoiser(vp.mean, vp.std)


def gaussian_problem(shape=(2, 2, 2), seed: int = 0, alphas_cumprod=None, prediction_type="epsilon"):
    """The spec's toy (d = 8): conditional mean 0.8 N(0,1), std 0.5 exp(0.3 N(0,1)); unconditional N(0, 1).
    alphas_cumprod defaults to SD's scaled-linear 0.00085 -> 0.012 schedule."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)
    std = 0.5 * torch.exp(0.3 * torch.randn(shape, generator=g, dtype=torch.float64))
    if alphas_cumprod is None:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)  # float32, exactly as diffusers builds it
    return GaussianDenoiser(mean, std, alphas_cumprod, prediction_type)


# SD3's scheduler (FlowMatchEulerDiscreteScheduler, shift 3) as its scheduler_config.json has it.
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SD_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "timestep_spacing": "linspace"}
