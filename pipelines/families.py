"""Model families: everything that depends on which kind of diffusers pipeline is loaded, written once.

A family knows, for its pipelines: every text encoder and what the denoiser needs from them (pooled
embeddings, SDXL's time ids, PixArt's attention mask, Flux's position ids and guidance embedding); the
latent space (VAE scale and shift, Flux's 2x2 packing, kept inside `predict` so callers always see
B x C x h x w latents); the model call; the training objective (ε, v or flow-matching velocity, with its
timestep density and loss weighting); x̂0 from a model output; decoding for previews.

Training, one-step training, DC-Solver fitting, DiffuseHigh, evaluation and the benches ask `family_of(pipe)`;
none of them branches on the pipeline class. A new family is one subclass here and one line in FAMILIES.

Conditioning is a dict of batch-first tensors (what `encode_text` returns); `take`, `concat` and `move` work
on it whatever the family put inside.
"""
from __future__ import annotations

import torch

SUPPORTED = "Stable Diffusion 1.x/2.x, SDXL, PixArt-α/Σ, SD3/3.5 and Flux.1"


class UnsupportedPipeline(ValueError):
    """A pipeline of no supported family; the message names the ones that are."""


# ------------------------------------------------------------------------------------ conditioning helpers

def take(cond: dict, index) -> dict:
    """Rows `index` (a LongTensor or a slice) of every tensor."""
    return {k: v[index] for k, v in cond.items()}


def concat(*conds: dict) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def move(cond: dict, device=None, dtype=None) -> dict:
    """To a device; floating tensors also to `dtype` (masks keep theirs)."""
    return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in cond.items()}


def where(mask: torch.Tensor, other: dict, cond: dict) -> dict:
    """Row-wise choice: `other`'s row where mask is True (other may have one row, broadcast), else cond's."""
    out = {}
    for k, v in cond.items():
        m = mask.reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(m, other[k].to(v.dtype).expand_as(v), v)
    return out


# ------------------------------------------------------------------------------ x̂0 from a model output
# One conversion for training objectives, DiffuseHigh's structure guidance and HiPA's student.

def predicted_x0(output, x_in, level, prediction_type):
    """x̂0 from a model output at noise level `level` = (kind, α, σ): "vp" (x = αx0 + σε) or "flow" (x = (1-σ)x0 + σε)."""
    kind, alpha, sigma = level
    if kind == "flow":
        return x_in - sigma * output
    if prediction_type == "epsilon":
        return (x_in - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_in - sigma * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction type '{prediction_type}': expected epsilon, v_prediction or sample")


def output_for_x0(x0, x_in, level, prediction_type):
    """The model output under which the scheduler's own formulas recover exactly this x̂0."""
    kind, alpha, sigma = level
    if kind == "flow":
        return (x_in - x0) / sigma
    if prediction_type == "epsilon":
        return (x_in - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x_in - x0) / sigma
    return x0


# ------------------------------------------------------------------------------------- training objectives

class NoiseObjective:
    """ε- or v-prediction on a variance-preserving (DDPM) schedule: x_t = α x0 + σ ε; uniform timesteps."""

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction = self.scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"training supports epsilon, v-prediction and flow-matching models, not {self.prediction!r}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def sample_timesteps(self, count: int, generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (count,), generator=generator)

    def noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return noise if self.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)

    def weights(self, timesteps, snr_gamma=None) -> torch.Tensor:
        """Per-example loss weights: min-SNR (Hang et al.) when snr_gamma is set, else ones."""
        if not snr_gamma:
            return torch.ones(len(timesteps))
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps.cpu())
        clipped = torch.clamp(snr, max=float(snr_gamma))
        return clipped / (snr + 1 if self.prediction == "v_prediction" else snr)

    def x0(self, output, noisy, timesteps):
        abar = self.scheduler.alphas_cumprod.to(noisy.device)[timesteps].reshape(-1, 1, 1, 1).float()
        return predicted_x0(output, noisy, ("vp", abar.sqrt(), (1 - abar).sqrt()), self.prediction)


class FlowObjective:
    """Rectified flow (SD3, Flux): x_σ = (1 − σ) x0 + σ ε, the model predicts the velocity ε − x0.
    Timesteps follow SD3's density (logit-normal by default: the paper's best) over the scheduler's own
    training sigmas (shifted where its config says so), with diffusers' SD3 loss weighting."""
    prediction = "flow"

    def __init__(self, scheduler_config, density: str = "logit_normal", weighting: str = "none",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.density, self.weighting = density, weighting
        self.logit = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)

    def sample_timesteps(self, count: int, generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.density, count, generator=generator, **self.logit)
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.scheduler.timesteps[index].float()  # σ·1000, the model's timestep units

    def sigmas(self, timesteps, like):
        return (timesteps.to(like.device, torch.float32) / self.num_train_timesteps).reshape(-1, 1, 1, 1)

    def noisy(self, latents, noise, timesteps):
        sigma = self.sigmas(timesteps, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def weights(self, timesteps, snr_gamma=None) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, timesteps.float() / self.num_train_timesteps)

    def x0(self, output, noisy, timesteps):
        return predicted_x0(output, noisy, ("flow", None, self.sigmas(timesteps, noisy)), None)


# ------------------------------------------------------------------------------------------------ families

def vae_scale_shift(vae) -> tuple:
    """(scaling factor, shift factor) of an autoencoder: denoiser latents = (VAE latents - shift) * scale.
    The family layer's rule, also for code that has a VAE but no pipeline yet (studio pretrain)."""
    config = vae.config
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


def _is(module, class_name: str) -> bool:
    """isinstance against a diffusers model class: parametrized modules (SaRA on every tensor) are subclasses
    named Parametrized..., so the class name alone does not identify them."""
    import diffusers

    return module is not None and isinstance(module, getattr(diffusers, class_name))


class Family:
    """One kind of pipeline. Subclasses set name/label, `matches`, `encode_text` and `_call`."""
    name = "family"
    label = "family"
    flow = False  # rectified-flow training objective and samplers (SD3, Flux)
    fp32_vae = False  # the pipeline runs a half-precision VAE in fp32 when its config says force_upcast (SDXL)

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe) -> bool:
        raise NotImplementedError

    # --- the denoiser and its sizes
    @property
    def component(self) -> str:
        """The pipeline attribute (and saved subfolder) holding the denoiser."""
        return "unet" if getattr(self.pipe, "unet", None) is not None else "transformer"

    @property
    def denoiser(self):
        return getattr(self.pipe, self.component)

    @property
    def vae_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 1))

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    def native_size(self) -> int:
        """The pixel size the model was trained at (studio.json's `size` wins for studio-trained models)."""
        size = (getattr(self.pipe, "studio_defaults", None) or {}).get("size")
        if size:
            return int(size)
        return int(self.denoiser.config.sample_size) * self.vae_factor

    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor times denoiser downsampling or patch)."""
        return self.vae_factor * int(self.denoiser.config.patch_size)

    def latent_shape(self, height: int, width: int) -> tuple:
        return (self.latent_channels, int(height) // self.vae_factor, int(width) // self.vae_factor)

    def image_tokens(self, height: int, width: int) -> int:
        """The denoiser's image sequence length at this pixel size (what a resolution-dependent shift reads)."""
        f = self.vae_factor * int(getattr(self.denoiser.config, "patch_size", None) or 1)
        return (int(height) // f) * (int(width) // f)

    # --- latents
    def _vae_scale_shift(self):
        return vae_scale_shift(self.pipe.vae)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> the denoiser's latents (the distribution's mode: deterministic, cacheable)."""
        vae = self.pipe.vae
        scale, shift = self._vae_scale_shift()
        out = vae.encode(pixels.to(vae.device, vae.dtype))
        latents = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return ((latents.float() - shift) * scale)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents -> pixels in [-1, 1] (differentiable through the decoder)."""
        vae = self.pipe.vae
        scale, shift = self._vae_scale_shift()
        return vae.decode((latents / scale + shift).to(vae.device, vae.dtype), return_dict=False)[0]

    def unpack(self, latents: torch.Tensor, height=None, width=None) -> torch.Tensor:
        """Latents in the pipeline's own layout (its step callback, output_type="latent") -> B x C x h x w."""
        return latents

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> the pipeline's own layout (what its `latents=` argument takes); undone by `unpack`."""
        return latents

    def preview(self, latents: torch.Tensor):
        """Latents -> PIL images (live previews, validation grids)."""
        with torch.no_grad():
            images = self.decode_latents(latents)
        return self.pipe.image_processor.postprocess(images.float().cpu(), output_type="pil")

    # --- text
    def encode_text(self, prompts: list, device=None) -> dict:
        """Conditioning for these prompts (no CFG doubling): a dict of batch-first tensors."""
        raise NotImplementedError

    def text_encoders(self) -> list:
        return [getattr(self.pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(self.pipe, n, None) is not None]

    # --- the model call
    def predict(self, latents, timesteps, cond: dict, denoiser=None, guidance: float | None = None):
        """The denoiser's output for B x C x h x w latents at `timesteps` (the model's units: DDPM steps, or
        σ·1000 for flow models), in the latents' shape. denoiser: a wrapped (accelerate-prepared) module to call
        instead of the pipeline's own. guidance: the distilled-guidance value (Flux dev); ignored elsewhere."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(latents.shape[0])
        dtype = next(self.denoiser.parameters()).dtype
        out = self._call(denoiser, latents.to(dtype), timesteps, move(cond, latents.device, dtype), guidance)
        if out.shape[1] == 2 * latents.shape[1]:  # learned variance (PixArt, DiT): keep the prediction half
            out = out.chunk(2, dim=1)[0]
        return out

    def guided(self, latents, timesteps, cond: dict, uncond: dict, scale: float, denoiser=None):
        """Classifier-free guidance in one batched call (uncond rows first, as diffusers does)."""
        if scale <= 1 or uncond is None:
            return self.predict(latents, timesteps, cond, denoiser)
        t = torch.as_tensor(timesteps, device=latents.device)
        t = t.expand(latents.shape[0]) if t.dim() == 0 else t
        both = self.predict(torch.cat([latents, latents]), torch.cat([t, t]), concat(uncond, cond), denoiser)
        u, c = both.chunk(2)
        return u + scale * (c - u)

    def _call(self, denoiser, latents, timesteps, cond, guidance):
        raise NotImplementedError

    # --- sampling as the family's own pipeline does it
    def encode_negative(self, prompts: list, device=None) -> dict:
        """Unconditional rows for classifier-free guidance ("" where there is no negative prompt)."""
        return self.encode_text(prompts, device)

    def sized(self, cond: dict, height: int, width: int) -> dict:
        """cond with the model's size conditioning pinned to a height x width image, whatever the size of the
        latents it is used with (SDXL's time ids); unchanged for families without one."""
        return cond

    def sampling_output(self, latents, timesteps, cond: dict, uncond: dict, scale: float, denoiser=None):
        """The output a sampler steps with at guidance `scale`: classifier-free guidance here."""
        return self.guided(latents, timesteps, cond, uncond, scale, denoiser)

    def set_timesteps(self, scheduler, steps: int, height: int, width: int, device=None):
        """Set `scheduler` for `steps` steps on a height x width image: a scheduler with use_dynamic_shifting
        (SD3.5, Flux dev) gets the shift `mu` for the image token count, as the pipelines compute it."""
        scheduler.set_timesteps(steps, device=device, **self._shift(scheduler, height, width))

    def _shift(self, scheduler, height, width) -> dict:
        if not getattr(scheduler.config, "use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        return {"mu": calculate_shift(self.image_tokens(height, width), c.get("base_image_seq_len", 256),
                                      c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                      c.get("max_shift", 1.15))}

    # --- training
    def objective(self, **flow_options):
        """The training objective for this model (ε/v on its DDPM schedule, or flow matching)."""
        if self.flow:
            return FlowObjective(self.pipe.scheduler.config, **flow_options)
        return NoiseObjective(self.pipe.scheduler.config)

    def call_kwargs(self, max_length: int | None = None) -> dict:
        """Extra arguments the pipeline's own __call__ needs on small encoders and small sizes."""
        return {}

    def single_call_scale(self) -> float:
        """The pipeline's `guidance_scale` for ONE conditional model call per step (CFG off)."""
        return 1.0


class StableDiffusion(Family):
    name, label = "sd", "Stable Diffusion 1.x/2.x"

    @classmethod
    def matches(cls, pipe):
        unet = getattr(pipe, "unet", None)
        return unet is not None and getattr(unet.config, "addition_embed_type", None) is None \
            and getattr(pipe, "text_encoder", None) is not None

    def size_multiple(self):
        return self.vae_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def encode_text(self, prompts, device=None):
        embeds, _ = self.pipe.encode_prompt(list(prompts), device or self.pipe.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def _call(self, denoiser, latents, timesteps, cond, guidance):
        return denoiser(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


class StableDiffusionXL(StableDiffusion):
    """Two CLIP encoders (hidden states concatenated, the second's pooled output) and size conditioning."""
    name, label = "sdxl", "SDXL"
    fp32_vae = True

    @classmethod
    def matches(cls, pipe):
        unet = getattr(pipe, "unet", None)
        return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"

    def encode_text(self, prompts, device=None):
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=device or self.pipe.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def encode_negative(self, prompts, device=None):
        """All-empty negatives are zeros where the pipeline's config says force_zeros_for_empty_prompt."""
        cond = self.encode_text(prompts, device)
        if not any(prompts) and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            cond = {k: torch.zeros_like(v) for k, v in cond.items()}
        return cond

    def sized(self, cond, height, width):
        pooled = cond["text_embeds"]
        return {**cond, "time_ids": self.time_ids(height, width, pooled, pooled.dtype)}

    def time_ids(self, height: int, width: int, pooled, dtype):
        """(original size, crop top-left, target size): an uncropped image at the size being drawn."""
        encoder = self.pipe.text_encoder_2
        projection = int(encoder.config.projection_dim) if encoder is not None else int(pooled.shape[-1])
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                          text_encoder_projection_dim=projection)
        return ids.to(pooled.device).expand(pooled.shape[0], -1)

    def _call(self, denoiser, latents, timesteps, cond, guidance):
        h, w = latents.shape[-2] * self.vae_factor, latents.shape[-1] * self.vae_factor
        ids = cond["time_ids"] if "time_ids" in cond else self.time_ids(h, w, cond["text_embeds"], latents.dtype)
        added = {"text_embeds": cond["text_embeds"], "time_ids": ids}
        return denoiser(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                        added_cond_kwargs=added, return_dict=False)[0]


class PixArt(Family):
    """PixArt-α/Σ: one T5-style encoder with an attention mask, adaLN-single timestep conditioning."""
    name, label = "pixart", "PixArt-α/Σ"

    @classmethod
    def matches(cls, pipe):
        return _is(getattr(pipe, "transformer", None), "PixArtTransformer2DModel")

    def max_length(self) -> int:
        return int(min(self.pipe.tokenizer.model_max_length, 300))

    def call_kwargs(self, max_length=None):
        return {"use_resolution_binning": False, "clean_caption": False,
                "max_sequence_length": max_length or self.max_length()}

    def encode_text(self, prompts, device=None):
        embeds, mask, _, _ = self.pipe.encode_prompt(list(prompts), False, device=device or self.pipe.device,
                                                     clean_caption=False, max_sequence_length=self.max_length())
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def _call(self, denoiser, latents, timesteps, cond, guidance):
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            h, w = latents.shape[-2] * self.vae_factor, latents.shape[-1] * self.vae_factor
            n = latents.shape[0]
            added = {"resolution": torch.tensor([[h, w]], dtype=latents.dtype, device=latents.device).repeat(n, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=latents.dtype, device=latents.device).repeat(n, 1)}
        return denoiser(latents, encoder_hidden_states=cond["encoder_hidden_states"],
                        encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps,
                        added_cond_kwargs=added, return_dict=False)[0]


class StableDiffusion3(Family):
    """SD3/3.5: MMDiT with two CLIP encoders (+ optional T5) and pooled projections; rectified flow."""
    name, label, flow = "sd3", "SD3/3.5", True

    @classmethod
    def matches(cls, pipe):
        return _is(getattr(pipe, "transformer", None), "SD3Transformer2DModel")

    def max_length(self) -> int:
        tokenizer = getattr(self.pipe, "tokenizer_3", None)
        return int(min(tokenizer.model_max_length, 256)) if tokenizer is not None else 256

    def call_kwargs(self, max_length=None):
        return {"max_sequence_length": max_length or self.max_length()}

    def encode_text(self, prompts, device=None):
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, device=device or self.pipe.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_length())
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _call(self, denoiser, latents, timesteps, cond, guidance):
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class Flux(Family):
    """Flux.1: CLIP (pooled) + T5 (sequence), 2x2-packed latents with position ids, rectified flow; dev-style
    checkpoints embed a distilled guidance value, schnell-style ones do not."""
    name, label, flow = "flux", "Flux.1", True
    default_guidance = 3.5  # what diffusers' Flux training scripts feed the guidance embedding

    @classmethod
    def matches(cls, pipe):
        return _is(getattr(pipe, "transformer", None), "FluxTransformer2DModel")

    @property
    def latent_channels(self):
        return int(self.denoiser.config.in_channels) // 4

    def native_size(self):
        size = (getattr(self.pipe, "studio_defaults", None) or {}).get("size")
        return int(size) if size else int(self.pipe.default_sample_size) * self.vae_factor

    def size_multiple(self):
        return self.vae_factor * 2  # 2x2 packing

    def image_tokens(self, height, width):
        return (int(height) // (2 * self.vae_factor)) * (int(width) // (2 * self.vae_factor))

    def max_length(self) -> int:
        return int(min(self.pipe.tokenizer_2.model_max_length, 512))

    def call_kwargs(self, max_length=None):
        return {"max_sequence_length": max_length or self.max_length()}

    def unpack(self, latents, height=None, width=None):
        if latents.dim() == 4:
            return latents
        side = int(round((latents.shape[1]) ** 0.5)) * 2 * self.vae_factor  # square unless told otherwise
        return self.pipe._unpack_latents(latents, int(height or side), int(width or side), self.vae_factor)

    def pack(self, latents):
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def single_call_scale(self):
        return self.default_guidance  # FluxPipeline feeds guidance_scale to the guidance embedding, never to CFG

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    def encode_text(self, prompts, device=None):
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=device or self.pipe.device,
                                                    max_sequence_length=self.max_length())
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sampling_output(self, latents, timesteps, cond, uncond, scale, denoiser=None):
        """One call, as FluxPipeline: the scale feeds the distilled guidance embedding (dev-style checkpoints)
        and is unused by schnell-style ones; there is no classifier-free guidance."""
        return self.predict(latents, timesteps, cond, denoiser, guidance=scale)

    def set_timesteps(self, scheduler, steps, height, width, device=None):
        """FluxPipeline's schedule: sigmas linspace(1, 1/steps) (unless the scheduler makes its own flow
        sigmas), shifted for the image token count."""
        import numpy as np

        sigmas = None if getattr(scheduler.config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas, **self._shift(scheduler, height, width))

    def _call(self, denoiser, latents, timesteps, cond, guidance):
        pipe = self.pipe
        b, c, h, w = latents.shape
        packed = pipe._pack_latents(latents, b, c, h, w)
        image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text = cond["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
        extra = {}
        if self.guidance_embeds:
            value = self.default_guidance if guidance is None else float(guidance)
            extra["guidance"] = torch.full((b,), value, device=latents.device, dtype=torch.float32)
        out = denoiser(hidden_states=packed, timestep=timesteps.float() / 1000, encoder_hidden_states=text,
                       pooled_projections=cond["pooled_projections"], txt_ids=text_ids, img_ids=image_ids,
                       return_dict=False, **extra)[0]
        return pipe._unpack_latents(out, h * self.vae_factor, w * self.vae_factor, self.vae_factor)


FAMILIES = (StableDiffusionXL, StableDiffusion, PixArt, StableDiffusion3, Flux)


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, or one line naming the supported ones."""
    for cls in FAMILIES:
        if cls.matches(pipe):
            return cls(pipe)
    raise UnsupportedPipeline(f"{type(pipe).__name__} is not a supported pipeline: the studio supports {SUPPORTED}")
