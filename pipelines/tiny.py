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
    cannot be downloaded here). Enough for SD3's tokenizer interface."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="tiny-clip-tok-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16,
                         pad_token="<|endoftext|>")


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: an SD3-style MMDiT with two tiny CLIP text encoders (T5 omitted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _seeded(seed)
    tokenizer = _char_clip_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModelWithProjection(config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    return pipe
