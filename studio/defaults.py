"""Training defaults per method and per model family: the ONE table the CLI, YAML configs, the Python door
(TrainConfig), the Train tab and the subject benchmark read.

The values were tuned on the subject benchmarks (`studio bench subject`, docs/training.md has what was tried):
the embedded UNet (`embedded`, a StableDiffusionPipeline) and the embedded DiT (`embedded-dit`, a PixArt-style
transformer). Resolution order for every field below: a value the user set (flag, YAML key, keyword, UI field)
> the family's override for the method > the method's entry > GENERIC.

Torch-free (the UI reads it before anything loads): a base's family is read from its model_index.json.

    from studio.defaults import resolve, table
    resolve("loldu", "embedded-dit")     # -> {"rank": (64, "method default (loldu)"), "targets": ("attn+ff", ...)}
"""
import json
import re
from pathlib import Path

# Settings every method gets unless its own entry (or its family's) says otherwise. batch_size 4: every
# benchmark row was measured at batch 4 (the 8 subject images in 2 steps an epoch); at batch 1 the same steps
# see a quarter of the examples.
GENERIC = {"rank": 4, "targets": "attn", "lr": 3e-3, "steps": 600, "batch_size": 4,
           "prior_preservation": True, "class_images": 50}
# Per method: only what differs from GENERIC (docs/training.md, "Subject benchmark results").
METHODS = {
    "lora": {},
    "dora": {},
    "loldu": {"rank": 64, "lr": 2e-3, "targets": "attn+conv", "steps": 1000},  # r32 / attn alone: too little capacity
    "flora": {},
    "sara": {"targets": "all"},
    "tlora": {},
    "full": {"lr": 1e-4, "steps": 300},
}
# Families whose denoiser differs. "dit": a transformer denoiser (PixArt, SD3, Flux) has no convolutions, so
# LoLDU's "attn+conv" is attention alone there (0.70 at 1000 steps); LoLDU and TLoRA take the MLPs instead
# (tuned on embedded-dit, 2026-11-29). With the "sks" prompt and the defaults (2026-12-07) LoLDU and SaRA reached
# 0.75 and 0.70 at 1000 steps with the method rates; measured on embedded-dit with the defaults bench (20 images):
# LoLDU lr 1e-3 / 2e-3 / 3e-3 / 5e-3 -> 0.55 / 0.75 / 0.85 / 0.60 (rank 128 at 2e-3: 0.35), SaRA lr 1e-2 at
# 800 / 1000 steps -> 0.80 / 0.95 (1000 steps ran past 10 minutes on the loaded machine); TLoRA 400 / 600 steps ->
# 0.25 / 0.90 (600 steps: 358 s on the idle machine, 2 threads, 2026-12-08).
FAMILIES = {
    "unet": {},
    "dit": {"loldu": {"targets": "attn+ff", "steps": 1000, "lr": 3e-3}, "tlora": {"targets": "attn+ff", "steps": 600},
            "sara": {"steps": 800, "lr": 1e-2}},
}
FAMILY_LABELS = {"unet": "UNet (SD1.x/2.x, SDXL)", "dit": "DiT (PixArt, SD3, Flux)"}
# The table above was tuned on the studio's own small models. A real checkpoint (any base without a studio.json:
# SD1.5, SDXL, SD3, Flux) gets the learning rate and batch of diffusers' DreamBooth LoRA scripts instead: 3e-3 on
# a billion-parameter denoiser overshoots, and batch 4 at 1024 px is what most GPUs cannot hold.
CHECKPOINT = {"lr": 1e-4, "batch_size": 1}
CHECKPOINT_METHODS = {"full": {"lr": 5e-6}}  # full fine-tuning: the DreamBooth script's rate
# The TrainConfig fields whose default comes from this table (None there means "the table's value").
FIELDS = tuple(GENERIC)
# A base that lists the concepts it knows (studio.json "prior_prompts", or the classes `studio pretrain` trained
# it on) has them preserved too, beside the derived class prompt, with this many images each. Measured on
# `embedded`: the derived "a photo of a bag" alone kept LoRA's prior (-4.4 points) but not LoLDU's (-58), whose
# update reaches every prompt; the subject benchmark always preserved the 9 pretrained prompts at 8 images each.
BASE_PROMPT_CLASS_IMAGES = 8

# Rare tokens that DreamBooth-style prompts use as the subject's identifier ("a photo of sks bag"). The class
# prompt for prior preservation is the instance prompt without it ("a photo of a bag").
IDENTIFIERS = ("sks", "ohwx", "zwx", "xjy", "tok", "phol", "szn", "bxq", "qwe", "[v]", "<v>")
_DETERMINERS = {"a", "an", "the", "my", "your", "his", "her", "its", "our", "their", "this", "that", "one", "some"}
_EMBEDDED = {"embedded": "embedded", "embedded-dit": "embedded-dit"}  # names -> folders under assets/


def model_index(base) -> dict | None:
    """The base's model_index.json without loading anything: the embedded names, a folder, or a hub id already
    in the local hub cache (no network). None when it cannot be read."""
    base = str(base or "embedded")
    path = None
    if base in _EMBEDDED:
        from pipelines.assets import assets_dir  # torch-free

        path = assets_dir() / _EMBEDDED[base] / "model_index.json"
    elif Path(base).expanduser().is_dir():
        path = Path(base).expanduser() / "model_index.json"
    elif base.count("/") == 1 and not base.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base, "model_index.json")
            path = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - no hub library or a malformed id: the family is unknown
            path = None
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def family_of_base(base) -> str | None:
    """'unet' or 'dit' (the table's family keys) for a base, read from its model_index.json; None if unknown."""
    index = model_index(base)
    if not index:
        return None
    has = lambda slot: isinstance(index.get(slot), list) and index[slot][:1] != [None]  # noqa: E731
    if has("transformer"):
        return "dit"
    if has("unet"):
        return "unet"
    return None


def base_prompts(base) -> list:
    """The prompts of the concepts a base says it knows, from its studio.json: "prior_prompts", or for a model
    `studio pretrain` made (it records "held_out_class") the Fashion-MNIST class prompts it was trained on.
    Empty for any other base (a real checkpoint lists none)."""
    index_folder = _folder_of(base)
    path = index_folder / "studio.json" if index_folder is not None else None
    try:
        info = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return []
    if isinstance(info.get("prior_prompts"), list):
        return [str(p) for p in info["prior_prompts"] if str(p).strip()]
    if info.get("held_out_class"):
        from studio.fashion import CLASSES, prompt_for  # torch-free

        return [prompt_for(c) for c in CLASSES if c != info["held_out_class"]]
    return []


def _folder_of(base) -> Path | None:
    base = str(base or "embedded")
    if base in _EMBEDDED:
        from pipelines.assets import assets_dir

        return assets_dir() / _EMBEDDED[base]
    path = Path(base).expanduser()
    return path if path.is_dir() else None


def studio_trained(base) -> bool:
    """Whether the base is one of the studio's own small models (a folder with a studio.json): the table's values
    were tuned on those."""
    folder = _folder_of(base)
    return folder is not None and (folder / "studio.json").is_file()


def class_prompts_for(prompt, base=None, identifier=None) -> list:
    """The default class prompts: the prompt without its identifier, then the base's own prompts (base_prompts).
    Empty without an identifier."""
    derived = class_prompt_for(prompt, identifier)
    if not derived:
        return []
    return [derived] + [p for p in base_prompts(base) if p.strip().lower() != derived.strip().lower()]


def resolve(method, base=None, family="auto") -> dict:
    """{field: (value, where it comes from)} for every table field: the family's entry for the method, else the
    method's, else GENERIC. family: 'unet', 'dit', None (generic), or 'auto' (read from base)."""
    family = family_of_base(base) if family == "auto" else family
    method = str(method or "lora")
    own, fam = METHODS.get(method, {}), FAMILIES.get(family or "", {}).get(method, {})
    out = {}
    listed = len(base_prompts(base)) if base is not None else 0
    checkpoint = {**CHECKPOINT, **CHECKPOINT_METHODS.get(method, {})} if base is not None and not studio_trained(base) \
        else {}
    for name, value in GENERIC.items():
        if name in checkpoint:
            out[name] = (checkpoint[name], "checkpoint default (a base the studio did not train: diffusers' "
                                           "DreamBooth scripts' value)")
        elif name == "class_images" and listed:
            out[name] = (BASE_PROMPT_CLASS_IMAGES, f"base default: {BASE_PROMPT_CLASS_IMAGES} per prompt, the base "
                                                   f"lists {listed} prompts of its own")
        elif name in fam:
            out[name] = (fam[name], f"{family} family default ({method})")
        elif name in own:
            out[name] = (own[name], f"method default ({method})")
        else:
            out[name] = (value, "generic default")
    return out


def values(method, base=None, family="auto") -> dict:
    """resolve() without the sources: {field: value}."""
    return {k: v for k, (v, _) in resolve(method, base, family).items()}


def table(methods=None) -> list:
    """Rows of the whole table (one per method and family), for `studio train --show-defaults` and the docs."""
    rows = []
    for method in methods or list(METHODS):
        for family in ("unet", "dit"):
            rows.append({"method": method, "family": family, **values(method, family=family)})
    return rows


def format_table(methods=None) -> str:
    """The table as Markdown (torch-free; studio.bench.markdown_table imports torch)."""
    rows = table(methods)
    columns = ["method", "family", *FIELDS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |"
              for r in rows]
    return "\n".join(lines)


def describe(method, base=None) -> str:
    """Several lines: the method's defaults on this base's family, and where each comes from."""
    family = family_of_base(base)
    where = FAMILY_LABELS.get(family, "unknown family: generic defaults")
    lines = [f"defaults for {method} on {base or 'embedded'} ({where}):"]
    for name, (value, source) in resolve(method, base, family).items():
        lines.append(f"  --{name.replace('_', '-'):<20} {value!s:<10} {source}")
    lines.append("  --class-prompt         the prompt without its identifier token (e.g. 'a photo of sks bag' -> "
                 "'a photo of a bag')")
    own = base_prompts(base)
    if own:
        lines.append(f"                         + the {len(own)} prompts the base lists as its own: {'; '.join(own)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ class prompts

def find_identifier(prompt, identifier=None) -> str | None:
    """The identifier token in the prompt: `identifier` when given and present, else the first known rare token
    (IDENTIFIERS, whole words, any case); None when there is none."""
    if not prompt:
        return None
    words = re.findall(r"\S+", str(prompt))
    bare = [w.strip(",.;:!?\"'()").lower() for w in words]
    wanted = [str(identifier).lower()] if identifier else list(IDENTIFIERS)
    for token in wanted:
        if token in bare:
            return words[bare.index(token)].strip(",.;:!?\"'()")
    return None


def class_prompt_for(prompt, identifier=None) -> str | None:
    """DreamBooth's class prompt: the instance prompt without its identifier ("a photo of sks bag" -> "a photo
    of a bag"; "a sks dog" -> "a dog"; "photo of ohwx man" -> "photo of a man"). An article is put where the
    identifier stood when no determiner precedes it and the next word is not a plural. None without an
    identifier (see find_identifier)."""
    token = find_identifier(prompt, identifier)
    if token is None:
        return None
    words = re.findall(r"\S+", str(prompt))
    at = [w.strip(",.;:!?\"'()").lower() for w in words].index(token.lower())
    rest = words[at + 1:]
    before = words[:at]
    nxt = rest[0].strip(",.;:!?\"'()").lower() if rest else ""
    previous = before[-1].strip(",.;:!?\"'()").lower() if before else ""
    plural = nxt.endswith("s") and not nxt.endswith(("ss", "us", "is"))
    article = []
    if nxt and nxt not in _DETERMINERS and previous not in _DETERMINERS and not previous.isdigit() and not plural:
        article = ["an" if nxt[0] in "aeiou" else "a"]
    text = " ".join(before + article + rest).strip()
    return text or None
