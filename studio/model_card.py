"""The model card (README.md) beside a trained adapter, as diffusers' training scripts write one: YAML front matter
(base model, tags, trigger prompt), what was trained and how, the run's last validation samples (copied beside it,
linked relatively) and the lines that load it, with the studio and with diffusers.

    write_model_card(run_dir / "adapter", config, run_dir)    # the training loop calls this once, at the end
"""
import json
import re
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path

from studio.files import atomic_path, write_text

CARD_NAME = "README.md"
SAMPLES = "samples"  # beside the card: the copied validation images
EMBEDDED = ("embedded", "embedded-dit")  # base names only the studio's load_pipeline knows
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "loldu": "LoLDU", "flora": "FLoRA", "sara": "SaRA", "tlora": "TLoRA"}
_SAMPLE = re.compile(r"^p(\d+)-seed(-?\d+)\.png$")  # samples/step-NNNNNN/p<prompt index>-seed<seed>.png
_NOT_SHOWN = ("out", "resume", "force", "quiet")  # settings about this machine's run, not about the adapter


def write_model_card(result, config, run_dir=None) -> Path:
    """Write <result>/README.md for the adapter (or fully fine-tuned denoiser) in folder `result`, trained with
    `config` (a TrainConfig or its dict); `run_dir` (default: result's parent) holds samples/step-NNNNNN/, whose newest
    images are copied to <result>/samples/. Every file is written to a temporary name and renamed; returns the card."""
    result = Path(result)
    run_dir = Path(run_dir) if run_dir is not None else result.parent
    c = asdict(config) if is_dataclass(config) else dict(config)
    adapter = json.loads((result / "adapter_config.json").read_text()) if (result / "adapter_config.json").is_file() else {}
    card = _Card(result, run_dir.name or result.name, c, adapter)
    step, images = _last_samples(run_dir)
    lines = card.front() + card.about() + card.samples(step, _copy_samples(images, result)) + card.usage()
    shown = {k: v for k, v in c.items() if v not in (None, [], {}, "") and k not in _NOT_SHOWN}
    lines += ["", "## Training settings", "", "```json", json.dumps(shown, indent=2, sort_keys=True, default=str), "```", ""]
    path = result / CARD_NAME
    write_text(path, "\n".join(lines))
    return path


def _last_samples(run_dir) -> tuple:
    """(step, [png paths]) of the newest samples/step-NNNNNN folder of a run that holds images, or (None, [])."""
    folders = sorted(p for p in (Path(run_dir) / "samples").glob("step-*") if p.is_dir() and p.name[5:].isdigit())
    for folder in reversed(folders):
        images = sorted(p for p in folder.glob("*.png") if _SAMPLE.match(p.name))
        if images:
            return int(folder.name[5:]), images
    return None, []


def _copy_samples(images, result: Path) -> list:
    copied = []
    for image in images:
        target = result / SAMPLES / image.name
        with atomic_path(target) as tmp:
            shutil.copyfile(image, tmp)
        copied.append(target)
    return copied


class _Card:
    def __init__(self, result: Path, name: str, c: dict, adapter: dict):
        self.result, self.name, self.c, self.adapter = result, name, c, adapter
        self.base, self.method = str(c.get("base") or "embedded"), str(c.get("method") or "lora")
        self.prompt = c.get("prompt") or ""
        self.prompts = c.get("validation_prompts") or [self.prompt]
        self.one_step = bool(c.get("objective_options"))  # HiPA's objective: one model call per image
        self.full = not adapter  # method "full": the folder is a diffusers denoiser
        model_class = adapter.get("model_class", "")
        self.component = result.name if self.full else ("unet" if "UNet" in model_class else "transformer")
        self.pixart = "PixArt" in model_class

    def front(self) -> list:
        tags = ["text-to-image", "diffusers", "diffusion-studio", self.method] + (["hipa"] if self.one_step else [])
        lines = ["---", f"base_model: {json.dumps(self.base)}", "library_name: diffusers", "tags:"] + [f"- {t}" for t in tags]
        if self.prompt and not self.one_step:
            lines.append(f"instance_prompt: {json.dumps(self.prompt)}")
        return lines + ["---"]

    def about(self) -> list:
        c = self.c
        if self.full:
            what = f"The {self.component} of `{self.base}`, fully fine-tuned"
        else:
            options = ", ".join(f"{k}={v}" for k, v in sorted((c.get("adapter_options") or {}).items()))
            what = (f"A {METHOD_NAMES.get(self.method, self.method)} adapter (rank {c.get('rank')}, alpha "
                    f"{c.get('alpha') or c.get('rank')}{', rsLoRA scale' if c.get('rslora') else ''}, targets "
                    f"`{c.get('targets')}`{', options ' + options if options else ''}) for `{self.base}`")
        how = (f"distilled for one-step sampling (HiPA) in {c.get('steps')} steps" if self.one_step else
               f"trained with Diffusion Studio on the images in `{c.get('images')}` for {c.get('steps')} steps")
        lines = ["", f"# {self.name}", "", f"{what}, {how} (learning rate {c.get('lr')}, batch {c.get('batch_size')} x "
                 f"{c.get('grad_accum')} accumulated, seed {c.get('seed')}"
                 f"{', prior preservation' if c.get('prior_preservation') else ''})."]
        if self.prompt and not self.one_step:
            lines += ["", "## Trigger prompt", "", f"Use `{self.prompt}` in the prompt to draw the subject."]
        return lines

    def samples(self, step, copied) -> list:
        if not copied:
            return []
        lines = ["", f"## Samples (step {step}, the run's last validation)", "", "| prompt | seed | image |", "|---|---|---|"]
        for image in copied:
            index, seed = map(int, _SAMPLE.match(image.name).groups())
            prompt = self.prompts[index] if index < len(self.prompts) else ""
            lines.append(f"| {prompt} | {seed} | ![{image.stem}]({SAMPLES}/{image.name}) |")
        return lines

    def loader(self) -> list:
        if self.base in EMBEDDED:
            return ["from pipelines import load_pipeline", "", f"pipe = load_pipeline({self.base!r})  # a diffusers pipeline"]
        return ["from diffusers import DiffusionPipeline", "", f"pipe = DiffusionPipeline.from_pretrained({self.base!r})"]

    def usage(self) -> list:
        folder, component, prompt, lines = str(self.result), self.component, self.prompt, ["", "## Use it", ""]
        if self.full:
            config = self.result / "config.json"
            cls = (json.loads(config.read_text()).get("_class_name") if config.is_file() else None) or "UNet2DConditionModel"
            return lines + ["```python", f"from diffusers import {cls}", *self.loader(),
                            f"pipe.{component} = {cls}.from_pretrained({folder!r}).to(pipe.device)", "```"]
        if self.one_step:
            return lines + ["```python", "from pipelines import one_step", *self.loader(),
                            f"images = one_step(pipe, {self.prompts[0]!r}, adapter={folder!r}).images", "```", "",
                            f"or `studio generate --base {self.base} --one-step {folder} --prompt \"{self.prompts[0]}\" "
                            f"--out out.png`."]
        lora, rank = f"{self.name}-lora", self.c.get("rank")
        exact = ("exact at the adapter's rank" if self.method == "lora" else
                 f"a rank-{rank} SVD of its weight change: a higher rank comes closer")
        lines += ["With the studio (every method, exactly as trained):", "", "```python", "from adapters import load_adapter",
                  *self.loader(), f"load_adapter(pipe.{component}, {folder!r}, weight=1.0)",
                  f"image = pipe({prompt!r}).images[0]", "```", "",
                  f"or `studio generate --base {self.base} --adapter {folder}:1.0 --prompt \"{prompt}\" --out out.png`.", "",
                  f"With diffusers: write it once as a plain LoRA file ({exact}),", "", "```python",
                  "from adapters import export_lora, load_adapter", *self.loader(), f"load_adapter(pipe.{component}, {folder!r})",
                  f"export_lora(pipe.{component}, {lora!r}, rank={rank})  # {lora}/pytorch_lora_weights.safetensors", "```", ""]
        if self.pixart:
            return lines + ["then load it in ComfyUI (diffusers has no `load_lora_weights` for PixArt pipelines)."]
        return lines + ["then load it on a plain pipeline:", "", "```python", *self.loader(),
                        f"pipe.load_lora_weights({lora!r})", f"image = pipe({prompt!r}).images[0]", "```"]
