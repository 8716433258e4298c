"""Training data: every image mode becomes RGB at the model's size; every bad file is skipped with a reason
(or, when nothing is usable, one clear error); the step/epoch arithmetic and the data order are exact."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.data import StepPlan, example_indices, load_image, load_subject


def _noise(size=(40, 30), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _png_header_only(path, width, height):
    """A PNG that claims width x height but holds almost no data: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("make", [
    lambda: _noise(),
    lambda: _noise(mode="RGBA"),
    lambda: _noise(mode="L"),
    lambda: _noise().convert("P"),
    lambda: Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 50).astype(np.uint16), mode="I;16"),
    lambda: _noise().convert("CMYK"),
    lambda: _noise(size=(7, 300)),
])
def test_any_mode_and_size_becomes_rgb_square(tmp_path, make):
    path = tmp_path / "x.png"
    image = make()
    image.save(path) if image.mode != "CMYK" else image.save(tmp_path / "x.jpg")
    pixels = load_image(path if image.mode != "CMYK" else tmp_path / "x.jpg", 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:6, 2:6] = (255, 0, 0, 255)  # an opaque red square on a fully transparent background
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "cut.png")
    pixels = load_image(tmp_path / "cut.png", 8)
    assert np.allclose(pixels[:, 0, 0], 1.0)  # white where transparent
    assert pixels[0, 4, 4] > 0.9 and pixels[1, 4, 4] < -0.9


def test_bad_files_are_skipped_with_reasons(tmp_path):
    _noise().save(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("a photo of sks bag, on a table\n")
    _noise(seed=1).save(tmp_path / "plain.jpg")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "flat.png")
    (tmp_path / "orphan.txt").write_text("a caption with no image")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")

    data = load_subject(tmp_path, 16, prompt="a photo of sks bag")
    assert [e.caption for e in data.examples] == ["a photo of sks bag, on a table", "a photo of sks bag"]
    reasons = dict(data.skipped)
    assert set(reasons) == {"notes.pdf", "corrupt.png", "truncated.png", "bomb.png", "flat.png", "orphan.txt"}
    assert "not an image" in reasons["notes.pdf"]
    assert "not a readable image" in reasons["corrupt.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "too large" in reasons["bomb.png"]
    assert "one colour" in reasons["flat.png"]
    report = data.report()
    assert {s["file"] for s in report["skipped"]} == set(reasons)


def test_unusable_folders_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_subject(tmp_path / "missing", 16, "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_subject(tmp_path / "empty", 16, "p")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("L", (16, 16), 0).save(bad / "black.png")
    _png_header_only(bad / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match="no usable images.*bomb.png: too large.*black.png|no usable images.*black.png"):
        load_subject(bad, 16, "p")
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    _noise().save(nocap / "a.png")
    with pytest.raises(ValueError, match="no caption"):
        load_subject(nocap, 16, None)


def test_step_plan_arithmetic():
    plan = StepPlan(images=5, repeats=10, batch_size=2, grad_accum=3, processes=2, steps=100)
    assert plan.examples_per_epoch == 50 and plan.examples_per_step == 12
    assert plan.steps_per_epoch == 5  # ceil(50 / 12)
    assert plan.epochs == pytest.approx(24.0)
    text = plan.describe()
    assert "5 images x 10 repeats = 50 examples per epoch" in text and "100 steps = 24.00 epochs" in text


def test_data_order_is_a_pure_function_of_the_step():
    whole = example_indices(3, 7, 0, 21)
    for epoch in range(3):
        assert sorted(whole[epoch * 7:(epoch + 1) * 7]) == list(range(7))  # each epoch a permutation
    assert example_indices(3, 7, 9, 5) == whole[9:14]  # any slice recomputes without state
    assert example_indices(4, 7, 0, 21) != whole


def test_masks_come_from_a_mask_file_or_the_alpha_channel_cropped_like_the_pixels(tmp_path):
    from studio.data import load_mask, square

    wide = _noise(size=(48, 32))
    alpha = Image.new("L", (48, 32), 0)
    alpha.paste(255, (20, 0, 48, 32))  # the right part is the subject
    cutout = wide.convert("RGBA")
    cutout.putalpha(alpha)
    cutout.save(tmp_path / "cutout.png")
    _noise(seed=1).save(tmp_path / "photo.png")
    drawn = Image.new("L", (32, 32), 0)
    drawn.paste(255, (0, 0, 16, 32))
    drawn.save(tmp_path / "photo.mask.png")
    _noise(seed=2).save(tmp_path / "plain.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "dark-masklabel.png")
    _noise(seed=3).save(tmp_path / "dark.png")

    data = load_subject(tmp_path, 16, prompt="a photo of sks bag", masks=True)
    by_name = {Path(e.path).name: e for e in data.examples}
    assert sorted(by_name) == ["cutout.png", "photo.png", "plain.png"]  # mask files are never subject images
    expected = np.asarray(square(alpha, 16), dtype=np.float32) / 255  # the same resize and centre crop
    np.testing.assert_array_equal(by_name["cutout.png"].mask, expected)
    assert by_name["cutout.png"].mask[:, :4].max() < 0.1 and by_name["cutout.png"].mask[:, -4:].min() > 0.9
    assert by_name["photo.png"].mask[:, :7].min() > 0.9 and by_name["photo.png"].mask[:, 9:].max() < 0.1
    assert by_name["plain.png"].mask is None  # neither: trains everywhere
    assert "all black" in dict(data.skipped)["dark.png"]
    assert data.report()["masks"] == {"cutout.png": "alpha channel", "photo.png": "photo.mask.png", "plain.png": "none"}
    assert load_mask(tmp_path / "plain.png", 16) == (None, "none")
    # without --masked-loss the same folder trains on the composited pixels and ignores the mask files
    plain = load_subject(tmp_path, 16, prompt="p")
    assert sorted(Path(e.path).name for e in plain.examples) == ["cutout.png", "dark.png", "photo.png", "plain.png"]
    assert all(e.mask is None for e in plain.examples)
