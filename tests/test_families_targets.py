"""Every family people fine-tune: tiny SDXL and Flux pipelines (generate, save, load), target presets on each
family's denoiser, and LoRA counts on the PUBLISHED SDXL / SD3.5-medium / FLUX.1-dev configs, built on the meta
device and checked against closed forms computed from the config alone."""
import copy
import re

import pytest
import torch
from torch import nn

from adapters import METHODS, PRESETS, AdapterConfig, attach
from adapters.core import resolve_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- published configs (config.json of each hub repo, metadata keys dropped) ------------------------

SDXL_BASE_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SD35_MEDIUM_TRANSFORMER = {  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "sample_size": 128,
}
FLUX_DEV_TRANSFORMER = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}


# -- closed forms: the (in, out) of every Linear a preset should match, from the config alone -------

def sdxl_linears(cfg, preset):
    """UNet2DConditionModel: each transformer block has attn1 (4 x D->D), attn2 (q, out D->D; k, v C->D with
    C = cross_attention_dim) and a GEGLU ff (D->2*4D, 4D->D). Blocks: per cross-attention down level
    layers_per_block attentions, per up level layers_per_block + 1 (depths reversed), the mid block one attention
    at the last depth; each attention stacks transformer_layers_per_block[level] blocks."""
    widths, depth, per = cfg["block_out_channels"], cfg["transformer_layers_per_block"], cfg["layers_per_block"]
    blocks = []  # the width D of every transformer block
    for level, kind in enumerate(cfg["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [widths[level]] * per * depth[level]
    for level, kind in enumerate(cfg["up_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [widths[::-1][level]] * (per + 1) * depth[::-1][level]
    blocks += [widths[-1]] * depth[-1]  # UNetMidBlock2DCrossAttn
    c = cfg["cross_attention_dim"]
    if preset == "attn":
        return [s for d in blocks for s in [(d, d)] * 4 + [(d, d), (c, d), (c, d), (d, d)]]
    return [s for d in blocks for s in [(d, 8 * d), (4 * d, d)]]


def sd3_linears(cfg, preset):
    """SD3Transformer2DModel, D = heads x head_dim: each joint block has to_q/k/v, to_out.0 and context
    add_q/k/v_proj, to_add_out (all D->D) except the last block (context_pre_only: no to_add_out, no ff_context);
    a dual-attention block (SD3.5) adds attn2 (4 x D->D). ff and ff_context are D->4D, 4D->D."""
    d, n = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
    if preset == "attn":
        count = 8 * (n - 1) + 7 + 4 * len(cfg["dual_attention_layers"])
        return [(d, d)] * count
    return [(d, 4 * d), (4 * d, d)] * (2 * (n - 1) + 1)


def flux_linears(cfg, preset):
    """FluxTransformer2DModel, D = heads x head_dim. Double-stream blocks: 8 attention Linears D->D (as SD3),
    ff and ff_context D->4D, 4D->D. Single-stream blocks: attn.to_q/k/v D->D; proj_mlp D->4D and
    proj_out (attention | MLP) 5D->D, both in ff."""
    d, double, single = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"], cfg["num_single_layers"]
    if preset == "attn":
        return [(d, d)] * (8 * double + 3 * single)
    return [(d, 4 * d), (4 * d, d)] * 2 * double + [(d, 4 * d), (5 * d, d)] * single


def lora_count(shapes, rank):
    return sum(rank * (i + o) for i, o in shapes)


@pytest.mark.parametrize("name,preset,modules,params", [
    # r=4 on SDXL attention: 70 transformer blocks (10 at 640, 60 at 1280) x 8 = 560 Linears, 5.8M (the 23 MB
    # fp32 file people know)
    ("sdxl", "attn", 560, 5_806_080),
    ("sdxl", "ff", 140, 4_659_200),
    # SD3.5-medium: 23 x 8 + 7 (last block is context_pre_only) + 13 dual attn2 x 4 = 243
    ("sd35", "attn", 243, 2_985_984),
    ("sd35", "ff", 94, 2_887_680),
    # FLUX.1-dev: 19 double blocks x 8 + 38 single blocks x 3 = 266; ff: 19 x 4 + 38 x 2 = 152
    ("flux", "attn", 266, 6_537_216),
    ("flux", "ff", 152, 9_805_824),
])
def test_published_configs_lora_counts_on_meta(name, preset, modules, params):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls, cfg, linears = {"sdxl": (UNet2DConditionModel, SDXL_BASE_UNET, sdxl_linears),
                         "sd35": (SD3Transformer2DModel, SD35_MEDIUM_TRANSFORMER, sd3_linears),
                         "flux": (FluxTransformer2DModel, FLUX_DEV_TRANSFORMER, flux_linears)}[name]
    with torch.device("meta"):  # full size, no memory: shapes only
        model = cls(**cfg)
    expected = linears(cfg, preset)
    handle = attach(model, AdapterConfig(method="lora", rank=4, targets=preset))
    assert len(handle.layers) == len(expected) == modules
    assert handle.num_trainable() == lora_count(expected, 4) == params
    assert all(p.device.type == "meta" for p in handle.trainable_parameters())
    # the same multiset of shapes, not only the same totals
    wrapped = sorted((m.base.in_features, m.base.out_features) for m in model.modules() if hasattr(m, "adapters"))
    assert wrapped == sorted(expected)


# -- tiny pipelines, one per family -----------------------------------------------------------------

UNETS = ("sd", "sdxl")
FAMILIES = ("sd", "sdxl", "pixart", "sd3", "sd35", "flux", "flux-schnell")
_PIPES = {}


def pipeline(family):
    """The family's tiny pipeline, built once per session (callers must not modify it)."""
    from pipelines import tiny

    if family not in _PIPES:
        build = {"sd": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "pixart": tiny.tiny_pixart_pipeline,
                 "sd3": tiny.tiny_sd3_pipeline, "sd35": lambda: tiny.tiny_sd3_pipeline(sd35=True),
                 "flux": tiny.tiny_flux_pipeline, "flux-schnell": lambda: tiny.tiny_flux_pipeline(guidance_embeds=False)}
        pipe = build[family]()
        pipe.set_progress_bar_config(disable=True)
        _PIPES[family] = pipe
    return _PIPES[family]


def denoiser_name(family):
    return "unet" if family in UNETS else "transformer"


def generate(pipe, output_type="latent", **kw):
    if "PixArt" in type(pipe).__name__:
        kw.update(use_resolution_binning=False, clean_caption=False)
    return pipe("a photo of a bag", num_inference_steps=2, height=32, width=32, output_type=output_type,
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("family", ["sdxl", "sd35", "flux", "flux-schnell"])
def test_tiny_pipeline_generates_saves_and_loads(family, tmp_path):
    from pipelines.loading import load_pipeline

    pipe = pipeline(family)
    image = generate(pipe, "pil")[0]
    assert image.size == (32, 32)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), device="cpu")
    assert type(loaded) is type(pipe)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(torch.as_tensor(generate(loaded, "np")), torch.as_tensor(generate(pipe, "np")),
                               rtol=0, atol=1e-5)  # a reloaded pipeline may pick another attention kernel


def test_tiny_family_specifics():
    sdxl = pipeline("sdxl")
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl.unet.config.cross_attention_dim == sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert pipeline("sd35").transformer.config.dual_attention_layers == (0,)
    for family, distilled in (("flux", True), ("flux-schnell", False)):
        pipe = pipeline(family)
        assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
        assert pipe.transformer.config.guidance_embeds is distilled
        assert pipe.scheduler.config.use_dynamic_shifting is distilled
        # guidance reaches the model only through the dev-style guidance embedding
        moved = (generate(pipe, guidance_scale=1.0) - generate(pipe, guidance_scale=6.0)).abs().max()
        assert (moved > 1e-4) if distilled else (moved == 0)


# -- presets on every family ------------------------------------------------------------------------

# what each preset must match, written independently of adapters/core.py's regexes
EXPECTED = {
    "unet": {"attn": r".*\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
             "ff": r".*\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
             "conv": r".*\.(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.0\.conv)"},
    "pixart": {"attn": r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
               "ff": r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"},
    "sd3": {"attn": r"transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)",
            "ff": r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)"},
    "flux": {"attn": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
                     r"|single_transformer_blocks\.\d+\.attn\.to_[qkv]",
             "ff": r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)"
                   r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"},
}


def _kind(family):
    return "unet" if family in UNETS else family.split("-")[0].replace("sd35", "sd3")


def _resolved(model, targets):
    return set(resolve_targets(model, AdapterConfig(method="lora", rank=1, targets=targets)))


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_resolve_on_every_family(family):
    model = getattr(pipeline(family), denoiser_name(family))
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    found = {}
    for preset in PRESETS:
        if preset == "conv" and family not in UNETS:
            # DiT blocks have no convolutions: "conv" alone is an error, "attn+conv" (a UNet default) is "attn"
            with pytest.raises(ValueError, match="match no supported layer"):
                _resolved(model, "conv")
            assert _resolved(model, "attn+conv") == _resolved(model, "attn")
            continue
        found[preset] = _resolved(model, preset)
        assert found[preset], f"{preset} matches nothing in {family}"
        if preset in EXPECTED[_kind(family)]:
            want = {n for n in layers if re.fullmatch(EXPECTED[_kind(family)][preset], n)}
            assert found[preset] == want, f"{family} {preset}: extra {found[preset] - want}, missing {want - found[preset]}"
    assert found["all"] == layers
    assert not found["attn"] & found["ff"]
    # adaLN / norm Linears, embedders and the final projection are in no named preset
    named = found["attn"] | found["ff"] | found.get("conv", set())
    assert not {n for n in named if re.search(r"norm|embed|adaln|^proj_out$|^conv_(in|out)$", n)}
    if family not in UNETS:  # and every other Linear inside a DiT block is in attn+ff
        block = {n for n in layers if re.match(r"(single_)?transformer_blocks\.", n) and ".norm" not in n}
        assert block == found["attn"] | found["ff"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_is_identity_at_init(family):
    pipe = pipeline(family)
    name = denoiser_name(family)
    base = getattr(pipe, name)
    with torch.no_grad():
        y0 = generate(pipe)
    try:
        for method in METHODS:
            model = copy.deepcopy(base)
            handle = attach(model, AdapterConfig(method=method, rank=2, targets="attn"))
            assert handle.num_trainable() > 0
            setattr(pipe, name, model)
            with torch.no_grad():
                torch.testing.assert_close(generate(pipe), y0, rtol=0, atol=1e-5, msg=lambda m: f"{method}: {m}")
    finally:
        setattr(pipe, name, base)
