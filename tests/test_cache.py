"""The encode cache (studio.cache): a hit gives back exactly what encoding gave; a changed file, size, flip, VAE,
text encoder or prompt is a miss; an unreadable or wrong file is a miss that is encoded again and rewritten."""
import pytest
import torch

from studio.cache import EncodeCache, cache_root


@pytest.fixture(scope="module")
def pipe():
    from pipelines.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline()


def _cache(pipe, root):
    from pipelines.families import family_of

    return EncodeCache(root, family_of(pipe), "cpu")


def _files(root, kind):
    return sorted((root / kind).rglob("*.safetensors"))


def test_cache_root_follows_the_setting_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"
    assert cache_root(str(tmp_path / "mine")) == tmp_path / "mine"
    assert cache_root("none") is None and cache_root("None") is None
    monkeypatch.delenv("STUDIO_CACHE")
    assert str(cache_root(None)).endswith(".cache/diffusion-studio")


def test_latents_hit_exactly_and_miss_on_file_size_flip_and_vae(pipe, tmp_path):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    first = _cache(pipe, tmp_path)
    encoded = first.latents(pixels, ["a", "b"])
    assert first.counts["latents_encoded"] == 2 and len(_files(tmp_path, "latents")) == 2
    again = _cache(pipe, tmp_path)
    assert torch.equal(again.latents(pixels, ["a", "b"]), encoded)  # bitwise what encoding gave
    assert again.counts == {"latents_encoded": 0, "latents_cached": 2, "embeddings_encoded": 0, "embeddings_cached": 0}
    again.latents(pixels, ["a", "c"])  # another file's content
    again.latents(pixels, ["a", "b"], flip=True)
    again.latents(pixels[..., :24], ["a", "b"])  # another size (bucket)
    assert again.counts["latents_encoded"] == 1 + 2 + 2 and again.counts["latents_cached"] == 2 + 1
    flipped = _cache(pipe, tmp_path).latents(pixels, ["a", "b"], flip=True)
    assert torch.equal(flipped, _cache(pipe, None).latents(pixels.flip(-1), ["a", "b"]))
    with torch.no_grad():
        next(pipe.vae.encoder.parameters()).mul_(1.001)  # another VAE
    try:
        changed = _cache(pipe, tmp_path)
        assert not torch.equal(changed.latents(pixels, ["a", "b"]), encoded)
        assert changed.counts["latents_encoded"] == 2
    finally:
        with torch.no_grad():
            next(pipe.vae.encoder.parameters()).div_(1.001)


def test_text_hits_and_misses_by_prompt_and_encoder(pipe, tmp_path):
    first = _cache(pipe, tmp_path)
    cond = first.text(["a photo of sks bag", "", "a photo of sks bag"])
    assert first.counts["embeddings_encoded"] == 2 and len(_files(tmp_path, "text")) == 2
    assert torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][2])
    again = _cache(pipe, tmp_path)
    hit = again.text(["", "a photo of sks bag", "a photo of a bag"])
    assert again.counts["embeddings_cached"] == 2 and again.counts["embeddings_encoded"] == 1
    assert torch.equal(hit["encoder_hidden_states"][1], cond["encoder_hidden_states"][0])
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).add_(0.01)
    try:
        changed = _cache(pipe, tmp_path)
        changed.text([""])
        assert changed.counts["embeddings_encoded"] == 1
    finally:
        with torch.no_grad():
            next(pipe.text_encoder.parameters()).sub_(0.01)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong shape"])
def test_a_bad_cache_file_is_ignored_and_rewritten(pipe, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    encoded = _cache(pipe, tmp_path).latents(pixels, ["a"])
    (path,) = _files(tmp_path, "latents")
    if damage == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        save_file({"latents": torch.zeros(4, 3, 3)}, str(path))
    again = _cache(pipe, tmp_path)
    assert torch.equal(again.latents(pixels, ["a"]), encoded)
    assert again.counts["latents_encoded"] == 1
    assert torch.equal(load_file(str(path))["latents"], encoded[0])  # rewritten whole
    assert _files(tmp_path, "latents") == [path]  # no temporary file left beside it
    text = _cache(pipe, tmp_path)
    text.text(["p"])
    (text_file,) = _files(tmp_path, "text")
    text_file.write_bytes(b"junk")
    reread = _cache(pipe, tmp_path)
    reread.text(["p"])
    assert reread.counts["embeddings_encoded"] == 1 and load_file(str(text_file))
