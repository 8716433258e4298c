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


def test_bucket_sizes_and_assignment_match_hand_computed_values():
    from studio.data import bucket_sizes, nearest_bucket

    # 32^2 in multiples of 4: for each width the largest height within 1024 pixels; 44x20 (2.2:1) is out of range
    assert bucket_sizes(32, 4) == [(32, 32), (36, 28), (28, 36), (40, 24), (24, 40)]
    # SD1.5 (512, multiples of 64): the area never exceeds the square's
    assert bucket_sizes(512, 64) == [(512, 512), (576, 448), (448, 576), (640, 384), (384, 640)]
    assert all(w * h <= 512 * 512 for w, h in bucket_sizes(512, 64))
    buckets = bucket_sizes(32, 4)
    assert nearest_bucket(36, 40, buckets) == (32, 32)  # 0.9: nearer 1 than 0.78
    assert nearest_bucket(64, 32, buckets) == (40, 24)  # 2:1 -> the widest there is
    assert nearest_bucket(30, 48, buckets) == (24, 40)  # 0.625: |ln .6 - ln .625| < |ln .78 - ln .625|
    assert nearest_bucket(100, 40, buckets) == (40, 24)
    assert nearest_bucket(32, 32, buckets) == (32, 32)


def test_images_go_to_their_bucket_cover_cropped_with_masks_and_tiny_ones_are_skipped(tmp_path):
    from studio.data import bucket_sizes, fit, square

    wide = _noise(size=(64, 32), seed=1)
    wide.save(tmp_path / "wide.png")
    stripes = Image.new("L", (64, 32), 0)
    stripes.paste(255, (30, 0, 64, 32))
    stripes.save(tmp_path / "wide.mask.png")
    _noise(size=(30, 48), seed=2).save(tmp_path / "tall.png")
    _noise(size=(36, 40), seed=3).save(tmp_path / "almost.png")
    _noise(size=(15, 15), seed=4).save(tmp_path / "tiny.png")  # 32/15 = 2.13x upscaling: over the limit

    data = load_subject(tmp_path, 32, prompt="p", masks=True, buckets=bucket_sizes(32, 4))
    by_name = {Path(e.path).name: e for e in data.examples}
    assert {n: e.bucket for n, e in by_name.items()} == {"wide.png": (40, 24), "tall.png": (24, 40), "almost.png": (32, 32)}
    assert by_name["wide.png"].pixels.shape == (3, 24, 40) and by_name["tall.png"].pixels.shape == (3, 40, 24)
    # cover: 64x32 scales by max(40/64, 24/32) = 0.75 to 48x24, then 4 columns go on each side
    by_hand = wide.resize((48, 24), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((4, 0, 44, 24))
    np.testing.assert_array_equal(by_name["wide.png"].pixels, np.asarray(by_hand, np.float32).transpose(2, 0, 1) / 127.5 - 1)
    expected = np.asarray(stripes.resize((48, 24), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((4, 0, 44, 24)),
                          np.float32) / 255  # the mask is cropped exactly as its image
    np.testing.assert_array_equal(by_name["wide.png"].mask, expected)
    assert "too small (15x15)" in dict(data.skipped)["tiny.png"] and "2.1x upscaling" in dict(data.skipped)["tiny.png"]
    report = data.report()
    assert report["buckets"] == {"32x32": ["almost.png"], "40x24": ["wide.png"], "24x40": ["tall.png"]}
    assert [b.name for b in data.buckets()] == ["32x32", "40x24", "24x40"]
    # a square bucket is the old centre square, pixel for pixel
    assert np.array_equal(np.asarray(fit(wide, 32, 32)), np.asarray(square(wide, 32)))
    # without buckets every image is that square (the upscale limit still holds)
    squares = load_subject(tmp_path, 32, prompt="p")
    assert {e.bucket for e in squares.examples} == {(32, 32)} and "tiny.png" in dict(squares.skipped)


def test_bucket_batches_stay_in_one_bucket_and_are_a_pure_function_of_the_step():
    from studio.data import bucket_batch, bucket_shares

    sizes, repeats, batch = [5, 2, 1], 2, 3
    shares = bucket_shares(sizes, repeats, batch)
    assert shares == [4, 2, 1]  # ceil(10/3), ceil(4/3), ceil(2/3): 7 micro-batches per epoch
    whole = [bucket_batch(7, sizes, repeats, batch, k) for k in range(70)]
    for bucket, positions in whole:
        assert len(positions) == batch and all(0 <= p < sizes[bucket] for p in positions)
    for round_ in range(10):  # each epoch deals every bucket its share, in a seeded order
        dealt = [b for b, _ in whole[round_ * 7:(round_ + 1) * 7]]
        assert sorted(dealt) == [0, 0, 0, 0, 1, 1, 2]
    assert len({tuple(b for b, _ in whole[r * 7:(r + 1) * 7]) for r in range(10)}) > 1  # the order changes
    first = [p for b, positions in whole[:7] if b == 0 for p in positions]
    assert sorted(first[:10]) == sorted(list(range(5)) * 2)  # the first epoch of bucket 0's stream: each twice
    assert bucket_batch(7, sizes, repeats, batch, 33) == whole[33]  # recomputed from k alone
    assert [bucket_batch(8, sizes, repeats, batch, k) for k in range(70)] != whole  # another seed, another order
    # one bucket is the plain data order, as before buckets
    assert [bucket_batch(3, [7], 1, 2, k) for k in range(5)] == [(0, example_indices(3, 7, 2 * k, 2)) for k in range(5)]


def test_step_plan_counts_bucket_padding():
    plan = StepPlan(images=8, repeats=2, batch_size=3, grad_accum=1, processes=1, steps=10, padding=5,
                    buckets={"32x32": 5, "40x24": 2, "24x40": 1})
    assert plan.examples_per_epoch == 21 and plan.steps_per_epoch == 7  # the 7 micro-batches bucket_batch deals
    text = plan.describe()
    assert "8 images x 2 repeats + 5 repeated to fill each bucket's last batch = 21 examples per epoch" in text and "40x24 (2 images)" in text
