"""Tiny random-init pipelines, one per supported family, built in code (no downloads).

Tests use them to prove each family loads from a saved folder, generates, and takes adapters.
They are real diffusers pipelines; only the widths are small.
"""
import json
import tempfile
from pathlib import Path

import torch


def _seeded(seed):
    torch.manual_seed(seed)


def _tiny_bert(hidden=32):
    """A small random BertModel with MiniLM's real tokenizer (vocab 30522)."""
    from transformers import BertConfig, BertModel

    from pipelines.text import load_minilm_tokenizer

    tokenizer = load_minilm_tokenizer(16)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512)
    return tokenizer, BertModel(config, add_pooling_layer=False).eval()


def _tiny_vae(latent_channels=4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, **extra)


def tiny_sd_pipeline(seed: int = 0):
    """StableDiffusionPipeline: UNet2DConditionModel (cross-attn + resnet convs), AutoencoderKL f2, tiny Bert."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    _seeded(seed)
    tokenizer, text_encoder = _tiny_bert(32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def tiny_pixart_pipeline(seed: int = 0):
    """PixArtAlphaPipeline: a PixArt-style DiT (self-attn, cross-attn, MLP, adaLN-single) with a tiny Bert."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    _seeded(seed)
    tokenizer, text_encoder = _tiny_bert(32)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=32, norm_num_groups=8)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    return pipe


def _char_clip_tokenizer():
    """A CLIPTokenizer over a byte-level vocabulary with no merges, written in code (the real CLIP vocab
    cannot be downloaded here). Enough for the CLIP tokenizer interface of SD3, SDXL and Flux."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="tiny-clip-tok-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16,
                         pad_token="<|endoftext|>")


def _tiny_clip(tokenizer, projection: bool, hidden=32):
    """A 2-layer CLIP text encoder over the char tokenizer; `projection` adds the pooled text projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=tokenizer.model_max_length,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_sd3_pipeline(seed: int = 0, sd35: bool = False):
    """StableDiffusion3Pipeline: an SD3-style MMDiT with two tiny CLIP text encoders (T5 omitted).
    sd35=True adds what SD3.5 changed: RMS q/k norms and a second image self-attention (attn2) in block 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seeded(seed)
    tokenizer = _char_clip_tokenizer()
    text_encoder = _tiny_clip(tokenizer, projection=True)
    text_encoder_2 = _tiny_clip(tokenizer, projection=True)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16, **(dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """StableDiffusionXLPipeline: a UNet with SDXL's text_time conditioning (pooled text + 6 size/crop ids) and
    several transformer layers per block, CLIP-L-like + CLIP-G-like (with projection) text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    _seeded(seed)
    tokenizer = _char_clip_tokenizer()
    text_encoder = _tiny_clip(tokenizer, projection=False)
    text_encoder_2 = _tiny_clip(tokenizer, projection=True)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # the two encoders' penultimate hidden states, concatenated (32 + 32)
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32)  # 6 time ids + the pooled projection
    # SDXL base's shipped scheduler (leading spacing, steps_offset 1): a tiny stand-in for a real folder
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)


def _tiny_t5_tokenizer():
    """A T5 (Unigram, sentencepiece-style) tokenizer over single printable characters, built in code:
    <pad>=0, </s>=1, <unk>=2 as in T5, every other piece one character (or '▁' + character, a word start)."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -1.0) for c in chars] + [(c, -1.5) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: a Flux transformer with double-stream (joint) and single-stream blocks, a tiny CLIP
    (pooled) + tiny T5 (sequence) encoder and a 16-channel VAE with shift. guidance_embeds=True is FLUX.1-dev
    style (guidance distilled into an embedding, resolution-dependent shift), False FLUX.1-schnell style."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _seeded(seed)
    tokenizer = _char_clip_tokenizer()
    text_encoder = _tiny_clip(tokenizer, projection=False)
    tokenizer_2 = _tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)).eval()
    # in_channels = 16 latent channels x the 2x2 patch that the pipeline packs into each token
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6))  # rope dims per position axis (index, row, column); they sum to the head dim
    vae = _tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False)
    if guidance_embeds:  # dev: sigma shift grows with the image token count
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # schnell: a fixed schedule, no shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
