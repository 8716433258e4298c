"""The per-method defaults table (studio/defaults.py): resolution order, derived class prompts, the run's record
of what it used, resume against effective values, and the CLI, bench and UI reading the same table."""
import json
from pathlib import Path

import pytest
import yaml

from studio import defaults
from studio.cli import main
from studio.train import TrainConfig, run_status, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folder(tmp_path, name, slot, studio_trained=True):
    """A base folder as far as the table looks: model_index.json (no weights are read), and the studio.json a
    model of the studio's own carries (the table's tuned values are for those)."""
    folder = tmp_path / name
    folder.mkdir()
    cls = {"unet": "UNet2DConditionModel", "transformer": "PixArtTransformer2DModel"}[slot]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "X", slot: ["diffusers", cls],
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    if studio_trained:
        (folder / "studio.json").write_text("{}")
    return str(folder)


def test_a_real_checkpoint_gets_the_diffusers_scripts_rate_and_batch(tmp_path):
    sdxl = _folder(tmp_path, "sdxl", "unet", studio_trained=False)
    common = dict(images="x", prompt="a photo of sks bag", out="o")
    c = TrainConfig(base=sdxl, method="lora", **common)
    assert (c.lr, c.batch_size) == (1e-4, 1) and c.sources["lr"].startswith("checkpoint default")
    assert (c.rank, c.steps) == (defaults.GENERIC["rank"], defaults.GENERIC["steps"])  # the rest of the table
    assert TrainConfig(base=sdxl, method="full", **common).lr == 5e-6
    assert TrainConfig(base=sdxl, method="lora", lr=3e-4, **common).lr == 3e-4  # a flag still wins
    assert TrainConfig(base="embedded", method="lora", **common).lr == defaults.GENERIC["lr"]  # the tuned value


def test_resolution_order_flag_then_family_then_method_then_generic(tmp_path):
    dit, unet = _folder(tmp_path, "dit", "transformer"), _folder(tmp_path, "unet", "unet")
    assert defaults.family_of_base(dit) == "dit" and defaults.family_of_base(unet) == "unet"
    assert defaults.family_of_base("embedded") == "unet" and defaults.family_of_base("embedded-dit") == "dit"
    assert defaults.family_of_base(str(tmp_path / "missing")) is None
    common = dict(images="x", prompt="a photo of sks bag", out="o")
    # family > method > generic: LoLDU on a DiT takes the DiT's targets, steps and lr, its own rank
    c = TrainConfig(base=dit, method="loldu", **common)
    family = defaults.FAMILIES["dit"]["loldu"]
    assert (c.targets, c.steps, c.lr) == (family["targets"], family["steps"], family["lr"])
    assert c.rank == defaults.METHODS["loldu"]["rank"] and c.lr != defaults.METHODS["loldu"]["lr"]
    assert c.batch_size == defaults.GENERIC["batch_size"] and c.class_images == defaults.GENERIC["class_images"]
    assert c.sources["targets"].startswith("dit family") and c.sources["rank"].startswith("method default")
    assert c.sources["batch_size"] == "generic default"
    # the same method on a UNet: its own entry (attn+conv, 1000 steps)
    u = TrainConfig(base=unet, method="loldu", **common)
    assert (u.targets, u.steps) == ("attn+conv", 1000)
    # an unknown family gets the method's row; an unknown method the generic one
    assert TrainConfig(base=str(tmp_path / "missing"), method="loldu", **common).targets == "attn+conv"
    g = TrainConfig(base=unet, method="some-new-method", **common)
    assert (g.rank, g.lr, g.steps, g.targets) == tuple(defaults.GENERIC[k] for k in ("rank", "lr", "steps", "targets"))
    # a value set by the user wins over everything, and is recorded as set
    f = TrainConfig(base=dit, method="loldu", steps=7, targets="attn", lr=1e-3, **common)
    assert (f.steps, f.targets, f.lr, f.rank) == (7, "attn", 1e-3, 64)
    assert f.sources["steps"] == "set" and f.sources["rank"].startswith("method default")
    # Prodigy's lr is a multiplier of its own step size: the table's AdamW rate would be refused
    assert TrainConfig(base=unet, method="lora", optimizer="prodigy", **common).lr == 1.0


@pytest.mark.parametrize("prompt, identifier, expected", [
    ("a photo of sks bag", None, "a photo of a bag"),
    ("a sks dog", None, "a dog"),
    ("photo of ohwx man", None, "photo of a man"),
    ("sks bag", None, "a bag"),
    ("an ohwx apple on a table", None, "an apple on a table"),
    ("a photo of SKS bags", None, "a photo of bags"),
    ("a photo of zq9 umbrella", "zq9", "a photo of an umbrella"),
    ("a photo of a bag", None, None),
    ("a photo of skshoes", None, None),  # whole words only
    (None, None, None),
])
def test_class_prompt_is_the_prompt_without_its_identifier(prompt, identifier, expected):
    assert defaults.class_prompt_for(prompt, identifier) == expected


def test_prior_preservation_follows_the_prompt():
    common = dict(base="embedded", images="x", method="lora", out="o")
    on = TrainConfig(prompt="a photo of sks bag", **common)
    assert on.prior_preservation is True and on.class_prompt[0] == "a photo of a bag" and on.identifier == "sks"
    assert on.sources["class_prompt"] == "derived from the prompt + the base's own 9 prompts"
    # no identifier: nothing to preserve the prompt's class against; off, and the run says so in one line
    off = TrainConfig(prompt="a photo of a bag", **common)
    assert off.prior_preservation is False and off.class_prompt == []
    assert len(off.notes) == 1 and "no identifier token" in off.notes[0] and "--identifier" in off.notes[0]
    # the user's own token, their own class prompt, or prior preservation switched off
    mine = TrainConfig(prompt="a photo of zq9 bag", identifier="zq9", **common)
    assert mine.class_prompt[0] == "a photo of a bag" and mine.prior_preservation
    assert TrainConfig(prompt="a photo of a bag", class_prompt="a photo of a sandal", **common).prior_preservation
    assert TrainConfig(prompt="a photo of sks bag", prior_preservation=False, **common).class_prompt == []
    with pytest.raises(ValueError, match="needs --class-prompt"):
        TrainConfig(prompt="a photo of a bag", prior_preservation=True, **common).validate()
    with pytest.raises(ValueError, match="identifier 'zq9' is not a word of the prompt"):
        TrainConfig(prompt="a photo of sks bag", identifier="zq9", **common).validate()


def test_a_base_that_lists_its_own_prompts_has_them_preserved_too(tmp_path):
    unet = _folder(tmp_path, "unet", "unet")
    assert defaults.base_prompts(unet) == []  # a real checkpoint lists none: the derived class prompt alone
    plain = TrainConfig(base=unet, images="x", prompt="a photo of sks bag", method="lora", out="o")
    assert plain.class_prompt == ["a photo of a bag"] and plain.class_images == defaults.GENERIC["class_images"]
    (Path(unet) / "studio.json").write_text(json.dumps({"prior_prompts": ["a photo of a cat", "a photo of a bag"]}))
    listed = TrainConfig(base=unet, images="x", prompt="a photo of sks bag", method="lora", out="o")
    assert listed.class_prompt == ["a photo of a bag", "a photo of a cat"]  # the derived one first, no repeats
    assert listed.class_images == defaults.BASE_PROMPT_CLASS_IMAGES and listed.sources["class_images"].startswith("base")
    # the embedded models (made by studio pretrain) know the 9 Fashion-MNIST classes other than the held-out bag
    embedded = TrainConfig(base="embedded", images="x", prompt="a photo of sks bag", method="loldu", out="o")
    assert embedded.class_prompt[0] == "a photo of a bag" and len(embedded.class_prompt) == 10
    assert "a photo of a sneaker" in embedded.class_prompt
    assert TrainConfig(base="embedded", images="x", prompt="a photo of sks bag", class_images=3, out="o").class_images == 3


def test_config_yaml_holds_the_effective_values_and_resume_compares_them(tiny_sd_dir, make_subject, tmp_path,
                                                                         capsys, monkeypatch):
    subject = make_subject(2, seed=1)
    out = tmp_path / "run"
    # only what a new user gives (+ a short run: steps, tiny class set, no previews)
    argv = ["train", "--base", str(tiny_sd_dir), "--images", str(subject), "--prompt", "a photo of sks bag",
            "--method", "lora", "--steps", "2", "--class-images", "2", "--class-sampling-steps", "2",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("defaults for lora:"))
    # a tiny diffusers folder, not a studio-trained base: the checkpoint rate and batch, the rest from the table
    assert "lr 0.0001, batch-size 1 (checkpoint default" in line
    assert "class-prompt a photo of a bag (derived from the prompt)" in line
    saved = yaml.safe_load((out / "config.yaml").read_text())
    expected = defaults.values("lora", str(tiny_sd_dir))
    for key in ("rank", "targets", "lr", "batch_size"):
        assert saved[key] == expected[key], key
    assert saved["prior_preservation"] is True and saved["class_prompt"] == ["a photo of a bag"]
    assert saved["identifier"] == "sks" and saved["steps"] == 2 and saved["class_images"] == 2
    data = json.loads((out / "data.json").read_text())
    assert data["defaults"]["lr"].startswith("checkpoint default") and "steps" not in data["defaults"]
    assert data["defaults"]["rank"] == "generic default"
    assert data["class_prompt"] == ["a photo of a bag"] and data["plan"]["batch_size"] == 1
    # the same command resumes: its defaults resolve to what config.yaml holds
    assert main(argv + ["--resume"]) == 0
    # an explicit flag that differs from the recorded default is a change
    assert main(argv + ["--resume", "--lr", "0.01"]) == 2
    assert "lr: 0.0001 -> 0.01" in capsys.readouterr().err
    # so is a new table: the run compares effective values, not what was typed
    monkeypatch.setitem(defaults.GENERIC, "rank", 8)
    assert main(argv + ["--resume"]) == 2
    assert "rank: 4 -> 8" in capsys.readouterr().err
    assert run_status(out)["state"] == "done"


def test_python_door_and_yaml_get_the_same_defaults(tiny_sd_dir, tmp_path):
    from studio.commands.train import config_from_args
    from studio.cli import build_parser

    (tmp_path / "c.yaml").write_text(f"base: {tiny_sd_dir}\nimages: x\nprompt: a photo of sks bag\nmethod: sara\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--out", "o"])
    from_yaml = TrainConfig.from_dict(config_from_args(args))
    direct = TrainConfig(base=str(tiny_sd_dir), images="x", prompt="a photo of sks bag", method="sara", out="o")
    assert from_yaml == direct and direct.targets == "all" and direct.lr == defaults.CHECKPOINT["lr"]
    assert TrainConfig.from_dict(direct.to_dict()) == direct  # a recorded config loads back as itself


def test_cli_help_and_show_defaults(capsys):
    from studio.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    assert text.count("the method table: studio train --show-defaults METHOD") >= 6
    assert main(["train", "--show-defaults"]) == 0
    table = capsys.readouterr().out
    assert "| loldu | dit | 64 | attn+ff | 0.003 | 1000 |" in table and "| full | unet |" in table
    assert main(["train", "--show-defaults", "tlora", "--base", "embedded-dit"]) == 0
    described = capsys.readouterr().out
    assert "attn+ff" in described and "dit family default (tlora)" in described
    assert main(["train", "--show-defaults", "nope"]) == 2


def test_subject_bench_reads_the_same_table(monkeypatch):
    from studio.bench.subject import method_settings

    for method in ("lora", "loldu", "tlora", "sara", "full"):
        for dit in (False, True):
            table = defaults.values(method, family="dit" if dit else "unet")
            settings = method_settings(method, dit)
            assert settings and all(settings[k] == table[k] for k in settings), (method, dit)
    monkeypatch.setitem(defaults.FAMILIES["dit"], "lora", {"steps": 123})
    assert method_settings("lora", True)["steps"] == 123 and method_settings("lora", False)["steps"] == 600


def test_jobs_count_the_table_steps(tmp_path):
    from studio.jobs import JobStore

    job = JobStore(tmp_path).submit({"images": "x", "prompt": "a photo of sks bag", "method": "loldu"})
    assert job.steps == defaults.values("loldu", "embedded")["steps"]
