"""LoRA files made elsewhere: `studio generate --adapter FILE[:W]`, `studio library import FILE` and mixing with the
studio's own adapters. Every file here is written by peft's and diffusers' own functions (LoraConfig + add_adapter,
get_peft_model_state_dict, the pipeline class's save_lora_weights, convert_state_dict_to_kohya), never by the studio,
and the reference image is what diffusers' own `load_lora_weights` gives on the same pipeline, seed and settings."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import tiny
from pipelines.families import family_of
from studio.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of a bag"
# Layers each family's LoRA targets (peft target_modules): attention everywhere, plus convs on UNets (a LoCon)
# and the context / MLP projections of the DiTs.
TARGETS = {"sd": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
           "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "conv1"],
           "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj"],
           "flux": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]}
BUILDERS = {"sd": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "sd3": tiny.tiny_sd3_pipeline,
            "flux": tiny.tiny_flux_pipeline}
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny pipeline saved as a diffusers folder (what `--base` takes)."""
    out = {}
    for name, build in BUILDERS.items():
        out[name] = tmp_path_factory.mktemp(name)
        build().save_pretrained(out[name])
    return out


@pytest.fixture(autouse=True)
def fresh_cache():
    """The CLI's pipeline cache is process-wide: every test starts from pipelines loaded for it alone."""
    from studio import generate

    generate._PIPES.clear()
    yield
    generate._PIPES.clear()


def _randomise_b(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _text_encoder_lora(encoder, seed):
    """peft's LoRA on a text encoder's attention: (get_peft_model_state_dict, its LoraConfig as a dict)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=2, lora_alpha=2, target_modules=CLIP_ATTENTION, init_lora_weights="gaussian")
    inject_adapter_in_model(config, encoder)
    _randomise_b(encoder, seed)
    return get_peft_model_state_dict(encoder), config.to_dict()


def diffusers_lora(name, folder, seed=0, rank=4, alpha=8, text_encoder=False):
    """A LoRA made with peft on family `name`'s denoiser (LoraConfig + the model's add_adapter, random B) and saved by
    the pipeline class's save_lora_weights with its adapter metadata (alpha != rank: the scale travels in it)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = BUILDERS[name]()
    family = family_of(pipe)
    model = family.denoiser
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS[name], init_lora_weights="gaussian"))
    _randomise_b(model, seed)
    parts = {f"{family.component}_lora_layers": get_peft_model_state_dict(model),
             f"{family.component}_lora_adapter_metadata": model.peft_config["default"].to_dict()}
    if text_encoder:
        parts["text_encoder_lora_layers"], parts["text_encoder_lora_adapter_metadata"] = \
            _text_encoder_lora(pipe.text_encoder, seed + 1)
    type(pipe).save_lora_weights(folder, **parts)
    return folder / "pytorch_lora_weights.safetensors"


def kohya_sd_lora(path, seed=0, clip_text_encoder=False):
    """An SD1.x LoRA/LoCon in kohya/A1111 keys: peft's LoRA (alpha = rank, as kohya files store it) turned into
    lora_unet_* / lora_te1_* keys with .alpha by diffusers' convert_state_dict_to_kohya. clip_text_encoder adds a
    part for a CLIP text encoder, named as real kohya files name it (text_model.encoder.layers...)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    unet = tiny.tiny_sd_pipeline().unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["sd"], init_lora_weights="gaussian"))
    _randomise_b(unet, seed)
    tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if clip_text_encoder:
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=99))
        tensors.update({f"text_encoder.text_model.{k}": v for k, v in _text_encoder_lora(clip, seed + 1)[0].items()})
    save_file(convert_state_dict_to_kohya(tensors), str(path))
    return path


def generate(folder, out, *adapters, steps=2):
    """`studio generate` in this process; returns (exit code, the PNG's pixels or None)."""
    argv = ["generate", "--base", str(folder), "--prompt", PROMPT, "--steps", str(steps), "--seed", "3", "--out", str(out)]
    for adapter in adapters:
        argv += ["--adapter", str(adapter)]
    code = main(argv)
    return code, (np.asarray(Image.open(out)).astype(int) if code == 0 else None)


def reference(folder, out, file, weight=1.0, steps=2):
    """The same command on the same pipeline with the file loaded by diffusers' own load_lora_weights instead."""
    from studio.generate import get_pipeline

    pipe = get_pipeline(str(folder))
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="reference")
    pipe.set_adapters(["reference"], adapter_weights=[weight])
    try:
        return generate(folder, out, steps=steps)[1]
    finally:
        pipe.unload_lora_weights()


# --- the same pixels as diffusers' load_lora_weights -------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_diffusers_layout_file_gives_diffusers_pixels(name, folders, tmp_path):
    """A file in diffusers' layout (unet./transformer. keys, alpha in its metadata) on each family, with a weight."""
    file = diffusers_lora(name, tmp_path / "lora", text_encoder=name == "sdxl")
    expected = reference(folders[name], tmp_path / "ref.png", file, weight=0.7)
    code, got = generate(folders[name], tmp_path / "got.png", f"{file}:0.7")
    assert code == 0
    assert np.array_equal(got, expected)
    _, base = generate(folders[name], tmp_path / "base.png")
    assert np.abs(got - base).max() > 2  # the LoRA changed the picture
    if name == "sdxl":  # its text-encoder part was applied too, as diffusers applies it
        from studio.generate import get_pipeline

        pipe = get_pipeline(str(folders[name]))
        generate(folders[name], tmp_path / "on.png", file)
        assert any("lora_A" in n for n, _ in pipe.text_encoder.named_modules())


def test_kohya_file_gives_diffusers_pixels_and_weights_scale_it(folders, tmp_path):
    """kohya/A1111 keys (lora_unet_*, .alpha) go through diffusers' kohya conversion; :W is diffusers' adapter weight."""
    file = kohya_sd_lora(tmp_path / "style.safetensors")
    for weight in (1.0, 0.5):
        expected = reference(folders["sd"], tmp_path / f"ref-{weight}.png", file, weight=weight)
        code, got = generate(folders["sd"], tmp_path / f"got-{weight}.png", f"{file}:{weight}")
        assert code == 0 and np.array_equal(got, expected)


def test_text_encoder_part_that_cannot_apply_is_named_as_skipped(folders, tmp_path, caplog):
    """tiny SD's text encoder is a BERT: a kohya file's CLIP text-encoder part has no layers there. The UNet part
    still applies (the pixels of the same file without that part) and one warning names what was left out."""
    with_te = kohya_sd_lora(tmp_path / "with-te.safetensors", clip_text_encoder=True)
    without = kohya_sd_lora(tmp_path / "unet-only.safetensors")
    expected = reference(folders["sd"], tmp_path / "ref.png", without)
    with caplog.at_level("WARNING", logger="studio"):
        code, got = generate(folders["sd"], tmp_path / "got.png", with_te)
    assert code == 0 and np.array_equal(got, expected)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("studio") and "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "with-te.safetensors" in warnings[0] and "text-encoder part (text_encoder)" in warnings[0]


# --- mixing, switching, errors ----------------------------------------------------------------------------------------

def test_lora_file_and_studio_adapter_together(folders, tmp_path):
    """A studio adapter folder and a LoRA file on one pipeline: the same as the studio adapter merged into the base
    with the file loaded by diffusers on top; then any subset again on the cached pipeline, as a fresh one draws it."""
    from adapters import AdapterConfig, attach, load_adapter, save_adapter
    from studio import generate as studio_generate

    unet = tiny.tiny_sd_pipeline().unet
    handle = attach(unet, AdapterConfig(method="loldu", rank=2, targets="attn+conv"), name="subject")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    studio_adapter = save_adapter(unet, tmp_path / "subject", name="subject")
    file = diffusers_lora("sd", tmp_path / "lora")
    runs = {"both": [f"{studio_adapter}:0.8", f"{file}:0.6"], "studio": [f"{studio_adapter}:0.8"],
            "file": [f"{file}:0.6"], "none": []}

    fresh = {}
    for key, adapters in runs.items():
        studio_generate._PIPES.clear()
        fresh[key] = generate(folders["sd"], tmp_path / f"fresh-{key}.png", *adapters)[1]
    assert np.abs(fresh["both"] - fresh["studio"]).max() > 2 and np.abs(fresh["both"] - fresh["file"]).max() > 2

    studio_generate._PIPES.clear()
    for key in ("both", "studio", "both", "file", "none", "file", "both"):  # one cached pipeline switching
        assert np.array_equal(generate(folders["sd"], tmp_path / "cached.png", *runs[key])[1], fresh[key]), key

    # by hand: the studio adapter folded into the base weights, then diffusers' loader for the file
    studio_generate._PIPES.clear()
    pipe = studio_generate.get_pipeline(str(folders["sd"]))
    load_adapter(pipe.unet, studio_adapter, name="merged", weight=0.8).detach(keep_merged=True)
    expected = reference(folders["sd"], tmp_path / "ref.png", file, weight=0.6)
    assert np.abs(fresh["both"] - expected).max() <= 1  # the merge rounds once more: one level at most


def test_unknown_layout_is_one_line_with_its_key_prefixes(folders, tmp_path, capsys):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({f"model.layers.{i}.weight": torch.zeros(2, 2) for i in range(3)} | {"lm_head.weight": torch.zeros(2, 2)},
              str(odd))
    capsys.readouterr()
    code, _ = generate(folders["sd"], tmp_path / "x.png", odd)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "odd.safetensors" in err and "model.layers (3)" in err and "lm_head" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_lora_for_another_family_and_pickles_are_one_line(folders, tmp_path, capsys):
    flux_file = diffusers_lora("flux", tmp_path / "flux-lora")
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not read")
    for bad, words in ((flux_file, "no layer of this Stable Diffusion"), (pickle, "only .safetensors")):
        capsys.readouterr()
        code, _ = generate(folders["sd"], tmp_path / "x.png", bad)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    # the failed load left nothing on the cached pipeline: a plain run is the plain model
    from studio.generate import get_pipeline

    assert not any(get_pipeline(str(folders["sd"])).get_list_adapters().values())


# --- the library ------------------------------------------------------------------------------------------------------

def test_library_import_keeps_the_file_and_generates_like_it(folders, tmp_path, capsys):
    from studio import library

    home = tmp_path / "home"
    file = kohya_sd_lora(tmp_path / "ink style.safetensors")
    assert main(["library", "--home", str(home), "import", str(file)]) == 0
    out = capsys.readouterr().out
    assert "kohya/A1111 LoCon for SD1.x/2.x" in out and "rank 4" in out
    folder = home / "adapters" / "ink-style"
    assert (folder / "adapter_model.safetensors").read_bytes() == file.read_bytes()
    [entry] = library.list_adapters(home)
    assert entry["lora_file"] and entry["method"] == "lora (kohya file)" and entry["rank"] == 4
    assert entry["base_model"] == "SD1.x/2.x"
    # a diffusers save_lora_weights folder imports too, under its folder's name
    library.import_lora(diffusers_lora("sdxl", tmp_path / "sdxl-style"), home=home)
    assert library.adapter_info(home / "adapters" / "sdxl-style")["config"]["layout"] == "diffusers"

    _, direct = generate(folders["sd"], tmp_path / "direct.png", f"{file}:0.9")
    _, imported = generate(folders["sd"], tmp_path / "imported.png", f"{folder}:0.9")
    assert np.array_equal(direct, imported)
    capsys.readouterr()
    assert main(["library", "--home", str(home), "export", "ink-style"]) == 2
    assert "imported LoRA file" in capsys.readouterr().err


def test_describe_names_layout_kind_family_and_parts(tmp_path):
    from studio.library import LoraFileError, describe_lora_file

    kohya = describe_lora_file(kohya_sd_lora(tmp_path / "k.safetensors", clip_text_encoder=True))
    assert (kohya["layout"], kohya["kind"], kohya["family"], kohya["rank"]) == ("kohya", "LoCon", "SD1.x/2.x", 4)
    assert set(kohya["parts"]) == {"unet", "text_encoder"}
    sd3 = describe_lora_file(diffusers_lora("sd3", tmp_path / "sd3"))
    assert (sd3["layout"], sd3["kind"], sd3["family"], list(sd3["parts"])) == ("diffusers", "LoRA", "SD3", ["transformer"])
    flux = describe_lora_file(diffusers_lora("flux", tmp_path / "flux"))
    assert flux["family"] == "Flux"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(LoraFileError, match="not a readable safetensors file"):
        describe_lora_file(broken)


def test_library_tab_imports_a_file(folders, tmp_path):
    """The Library tab's Import button runs library.import_lora: the file joins the table and every adapter picker."""
    from studio.ui import build_app

    home = tmp_path / "home"
    file = kohya_sd_lora(tmp_path / "ink.safetensors")
    demo = build_app(base=str(folders["sd"]), home=str(home))
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lib-import")
    [handler] = [f for f in demo.fns.values() if any(t[0] == button._id for t in f.targets)]
    status, *_, table, picker = handler.fn(str(file), "")[:5]
    assert "Imported **ink**" in status and "kohya/A1111 LoCon" in status
    assert [row[:2] for row in table] == [["ink", "lora (kohya file)"]]
    assert picker["value"] == "ink"


def test_one_step_with_a_lora_file_equals_the_lora_merged_into_the_base(tmp_path):
    """HiPA's adapter goes inside the layers diffusers wrapped for a LoRA file (it used to be refused as 'made for a
    different architecture'); the result equals one step on the base with that LoRA fused into its weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from pipelines import load_pipeline, one_step
    from pipelines.assets import shipped_hipa
    from studio.generate import apply_adapters

    hipa = str(shipped_hipa("embedded"))
    maker = load_pipeline("embedded", device="cpu")
    maker.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights="gaussian"))
    _randomise_b(maker.unet, 0)
    type(maker).save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(maker.unet))
    file = tmp_path / "pytorch_lora_weights.safetensors"

    def draw(pipe):
        return one_step(pipe, ["a photo of a coat", "a photo of a dress"], adapter=hipa, output_type="np",
                        generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

    pipe = load_pipeline("embedded", device="cpu")
    apply_adapters(pipe, [(file, 1.0)])
    ours = draw(pipe)
    fused = load_pipeline("embedded", device="cpu")
    fused.load_lora_weights(str(tmp_path), weight_name=file.name, adapter_name="x")
    fused.fuse_lora()
    fused.unload_lora_weights()
    plain = load_pipeline("embedded", device="cpu")
    assert np.abs(ours - draw(fused)).max() < 1e-4 and np.abs(ours - draw(plain)).max() > 1e-3
    apply_adapters(pipe, [])  # the file comes off; HiPA is attached again on the plain layers
    assert np.abs(draw(pipe) - draw(plain)).max() < 1e-5
