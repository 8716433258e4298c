"""Bad input through the Python API and the CLI (issue #12): every case gives one clear line (or, for training
data, a skipped file with its reason), the process stays up, and nothing written before is lost.
docs/hardening.md lists each case with what happened."""
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.cli import main


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def noise(size=(24, 24), seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8"))


def bytes_of(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def lying_png(width=20000, height=20000) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, one tiny IDAT: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_FILES = {
    "empty.png": lambda: b"",
    "truncated.png": lambda: bytes_of(noise((64, 64)), "PNG")[:300],
    "truncated.jpg": lambda: bytes_of(noise((64, 64)), "JPEG")[:400],
    "text.png": lambda: b"this is a text file, not a picture\n",
    "bomb.png": lying_png,
    "tiny.png": lambda: bytes_of(noise((1, 1)), "PNG"),
}
REASONS = {"empty.png": "not a readable image", "truncated.png": "truncated", "truncated.jpg": "truncated",
           "text.png": "not a readable image", "bomb.png": "too large", "tiny.png": "one colour"}


@pytest.fixture
def subject(tmp_path):
    """A folder with two good images and every bad kind."""
    folder = tmp_path / "subject"
    folder.mkdir()
    noise(seed=1).save(folder / "good1.png")
    noise(seed=2).save(folder / "good2.jpg")
    for name, make in BAD_FILES.items():
        (folder / name).write_bytes(make())
    return folder


def test_bad_training_images_are_skipped_with_reasons(subject):
    from studio.data import load_subject

    data = load_subject(subject, 16, prompt="a photo of sks thing")
    assert sorted(Path(e.path).name for e in data.examples) == ["good1.png", "good2.jpg"]
    reasons = dict(data.skipped)
    assert set(reasons) == set(BAD_FILES)
    for name, expected in REASONS.items():
        assert expected in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_image_is_one_value_error(tmp_path, name):
    from studio.data import load_image

    path = tmp_path / name
    path.write_bytes(BAD_FILES[name]())
    with pytest.raises(ValueError, match=REASONS[name]):
        load_image(path, 16)


def test_bomb_is_refused_before_decoding(tmp_path):
    """A real 20000x20000 one-colour PNG (a few hundred KB) is refused from its header, fast."""
    import time

    path = tmp_path / "real-bomb.png"
    path.write_bytes(lying_png())
    start = time.perf_counter()
    from studio.data import load_image

    with pytest.raises(ValueError, match="too large"):
        load_image(path, 16)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "LA", "P", "F"])
def test_unusual_modes_load_as_rgb(tmp_path, mode):
    from studio.data import load_image

    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16))
        assert image.mode.startswith("I")
    elif mode == "F":
        image = Image.fromarray(rng.random((20, 20)).astype(np.float32))
    else:
        image = noise((20, 20)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "F" else "x.png" if mode != "CMYK" else "x.jpg")
    image.save(path)
    pixels = load_image(path, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1


def test_folder_of_only_bad_images_is_one_line(capsys, tmp_path, tiny_sd_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, make in BAD_FILES.items():
        (folder / name).write_bytes(make())
    err = one_line_error(capsys, ["train", "--base", str(tiny_sd_dir), "--images", str(folder), "--prompt", "x",
                                  "--steps", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert "no usable images" in err


# --- prompts ------------------------------------------------------------------------------------------------

def test_100k_character_prompt_is_truncated_not_fatal(capsys, tmp_path, tiny_sd_dir):
    out = tmp_path / "long.png"
    prompt = ("a photo of a very long prompt " * 4000)[:100_000]
    assert main(["generate", "--base", str(tiny_sd_dir), "--prompt", prompt, "--steps", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    with Image.open(out) as image:
        assert image.size == (32, 32)
        assert len(image.text["parameters"]) >= 100_000  # the full prompt is recorded


# --- adapter files ------------------------------------------------------------------------------------------

def _tiny_unet(wide=False):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    channels = (32, 64) if wide else (16, 32)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture
def saved_adapter(tmp_path):
    from adapters import AdapterConfig, attach, save_adapter

    unet = _tiny_unet()
    attach(unet, AdapterConfig(method="lora", rank=2, targets="attn"), name="a")
    folder = save_adapter(unet, tmp_path / "adapter", name="a", base_model="tiny")
    return folder


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused(saved_adapter, bad):
    from adapters import load_adapter

    def poison(tensors):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = bad

    _rewrite(saved_adapter, poison)
    unet = _tiny_unet()
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_adapter(unet, saved_adapter)
    from adapters.core import _records

    assert not list(_records(unet))  # the model is untouched


def test_adapter_for_another_base_is_refused(saved_adapter):
    from adapters import load_adapter

    with pytest.raises(ValueError, match="different architecture"):
        load_adapter(_tiny_unet(wide=True), saved_adapter)


def test_safetensors_header_that_lies_is_refused(saved_adapter):
    from adapters import load_adapter

    path = saved_adapter / "adapter_model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10 ** 12]  # claims a terabyte
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(_tiny_unet(), saved_adapter)
    path.write_bytes(struct.pack("<Q", 10 ** 15) + b"{}")  # header length larger than the file
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(_tiny_unet(), saved_adapter)


def test_failed_library_overwrite_keeps_the_old_adapter(capsys, tmp_path, saved_adapter):
    from studio import library

    home = tmp_path / "home"
    target = library.add_adapter(saved_adapter, "mine", home=home)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError):
        library.add_adapter(broken, "mine", home=home, overwrite=True)
    err = one_line_error(capsys, ["library", "--home", str(home), "add", str(broken), "--name", "mine"])
    assert "is not an adapter config" in err  # the source is checked before anything else
    err = one_line_error(capsys, ["library", "--home", str(home), "add", str(saved_adapter), "--name", "mine"])
    assert "already has" in err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in library.adapters_dir(home).iterdir()] == ["mine"]  # no temp folder left


# --- names that try to be paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "..", "a/../../b", "/tmp/evil"])
def test_path_traversal_in_library_names(capsys, tmp_path, saved_adapter, name):
    home = tmp_path / "home"
    err = one_line_error(capsys, ["library", "--home", str(home), "add", str(saved_adapter), "--name", name])
    assert "not a valid adapter name" in err
    assert main(["library", "--home", str(home), "add", str(saved_adapter), "--name", "ok"]) == 0
    err = one_line_error(capsys, ["library", "--home", str(home), "rename", "ok", name])
    assert "not a valid adapter name" in err
    err = one_line_error(capsys, ["library", "--home", str(home), "delete", name])
    assert (home / "adapters" / "ok").is_dir()
    assert not (tmp_path / "x").exists() and not Path("/tmp/evil").exists()


def test_path_traversal_in_job_names(tmp_path):
    from studio.jobs import JobStore

    store = JobStore(tmp_path / "jobs")
    job = store.submit({"images": str(tmp_path), "prompt": "x", "steps": 1}, name="../../x")
    assert job.name == "../../x"  # only a label: never used as a path
    assert Path(job.run_dir).parent == (tmp_path / "jobs" / "runs").resolve()
    assert not (tmp_path / "x").exists()


# --- configs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("steps: many\n", "steps must be a positive whole number"),
    ("steps: 1.5\n", "steps must be a positive whole number"),
    ("rank: [1, 2]\n", "rank must be a positive whole number"),
    ("lr: fast\n", "lr must be a positive number"),
    ("lr: .nan\n", "lr must be a positive number"),
    ("validation_seeds: abc\n", "validation-seeds"),
    ("caption_dropout: lots\n", "caption-dropout"),
    ("ema_decay: [1]\n", "ema-decay"),
    ("no_such_key: 1\n", "unknown training setting"),
    ("- a\n- b\n", "must hold a mapping"),
    ("steps: [unclosed\n", "not valid YAML"),
])
def test_yaml_config_with_wrong_types(capsys, tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    run = tmp_path / "run"
    err = one_line_error(capsys, ["train", "--config", str(config), "--images", str(tmp_path), "--out", str(run)])
    assert expected in err, err
    assert not run.exists()


def test_generate_failure_keeps_an_existing_png(capsys, tmp_path, tiny_sd_dir):
    out = tmp_path / "keep.png"
    noise().save(out)
    before = out.read_bytes()
    one_line_error(capsys, ["generate", "--base", str(tiny_sd_dir), "--prompt", "x", "--steps", "0", "--out", str(out)])
    one_line_error(capsys, ["generate", "--base", str(tiny_sd_dir), "--prompt", "x", "--height", "17", "--out", str(out),
                            "--device", "cpu"])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
