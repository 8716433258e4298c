"""Train tab: subject images, method, steps (with the epochs/repeats arithmetic shown live); Start, Stop,
Resume; live progress with ETA, the loss curve, validation previews and the log.

Everything comes from the job store on disk (studio.jobs: SQLite + one run folder per job), so reloading
the page or restarting the server shows the same jobs. Jobs run one after another in a worker process
(`studio jobs worker --until-empty`, the same command a user can run by hand), started when work is queued.
"""
import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio import library
from studio.files import read_jsonl
from studio.ui import base_choices, first_line, load_libraries, raise_for_ui

log = logging.getLogger("studio.ui")

POLL_SECONDS = 1.5
FULL = "full"
KIND_CHOICES = [("A subject (DreamBooth-style)", "train"), ("One-step sampling (HiPA distillation)", "hipa")]
HIPA_STEPS = 1500  # studio.hipa.TRAIN_DEFAULTS["steps"]
SOURCE_CHOICES = [("Bundled sample subject", "sample"), ("My images (upload)", "upload")]
PRECISIONS = ["auto", "no", "fp16", "bf16"]
LR_SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
STATE_BADGES = {"queued": "⏳ queued", "running": "▶ running", "stopping": "⏸ stopping", "done": "✔ done",
                "failed": "✖ failed", "cancelled": "■ stopped"}


def method_names() -> list:
    """The adapter registry's names (+ full fine-tuning). adapters/registry.py imports nothing, but importing
    it through the package would import torch; reading it alone keeps the page's cold start fast."""
    import sys

    if "adapters.registry" in sys.modules:
        return list(sys.modules["adapters.registry"].METHODS) + [FULL]
    import importlib.util

    package = importlib.util.find_spec("adapters")
    location = Path(next(iter(package.submodule_search_locations))) / "registry.py"
    spec = importlib.util.spec_from_file_location("_studio_adapter_registry", location)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.METHODS) + [FULL]


def method_options(method: str) -> dict:
    """The method's own options with their defaults (empty for full fine-tuning)."""
    if method == FULL:
        return {}
    from adapters.core import method_class

    return dict(getattr(method_class(method), "options", {}) or {})


def parse_options(text: str) -> dict:
    """'key = value' lines (values read as YAML: numbers, booleans, lists) -> dict."""
    import yaml

    options = {}
    for number, line in enumerate(str(text or "").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError(f"method option line {number} needs 'key = value', got {line!r}")
        key, value = line.split("=", 1)
        options[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else None
    return options


def count_images(folder) -> int:
    from studio.data import IMAGE_SUFFIXES

    folder = Path(folder)
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0


def plan_text(images: int, steps, repeats, batch, accum) -> str:
    """The data module's own step/epoch arithmetic (studio.data.StepPlan), shown before the run starts."""
    from studio.data import StepPlan

    try:
        plan = StepPlan(images=int(images), repeats=max(1, int(repeats or 1)), batch_size=max(1, int(batch or 1)),
                        grad_accum=max(1, int(accum or 1)), processes=1, steps=max(1, int(steps or 1)))
    except (TypeError, ValueError):
        return "Fill in steps, repeats, batch size and accumulation to see what they mean."
    if images < 1:
        return "Choose the subject images to see how many epochs the steps make."
    return "**What these steps mean:**\n\n" + "\n".join(f"- {line}" for line in plan.describe().splitlines())


_PLANS = {}  # (planner, prediction) by settings and device kind: the change handler and Start share them


def memory_line(settings: dict, device=None) -> tuple:
    """(markdown, fits) for a subject job's settings: the peak memory studio.plan predicts (one training step on
    fake tensors: nothing is loaded or allocated) against the device the worker trains on, and when it does not
    fit, the fastest memory savers that would. The prediction is cached; the memory it is held against is read
    each time (on a CPU, the RAM available now)."""
    from studio.plan import Planner, device_memory, format_size
    from studio.train import TrainConfig

    load_libraries()
    kind, total = device_memory(device)
    key = json.dumps([settings, kind], sort_keys=True, default=str)
    if key not in _PLANS:
        config = TrainConfig.from_dict({**settings, "out": "placeholder"})
        planner = Planner(config.base, device=kind)
        _PLANS[key] = (planner, config, planner.predict(config))
    planner, config, prediction = _PLANS[key]
    fits = prediction.peak <= planner.usable(total)
    text = (f"**Memory:** predicted peak {format_size(prediction.peak)} ({prediction.bottleneck}) of "
            f"{format_size(total)} on {kind}")
    if not fits:
        found = planner.search(config, total, limit=1).fits  # the planner keeps its fake runs: no step twice
        text = (f"⚠ {text}: this run would run out of memory; "
                + (f"it fits with {found[0].describe()}." if found else "no memory saver makes it fit."))
    return text, fits


def method_defaults(method, base=None, prompt=None) -> dict:
    """The Train form's values from the method table (studio/defaults.py) for a method on a base's family, the
    class prompt derived from the instance prompt, and a line saying where they come from."""
    from studio import defaults

    base = str(base or "embedded").strip()
    family = defaults.family_of_base(base)
    resolved = defaults.resolve(method, base, family)
    values = {k: v for k, (v, _) in resolved.items()}
    derived = defaults.class_prompts_for(prompt, base)
    values["prior_preservation"] = bool(values["prior_preservation"] and derived)
    values["class_prompt"] = "\n".join(derived)
    shown = {"rank": "rank {}", "targets": "targets {}", "lr": "lr {:g}", "steps": "{} steps", "batch_size": "batch {}",
             "class_images": "{} class images"}
    by_source = {}
    for name, (value, source) in resolved.items():
        if name in shown and not (method == FULL and name in ("rank", "targets")):
            by_source.setdefault(source, []).append(shown[name].format(value))
    parts = [f"{', '.join(items)} ({source})" for source, items in by_source.items()]
    if derived and values["prior_preservation"]:
        parts.append(f"prior preservation on '{derived[0]}' (the prompt without '{defaults.find_identifier(prompt)}')"
                     + (f" and the base's own {len(derived) - 1} prompts" if len(derived) > 1 else ""))
    else:
        parts.append("prior preservation off: no identifier token (sks, ohwx, ...) in the instance prompt to derive "
                     "a class prompt from")
    where = defaults.FAMILY_LABELS.get(family, "family unknown: generic values")
    values["source"] = (f"**Defaults for {method} on {base}** ({where}): " + "; ".join(parts)
                        + f". From the method table (studio/defaults.py, `studio train --show-defaults {method}`); "
                          f"change a field to override it.")
    return values


def validation_prompt_lines(text) -> list:
    """The Validation prompts box: one prompt per line (blank lines dropped)."""
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def memory_settings(base, method, rank, targets, options, batch, accum, precision, checkpointing, prior) -> dict:
    """The Train form's fields that change a run's memory, as TrainConfig keys."""
    settings = {"base": str(base or "embedded").strip(), "method": method, "batch_size": int(batch or 1),
                "grad_accum": int(accum or 1), "mixed_precision": precision,
                "gradient_checkpointing": bool(checkpointing), "prior_preservation": bool(prior),
                "class_prompt": ["a photo"] if prior else []}
    if method != FULL:
        settings.update(rank=int(rank or 1), targets=str(targets or "attn").strip(), adapter_options=parse_options(options))
    return settings


# --- the worker process ------------------------------------------------------------------------------------

class WorkerProcess:
    """Starts `studio jobs worker --until-empty` when jobs are queued and no worker holds the store."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.proc = None
        self._last_spawn = 0.0
        self._lock = threading.Lock()
        atexit.register(self.shutdown)

    def store(self):
        from studio.jobs import JobStore

        return JobStore(self.home)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _held_elsewhere(self) -> bool:
        import fcntl

        path = self.home / "worker.lock"
        if not path.exists():
            return False
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def ensure(self, store=None) -> str:
        """Make sure queued work gets a worker. Returns 'running', 'started', 'external' or 'idle'."""
        with self._lock:
            if self.alive():
                return "running"
            store = store or self.store()
            store.recover()  # jobs left running by a dead worker go back to the queue (resuming)
            if not store.list(states=["queued"]):
                return "idle"
            if self._held_elsewhere():
                return "external"
            if time.monotonic() - self._last_spawn < 3:
                return "running"
            self._last_spawn = time.monotonic()
            env = dict(os.environ, STUDIO_HOME=str(self.home), PYTHONUNBUFFERED="1")
            log_file = open(self.home / "worker.log", "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", "studio", "jobs", "--home", str(self.home), "worker",
                                          "--until-empty"], stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
            log_file.close()
            log.info("started a training worker (pid %s), log in %s", self.proc.pid, self.home / "worker.log")
            return "started"

    def shutdown(self):
        """On server exit: interrupt the worker, which puts its job back in the queue to resume next time."""
        if not self.alive():
            return
        try:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        except OSError:
            pass


# --- reading a job's run folder --------------------------------------------------------------------------

def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def job_label(job) -> str:
    return f"#{job.id} {job.name} ({job.state})"


def job_rows(jobs) -> list:
    rows = []
    for job in reversed(jobs):
        progress = f"{job.step}/{job.steps}" if job.steps else "-"
        rows.append([job.id, job.name, STATE_BADGES.get(job.state, job.state), progress,
                     job.config.get("method", ""), str(job.config.get("base", "")),
                     time.strftime("%H:%M:%S", time.localtime(job.created))])
    return rows


def eta_text(records, job) -> str:
    steps = [r for r in records if "loss" in r and "elapsed" in r]
    if len(steps) < 2 or job.state not in ("running", "stopping"):
        return ""
    window = steps[-20:]
    rate = (window[-1]["elapsed"] - window[0]["elapsed"]) / max(window[-1]["step"] - window[0]["step"], 1)
    left = max(int(job.steps) - int(steps[-1]["step"]), 0) * rate
    return f" · {rate:.2f} s/step · ETA {left:.0f} s"


def status_markdown(job, records) -> str:
    if job is None:
        return "No job selected. Start one on the left; it appears here with its progress."
    pct = int(100 * job.step / job.steps) if job.steps else 0
    text = f"**#{job.id} {job.name}** · {STATE_BADGES.get(job.state, job.state)} · step {job.step}/{job.steps} ({pct}%)"
    text += eta_text(records, job)
    if job.state == "queued":
        text += " · waiting for the worker (jobs run one after another)"
    if job.error:
        text += f"\n\n{'⚠ ' if job.state == 'failed' else ''}{job.error}"
    if job.state == "done":
        marker = read_json(Path(job.run_dir) / library.LIBRARY_MARKER)
        if marker.get("name"):
            text += f"\n\nThe adapter is in the library as **{marker['name']}**: pick it in the Generate tab."
    return text


def progress_html(job) -> str:
    pct = int(100 * job.step / job.steps) if job is not None and job.steps else 0
    color = {"failed": "#d33", "cancelled": "#999", "done": "#2a2"}.get(getattr(job, "state", ""), "#f97316")
    return (f"<div style='background:#eee;border-radius:4px;height:10px;width:100%'>"
            f"<div id='train-progress-fill' data-pct='{pct}' style='background:{color};height:10px;border-radius:4px;"
            f"width:{pct}%'></div></div>")


def loss_frame(records):
    """The loss curve as a frame (raw and smoothed), or None before the first logged step: a LinePlot first
    given an empty frame keeps an empty colour domain and draws no line for later data (gradio 6)."""
    import pandas as pd

    points = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r and "step" in r]
    if not points:
        return None
    frame = pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                          "loss": pd.Series([p[1] for p in points], dtype="float64")})
    smooth = frame["loss"].ewm(alpha=0.1).mean()
    return pd.concat([frame.assign(series="loss"), frame.assign(loss=smooth, series="smoothed")], ignore_index=True)


def sample_items(run_dir) -> list:
    """Validation images as (path, caption), newest step first."""
    folder = Path(run_dir) / "samples"
    if not folder.is_dir():
        return []
    items = []
    for step_dir in sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True):
        step = step_dir.name[5:].lstrip("0") or "0"
        for image in sorted(step_dir.glob("*.png")):
            items.append((str(image), f"step {step} · {image.stem}"))
    return items[:24]


def log_text(job, records) -> str:
    lines = []
    data = read_json(Path(job.run_dir) / "data.json")
    plan = data.get("plan")
    if plan:
        try:
            from studio.data import StepPlan

            keys = ("images", "repeats", "batch_size", "grad_accum", "processes", "steps", "class_images", "padding",
                    "buckets")
            lines += StepPlan(**{k: plan[k] for k in keys if k in plan}).describe().splitlines()
        except (TypeError, ValueError, KeyError):
            pass
    if data.get("trainable_params"):
        lines.append(f"method {data.get('method')}: {data['trainable_params']:,} trainable parameters; "
                     f"precision {data.get('mixed_precision')}; device {data.get('device')}")
    steps = [r for r in records if "loss" in r]
    every = max(1, len(steps) // 40)
    for r in records:
        if "event" in r:
            detail = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("event", "step", "paths"))
            lines.append(f"step {r.get('step')}: {r['event']}" + (f" ({detail})" if detail else ""))
        elif "loss" in r and (int(r["step"]) % every == 0 or r is steps[-1]):
            lines.append(f"step {r['step']:>5}/{job.steps}  loss {r['loss']:.4f}  lr {r.get('lr', 0):.2e}  "
                         f"{r.get('seconds', 0):.2f} s")
    lines.append(f"run folder: {job.run_dir}")
    if job.error:
        lines.append(f"job: {job.error}")
    return "\n".join(lines[-80:])


# --- the tab ---------------------------------------------------------------------------------------------

@dataclass
class TrainTab:
    connect: object  # connect(demo, lib): wire the polling timer once the Library tab exists


def build(ctx) -> TrainTab:
    worker = WorkerProcess(ctx.home)
    samples = library.sample_subjects()
    methods = method_names()
    first_method = "lora" if "lora" in methods else methods[0]
    initial = method_defaults(first_method, ctx.base, "a photo of sks bag")
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("### New training job")
            kind = gr.Radio(KIND_CHOICES, value="train", label="What to train", elem_id="train-kind")
            base = gr.Dropdown(base_choices(ctx), value=ctx.base, allow_custom_value=True, elem_id="train-base",
                               label="Base model (embedded, embedded-dit, or a diffusers folder)")
            with gr.Group(visible=False) as hipa_box:
                gr.Markdown("HiPA teaches a low-rank adapter to reproduce the base model's multi-step images in ONE "
                            "model call: the base model first makes the teacher pairs (cached in the run folder), then "
                            "the adapter trains on them. Use the result with one-step mode in the Generate tab.")
                pairs = gr.Number(label="Teacher pairs", value=512, precision=0, minimum=1, elem_id="train-pairs")
            with gr.Group() as subject_box:
                source = gr.Radio(SOURCE_CHOICES, value="sample" if samples else "upload", label="Subject images",
                                  elem_id="train-source")
                sample = gr.Dropdown(list(samples), value=next(iter(samples), None), label="Sample subject",
                                     elem_id="train-sample", visible=bool(samples),
                                     info=None if samples else "no sample subject is bundled yet (assets/subjects/)")
                upload = gr.File(file_count="multiple", file_types=["image"], label="Upload 3-20 photos of the subject",
                                 elem_id="train-upload", visible=not samples)
                prompt = gr.Textbox(label="Instance prompt (used for images without a .txt caption)",
                                    value="a photo of sks bag", elem_id="train-prompt")
            name = gr.Textbox(label="Job / adapter name (optional)", placeholder="e.g. my-bag", elem_id="train-name")
            with gr.Row():
                method = gr.Dropdown(methods, value=first_method, label="Method", elem_id="train-method")
                rank = gr.Number(label="Rank", value=initial["rank"], precision=0, minimum=1, elem_id="train-rank")
                alpha = gr.Number(label="Alpha (0 = rank)", value=0, elem_id="train-alpha")
                rslora = gr.Checkbox(label="rsLoRA scale: alpha / √rank (TLoRA's paper: alpha 1)", value=False,
                                     elem_id="train-rslora")
            options = gr.Textbox(label="Method options (key = value)", lines=2, elem_id="train-options", visible=False)
            with gr.Row():
                steps = gr.Number(label="Steps", value=initial["steps"], precision=0, minimum=1, elem_id="train-steps")
                repeats = gr.Number(label="Repeats per epoch", value=1, precision=0, minimum=1, elem_id="train-repeats")
            defaults_note = gr.Markdown(initial["source"], elem_id="train-defaults")
            plan = gr.Markdown(elem_id="train-plan")
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                with gr.Row():
                    lr = gr.Number(label="Learning rate", value=initial["lr"], elem_id="train-lr")
                    batch = gr.Number(label="Batch size", value=initial["batch_size"], precision=0, minimum=1,
                                      elem_id="train-batch")
                    accum = gr.Number(label="Gradient accumulation", value=1, precision=0, minimum=1, elem_id="train-accum")
                with gr.Row():
                    schedule = gr.Dropdown(LR_SCHEDULES, value="constant", label="LR schedule", elem_id="train-schedule")
                    warmup = gr.Number(label="Warm-up steps", value=0, precision=0, minimum=0, elem_id="train-warmup")
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="train-seed")
                with gr.Row():
                    targets = gr.Textbox(label="Targets (attn, ff, conv, all; join with +)", value=initial["targets"],
                                         elem_id="train-targets")
                    precision = gr.Dropdown(PRECISIONS, value="auto", label="Mixed precision", elem_id="train-precision")
                with gr.Row():
                    validate_every = gr.Number(label="Preview every N steps", value=50, precision=0, minimum=0,
                                               elem_id="train-validate-every")
                    validation_steps = gr.Number(label="Preview sampling steps", value=20, precision=0, minimum=1,
                                                 elem_id="train-validation-steps")
                    checkpoint_every = gr.Number(label="Checkpoint every N steps", value=100, precision=0, minimum=0,
                                                 elem_id="train-checkpoint-every")
                with gr.Row():
                    checkpointing = gr.Checkbox(label="Gradient checkpointing (less memory)", value=False,
                                                elem_id="train-grad-checkpointing")
                    flip = gr.Checkbox(label="Random flips", value=False, elem_id="train-flip")
                with gr.Row():
                    prior = gr.Checkbox(label="Prior preservation", value=initial["prior_preservation"],
                                        elem_id="train-prior")
                    class_prompt = gr.Textbox(label="Class prompt(s), one per line (default: the instance prompt "
                                                    "without its identifier token)", value=initial["class_prompt"],
                                              lines=2, elem_id="train-class-prompt")
                    class_images = gr.Number(label="Class images per prompt", value=initial["class_images"],
                                             precision=0, minimum=1, elem_id="train-class-images")
                validation_prompts = gr.Textbox(label="Validation prompts, one per line (empty: the instance prompt)",
                                                lines=3, elem_id="train-validation-prompts",
                                                placeholder="a photo of sks bag\na photo of sks bag on a beach")
            with gr.Row(equal_height=True):
                start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=1)
                memory = gr.Markdown("**Memory:** predicted when the settings change, and before a run starts.",
                                     elem_id="train-memory")
            submit_status = gr.Markdown(elem_id="train-submit-status")
        with gr.Column(scale=3):
            gr.Markdown("### Jobs")
            with gr.Row(equal_height=True):
                job = gr.Dropdown([], value=None, label="Job", elem_id="train-job", scale=3, allow_custom_value=True)
                stop = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train-stop", scale=1)
                resume = gr.Button("Resume", elem_id="train-resume", scale=1)
                mark = gr.Button("Mark as stopped", elem_id="train-mark-stopped", scale=1, size="sm")
            status = gr.Markdown(status_markdown(None, []), elem_id="train-status")
            bar = gr.HTML(progress_html(None), elem_id="train-progress")
            loss = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss",
                               elem_id="train-loss", height=260, x_title="step", y_title="loss")
            previews = gr.Gallery(label="Validation previews (step 0 = the base model)", columns=6, height=220,
                                  elem_id="train-samples", allow_preview=True, object_fit="contain")
            log_box = gr.Textbox(label="Log", lines=10, max_lines=16, interactive=False, elem_id="train-log",
                                 autoscroll=True)
            table = gr.Dataframe(headers=["id", "name", "state", "progress", "method", "base", "created"],
                                 value=[], interactive=False, elem_id="train-jobs", wrap=True, label="All jobs (newest first)")
    seen = gr.State({})

    def images_count(source_v, sample_v, upload_v) -> int:
        if source_v == "sample":
            folder = samples.get(sample_v)
            return count_images(folder) if folder else 0
        return len([f for f in (upload_v or []) if f])

    def on_source(source_v):
        return gr.update(visible=source_v == "sample"), gr.update(visible=source_v == "upload")

    def on_method(method_v):
        try:
            opts = method_options(method_v)
        except Exception as exc:  # noqa: BLE001
            gr.Warning(f"could not read the options of {method_v}: {first_line(exc)}")
            opts = {}
        low_rank = method_v != FULL
        text = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, str) else v}" for k, v in opts.items())
        return (gr.update(visible=low_rank), gr.update(visible=low_rank), gr.update(value=text, visible=bool(opts)))

    def on_defaults(kind_v, method_v, base_v, prompt_v):
        """A method or base picked: the table's values for it into the form, and where they come from. A HiPA job
        keeps its own defaults (studio.hipa.TRAIN_DEFAULTS): only the fields' visibility changes."""
        low_rank = method_v != FULL
        if kind_v == "hipa":
            return (gr.update(visible=low_rank), gr.update(visible=low_rank), *[gr.skip()] * 6,
                    "HiPA uses its own training defaults (studio/hipa.py) under the fields shown.")
        try:
            found = method_defaults(method_v, base_v or ctx.base, prompt_v)
        except Exception as exc:  # noqa: BLE001 - a half-typed base: say so, keep the form
            return (*[gr.skip()] * 8, f"**Defaults:** not read ({first_line(exc)})")
        return (gr.update(value=found["rank"], visible=low_rank), gr.update(value=found["targets"], visible=low_rank),
                found["lr"], found["steps"], found["batch_size"], found["prior_preservation"], found["class_prompt"],
                found["class_images"], found["source"])

    def on_prompt(prompt_v, base_v):
        """The class prompts follow the instance prompt (its identifier token dropped; the base's own prompts)."""
        from studio.defaults import class_prompts_for

        derived = class_prompts_for(prompt_v, base_v or ctx.base)
        return (gr.update(value=True), "\n".join(derived)) if derived else (gr.skip(), gr.skip())

    def on_plan(kind_v, source_v, sample_v, upload_v, steps_v, repeats_v, batch_v, accum_v, pairs_v):
        if kind_v == "hipa":
            return (f"**What these steps mean:** {int(pairs_v or 0)} teacher pairs first (one multi-step sample each), "
                    f"then {int(steps_v or 0)} steps on batches of those pairs.")
        return plan_text(images_count(source_v, sample_v, upload_v), steps_v, repeats_v, batch_v, accum_v)

    def on_memory(kind_v, *fields):
        if kind_v == "hipa":
            return "**Memory:** predicted for subject training (a HiPA run trains on its own teacher pairs)."
        try:
            return memory_line(memory_settings(fields[0] or ctx.base, *fields[1:]), ctx.device)[0]
        except Exception as exc:  # noqa: BLE001 - a half-typed form: say so beside Start, never fail the page
            return f"**Memory:** not predicted ({first_line(exc)})"

    def on_kind(kind_v, method_v, base_v):
        subject = kind_v != "hipa"
        try:
            steps_v = method_defaults(method_v, base_v or ctx.base)["steps"] if subject else HIPA_STEPS
        except Exception:  # noqa: BLE001
            steps_v = gr.skip()
        return (gr.update(visible=subject), gr.update(visible=not subject), gr.update(visible=subject),
                gr.update(value=steps_v))

    def submit(base_v, source_v, sample_v, upload_v, prompt_v, name_v, method_v, rank_v, alpha_v, rslora_v, options_v,
               steps_v,
               repeats_v, lr_v, batch_v, accum_v, schedule_v, warmup_v, seed_v, targets_v, precision_v,
               validate_v, vsteps_v, ckpt_v, checkpointing_v, flip_v, prior_v, class_prompt_v, class_images_v, kind_v,
               pairs_v, validation_prompts_v=""):
        from studio.jobs import JobStore

        try:
            if kind_v == "hipa":
                return submit_hipa(base_v, name_v, method_v, rank_v, alpha_v, rslora_v, options_v, steps_v, targets_v,
                                   pairs_v)
            if source_v == "sample":
                if sample_v not in samples:
                    raise ValueError("no sample subject is bundled yet: upload your own images instead")
                images = samples[sample_v]
            else:
                images = library.save_subject_upload(upload_v, ctx.home)
            if not str(prompt_v or "").strip():
                raise ValueError("write an instance prompt, e.g. 'a photo of sks bag'")
            job_name = str(name_v or "").strip()
            if job_name:
                library.check_name(job_name)
            else:
                job_name = f"{sample_v if source_v == 'sample' else 'subject'}-{method_v}"
            config = {
                "base": str(base_v or ctx.base).strip(), "images": str(images), "prompt": str(prompt_v).strip(),
                "method": method_v, "steps": int(steps_v), "repeats": int(repeats_v), "lr": float(lr_v),
                "batch_size": int(batch_v), "grad_accum": int(accum_v), "lr_scheduler": schedule_v,
                "warmup_steps": int(warmup_v), "seed": int(seed_v), "mixed_precision": precision_v,
                "validate_every": int(validate_v), "validation_steps": int(vsteps_v),
                "checkpoint_every": int(ckpt_v), "gradient_checkpointing": bool(checkpointing_v), "flip": bool(flip_v),
                "prior_preservation": bool(prior_v), "quiet": True,
                "validation_prompts": validation_prompt_lines(validation_prompts_v),
            }
            if method_v != FULL:
                config.update(rank=int(rank_v), alpha=float(alpha_v) if alpha_v else None, rslora=bool(rslora_v),
                              targets=str(targets_v or "attn").strip(), adapter_options=parse_options(options_v))
            if prior_v:
                config.update(class_prompt=[line.strip() for line in str(class_prompt_v or "").splitlines() if line.strip()],
                              class_images=int(class_images_v))
            if ctx.device:
                config["device"] = ctx.device
            try:
                text, fits = memory_line(memory_settings(base_v or ctx.base, method_v, rank_v, targets_v, options_v, batch_v,
                                                         accum_v, precision_v, checkpointing_v, prior_v), ctx.device)
            except Exception:  # noqa: BLE001 - the prediction only warns; the run reports its own errors
                log.exception("memory prediction failed")
                fits = True
            if not fits:
                gr.Warning(text.replace("**", "").lstrip("⚠ "))
            store = JobStore(ctx.home)
            new = store.submit(config, name=job_name)
            state = worker.ensure(store)
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        note = {"external": " Another worker is running this store's jobs; it will pick this one up."}.get(state, "")
        queued = len(store.list(states=["queued"])) - 1
        where = f" It waits behind {queued} queued job(s)." if queued > 0 else ""
        choices = [(job_label(j), j.id) for j in reversed(store.list())]
        return gr.update(choices=choices, value=new.id), f"Queued job **#{new.id} {new.name}**.{where}{note}"

    def submit_hipa(base_v, name_v, method_v, rank_v, alpha_v, rslora_v, options_v, steps_v, targets_v, pairs_v):
        """A HiPA job: HiPA's own training defaults (studio.hipa.hipa_config) under the few settings shown."""
        from studio.hipa import hipa_config
        from studio.jobs import JobStore
        from studio.train import TrainConfig

        if method_v == FULL:
            raise ValueError("HiPA trains an adapter: pick an adapter method, not full fine-tuning")
        job_name = str(name_v or "").strip() or f"one-step-{method_v}"
        library.check_name(job_name)
        settings = {"base": str(base_v or ctx.base).strip(), "method": method_v, "rank": int(rank_v),
                    "alpha": float(alpha_v) if alpha_v else None, "rslora": bool(rslora_v),
                    "targets": str(targets_v or "attn").strip(),
                    "adapter_options": parse_options(options_v), "steps": int(steps_v), "quiet": True,
                    "objective_options": {"pairs": int(pairs_v)}}
        if ctx.device:
            settings["device"] = ctx.device
        config = hipa_config(settings)
        TrainConfig.from_dict({**config, "out": config.get("out") or "placeholder"})  # what `studio hipa --submit` checks
        store = JobStore(ctx.home)
        new = store.submit(config, name=job_name, kind="hipa")
        worker.ensure(store)
        choices = [(job_label(j), j.id) for j in reversed(store.list())]
        return gr.update(choices=choices, value=new.id), f"Queued one-step (HiPA) job **#{new.id} {new.name}**."

    def act(action, job_id):
        from studio.jobs import JobStore

        try:
            if job_id in (None, ""):
                raise ValueError("pick a job first")
            store = JobStore(ctx.home)
            if action == "stop":
                changed = store.cancel(job_id)
                text = ("Stopping: the job saves a checkpoint and ends; Resume continues it."
                        if changed.state == "stopping" else f"Job #{job_id} is {changed.state}.")
            elif action == "resume":
                changed = store.resume(job_id)
                worker.ensure(store)
                text = f"Job #{job_id} is queued again; it continues from its last checkpoint."
            else:
                changed = store.mark_stopped(job_id)
                text = f"Job #{job_id} is {changed.state}."
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        gr.Info(text)
        return text

    def tick(job_id, seen_v):
        """Poll the store: every output is skipped unless it changed (no flicker, little traffic)."""
        from studio.jobs import JobStore

        seen_v = dict(seen_v or {})
        store = JobStore(ctx.home)
        jobs = store.list()
        if any(j.state == "queued" for j in jobs):
            worker.ensure(store)
        added = library.import_finished_jobs(store, ctx.home) if any(j.state == "done" for j in jobs) else []
        by_id = {j.id: j for j in jobs}
        if job_id not in by_id:
            job_id = jobs[-1].id if jobs else None
        current = by_id.get(job_id)
        out = {}

        def put(key, signature, make):
            if seen_v.get(key) != signature:
                seen_v[key] = signature
                out[key] = make()
            else:
                out[key] = gr.skip()

        choices = [(job_label(j), j.id) for j in reversed(jobs)]
        put("job", (tuple(choices), job_id), lambda: gr.update(choices=choices, value=job_id))
        put("table", tuple((j.id, j.state, j.step, j.name) for j in jobs), lambda: job_rows(jobs))
        records = read_jsonl(Path(current.run_dir) / "log.jsonl") if current else []
        sig = (job_id, current.state if current else None, current.step if current else None, len(records),
               current.error if current else None, bool(added))
        put("status", sig, lambda: status_markdown(current, records))
        put("bar", sig[:3], lambda: progress_html(current))
        put("loss", (job_id, len(records)), lambda: loss_frame(records))
        items = sample_items(current.run_dir) if current else []
        put("previews", (job_id, tuple(p for p, _ in items)), lambda: items)
        put("log", sig, lambda: log_text(current, records) if current else "")
        return [out[k] for k in ("job", "table", "status", "bar", "loss", "previews", "log")] + [seen_v], added

    source.change(on_source, inputs=[source], outputs=[sample, upload], queue=False)
    method.change(on_method, inputs=[method], outputs=[alpha, rslora, options], queue=False)
    defaults_inputs = [kind, method, base, prompt]
    defaults_outputs = [rank, targets, lr, steps, batch, prior, class_prompt, class_images, defaults_note]
    for component in (method, base):
        component.change(on_defaults, inputs=defaults_inputs, outputs=defaults_outputs, queue=False)
    prompt.change(on_prompt, inputs=[prompt, base], outputs=[prior, class_prompt], queue=False)
    kind.change(on_kind, inputs=[kind, method, base], outputs=[subject_box, hipa_box, repeats, steps], queue=False)
    plan_inputs = [kind, source, sample, upload, steps, repeats, batch, accum, pairs]
    for component in plan_inputs:
        component.change(on_plan, inputs=plan_inputs, outputs=[plan], queue=False)
    memory_inputs = [kind, base, method, rank, targets, options, batch, accum, precision, checkpointing, prior]
    for component in memory_inputs:
        component.change(on_memory, inputs=memory_inputs, outputs=[memory], trigger_mode="always_last",
                         show_progress="hidden", concurrency_id="memory")
    form = [base, source, sample, upload, prompt, name, method, rank, alpha, rslora, options, steps, repeats, lr, batch, accum,
            schedule, warmup, seed, targets, precision, validate_every, validation_steps, checkpoint_every,
            checkpointing, flip, prior, class_prompt, class_images, kind, pairs, validation_prompts]
    start.click(submit, inputs=form, outputs=[job, submit_status], concurrency_id="jobs")
    stop.click(lambda j: act("stop", j), inputs=[job], outputs=[submit_status], concurrency_id="jobs")
    resume.click(lambda j: act("resume", j), inputs=[job], outputs=[submit_status], concurrency_id="jobs")
    mark.click(lambda j: act("mark", j), inputs=[job], outputs=[submit_status], concurrency_id="jobs")

    def connect(demo, lib):
        # The timer lives outside the tabs: a component inside a tab that was never opened is not mounted.
        timer = gr.Timer(POLL_SECONDS)
        poll_outputs = [job, table, status, bar, loss, previews, log_box, seen]

        def poll(job_id, seen_v):
            values, added = tick(job_id, seen_v)
            if added:
                gr.Info(f"New adapter in the library: {', '.join(added)}")
                return values + list(lib.refresh())
            return values + [gr.skip()] * len(lib.outputs)

        timer.tick(poll, inputs=[job, seen], outputs=poll_outputs + lib.outputs, queue=False, show_progress="hidden")
        job.change(lambda j, s: poll(j, {}), inputs=[job, seen], outputs=poll_outputs + lib.outputs, queue=False,
                   show_progress="hidden")
        demo.load(lambda j: poll(j, {}), inputs=[job], outputs=poll_outputs + lib.outputs, queue=False,
                  show_progress="hidden")
        demo.load(on_method, inputs=[method], outputs=[alpha, rslora, options], queue=False)
        demo.load(on_plan, inputs=plan_inputs, outputs=[plan], queue=False)
        demo.load(on_memory, inputs=memory_inputs, outputs=[memory], show_progress="hidden", concurrency_id="memory")

        def startup():
            try:
                worker.ensure()  # jobs queued (or interrupted) before a restart continue now
            except Exception:  # noqa: BLE001
                log.exception("could not start the training worker")

        threading.Thread(target=startup, daemon=True).start()

    return TrainTab(connect=connect)
