"""Generate tab: prompt -> image with live previews, a Stop button, adapters with weights, and a gallery.

It calls studio.generate.run_generate exactly as `studio generate` does; the PNGs it writes carry their
settings, and the gallery shows the workspace's outputs folder (so it survives restarts).
"""
import inspect
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio import library
from studio.ui import GPU_LANE, base_choices, first_line, load_libraries, raise_for_ui

# (label, value): the value is the name run_generate / `studio generate --scheduler` takes.
SCHEDULER_CHOICES = [("Model default", "default"), ("DDIM", "ddim"), ("Euler", "euler"), ("UniPC", "unipc"),
                     ("DPM-Solver++", "dpm++"), ("DC-Solver", "dc-solver")]
HIRES_CHOICES = ["off", "2x", "4x"]
HIRES_SCALES = {"2x": "2", "4x": "2,4"}  # DiffuseHigh stages (4x goes through 2x, progressively)
ADAPTER_SLOTS = 3
NO_ADAPTER = "(none)"


@dataclass
class GenerateTab:
    adapter_pickers: list
    recent: object          # () -> values for gallery_outputs
    gallery_outputs: list


def _run_generate_params() -> set:
    from studio.generate import run_generate

    return set(inspect.signature(run_generate).parameters)


def _available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def adapter_choices(ctx) -> list:
    return [NO_ADAPTER] + library.adapter_names(ctx.home)


def parse_request(ctx, prompt, negative, seed, steps, guidance, width, height, scheduler, base, hires, one_step, slots):
    """UI values -> (settings, run_generate keyword arguments). Raises ValueError on user mistakes."""
    from pipelines.text2image import SCHEDULERS, GenerationSettings

    if not str(prompt or "").strip():
        raise ValueError("write a prompt first")
    if scheduler not in ("default", None, "") and scheduler not in SCHEDULERS:
        label = dict((v, k) for k, v in SCHEDULER_CHOICES).get(scheduler, scheduler)
        raise ValueError(f"the {label} scheduler is not available in this build yet; pick another one")
    seed = int(seed if seed is not None else -1)
    if seed < 0:
        seed = random.randrange(2**31)
    settings = GenerationSettings(prompt=str(prompt), negative_prompt=str(negative or ""), steps=int(steps),
                                  guidance=float(guidance), seed=seed, height=int(height) or None,
                                  width=int(width) or None, scheduler=scheduler or "default")
    settings.validate()
    params = _run_generate_params()
    kwargs = {}
    chosen, hipa = [], []
    for name, weight in slots:
        if name and name != NO_ADAPTER:
            folder = library.resolve_adapter(name, ctx.home)
            (hipa if one_step and library.adapter_info(folder)["one_step"] else chosen).append((str(folder), float(weight)))
    if chosen:
        if "adapters" not in params:
            raise ValueError("generating with adapters is not available in this build yet")
        kwargs["adapters"] = chosen
    if hires and hires != "off":
        if not _available("pipelines.diffuse_high"):
            raise ValueError("hi-res generation (DiffuseHigh) is not available in this build yet")
        settings.extra["Hires"] = HIRES_SCALES[hires]
    if one_step:
        if not _available("pipelines.hipa"):
            raise ValueError("one-step generation (HiPA) is not available in this build yet")
        if len(hipa) != 1:
            raise ValueError("one-step mode needs exactly one HiPA adapter among the chosen adapters")
        if hires and hires != "off":
            raise ValueError("one-step and hi-res cannot be combined; turn one of them off")
        settings.extra["One-step"] = hipa[0][0]
        settings.steps, settings.guidance = 1, 1.0  # what actually runs: one call, guidance baked in
    return settings, kwargs


def _status(step, total, started, extra=""):
    elapsed = time.monotonic() - started
    rate = elapsed / max(step, 1)
    eta = rate * max(total - step, 0)
    return f"Generating: step {step}/{total} · {rate:.2f} s/step · ETA {eta:.0f} s{extra}"


def build(ctx) -> GenerateTab:
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, value="a photo of a sneaker", elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
            with gr.Row(equal_height=True):
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="gen-seed", scale=3)
                random_btn = gr.Button("Random", elem_id="gen-seed-random", scale=1, size="sm")
                reuse_btn = gr.Button("Reuse last", elem_id="gen-seed-reuse", scale=1, size="sm")
            with gr.Row():
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="gen-steps")
                guidance = gr.Slider(0.0, 15.0, value=2.0, step=0.5, label="Guidance (CFG, 1 = off)", elem_id="gen-guidance")
            with gr.Row():
                width = gr.Number(label="Width (0 = model's native)", value=0, precision=0, minimum=0, elem_id="gen-width")
                height = gr.Number(label="Height (0 = model's native)", value=0, precision=0, minimum=0, elem_id="gen-height")
                scheduler = gr.Dropdown(SCHEDULER_CHOICES, value="default", label="Scheduler", elem_id="gen-scheduler")
            with gr.Accordion("Adapters (from the library, several at once)", open=True):
                slots = []
                for i in range(ADAPTER_SLOTS):
                    with gr.Row(equal_height=True):
                        name = gr.Dropdown(adapter_choices(ctx), value=NO_ADAPTER, label=f"Adapter {i + 1}",
                                           elem_id=f"gen-adapter-{i + 1}", scale=3)
                        weight = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Weight",
                                           elem_id=f"gen-adapter-weight-{i + 1}", scale=2)
                    slots.append((name, weight))
            with gr.Row():
                hires = gr.Radio(HIRES_CHOICES, value="off", label="Hi-res (DiffuseHigh)", elem_id="gen-hires")
                one_step = gr.Checkbox(label="One-step (HiPA adapter)", value=False, interactive=False,
                                       elem_id="gen-one-step", info="enabled when a HiPA adapter is chosen")
            with gr.Accordion("More", open=False):
                base = gr.Dropdown(base_choices(ctx), value=ctx.base, allow_custom_value=True, elem_id="gen-base",
                                   label="Base model (embedded, embedded-dit, or a diffusers folder)")
            preview_every = gr.Slider(0, 20, value=4, step=1, label="Live preview every N steps (0 = off)",
                                      elem_id="gen-preview-every")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="gen-run")
                stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
        with gr.Column(scale=2):
            image = gr.Image(label="Result", type="filepath", interactive=False, elem_id="gen-image", height=384)
            status = gr.Markdown("Ready. The model loads at the first generation.", elem_id="gen-status")
            info = gr.Textbox(label="Settings stored in the PNG", lines=3, interactive=False, elem_id="gen-info")
    gallery = gr.Gallery(label="Recent results (click one to reuse its settings)", columns=8, height=220,
                         elem_id="gen-gallery", allow_preview=False, object_fit="contain")
    last_seed = gr.State(None)
    gallery_paths = gr.State([])

    def recent():
        paths = [str(p) for p in library.recent_outputs(ctx.home)]
        return paths, paths

    def stream(prompt_v, negative_v, seed_v, steps_v, guidance_v, width_v, height_v, scheduler_v, base_v, hires_v,
               one_step_v, every_v, a1, w1, a2, w2, a3, w3, request: gr.Request):
        stop_flag = ctx.stop_event(request, "generate")
        try:
            settings, kwargs = parse_request(ctx, prompt_v, negative_v, seed_v, steps_v, guidance_v, width_v, height_v,
                                             scheduler_v, base_v, hires_v, one_step_v, [(a1, w1), (a2, w2), (a3, w3)])
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        base_name = str(base_v or ctx.base).strip()
        out = library.new_output_path(settings.seed, ctx.home)
        every = int(every_v or 0)
        events = queue.Queue()
        result = {}

        def work():
            try:
                load_libraries()
                from pipelines.text2image import decode_preview
                from studio.generate import get_pipeline, run_generate

                pipe = get_pipeline(base_name, device=ctx.device)
                events.put(("loaded", None))

                def on_step(step, total, latents):
                    picture = None
                    if every and step % every == 0:
                        try:
                            picture = decode_preview(pipe, latents[:1])[0]
                        except Exception:  # noqa: BLE001 - a preview must never break a generation
                            picture = None
                    events.put(("step", (step, total, picture)))

                _, paths = run_generate(settings, base=base_name, out=out, preview=on_step, preview_every=1,
                                        stop=stop_flag.is_set, pipe=pipe, **kwargs)
                result["paths"] = paths
            except BaseException as exc:  # noqa: BLE001 - handed to the page
                result["error"] = exc
            finally:
                events.put(("done", None))

        started = time.monotonic()
        yield (gr.skip(), f"Loading the model `{base_name}` (first use takes a few seconds)…", gr.skip(), gr.skip(),
               settings.seed, gr.skip())
        worker = threading.Thread(target=work, name="studio-generate", daemon=True)
        worker.start()
        preview_path = None
        finished = False
        try:
            while True:
                kind, payload = events.get()
                if kind == "done":
                    finished = True
                    break
                if kind == "loaded":
                    started = time.monotonic()
                    yield gr.skip(), f"Generating: step 0/{settings.steps}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    continue
                step, total, picture = payload
                if picture is not None:
                    preview_path = picture
                yield (preview_path if picture is not None else gr.skip(), _status(step, total, started),
                       gr.skip(), gr.skip(), gr.skip(), gr.skip())
        finally:
            if not finished:  # the page went away mid-run: let the pipeline stop at its next step
                stop_flag.set()
        worker.join()
        if "error" in result:
            raise_for_ui(result["error"])
        paths = result.get("paths") or []
        stopped = " (stopped early: this is the image at the step it stopped)" if stop_flag.is_set() else ""
        done = f"Done in {time.monotonic() - started:.1f} s · seed {settings.seed}{stopped} · saved {paths[0].name if paths else ''}"
        gallery_value, gallery_list = recent()
        yield (str(paths[0]) if paths else gr.skip(), done, settings.parameters_text(), gallery_value, settings.seed,
               gallery_list)

    def request_stop(request: gr.Request):
        ctx.stop_event(request, "generate", reset=False).set()
        return "Stopping after the current step…"

    def on_adapter_change(a1, a2, a3):
        """One-step mode is offered only when a HiPA adapter is picked."""
        hipa = False
        for name in (a1, a2, a3):
            if name and name != NO_ADAPTER:
                try:
                    hipa = hipa or library.adapter_info(library.resolve_adapter(name, ctx.home))["one_step"]
                except ValueError:
                    pass
        return gr.update(interactive=hipa, value=False if not hipa else gr.skip())

    def recall(evt: gr.SelectData, paths):
        """Clicking a gallery image puts its settings back into the form."""
        from studio.images import read_settings

        try:
            s = read_settings(paths[evt.index])
        except Exception as exc:  # noqa: BLE001
            gr.Warning(f"could not read the settings of that image: {first_line(exc)}")
            return [gr.skip()] * 8
        if not s:
            return [gr.skip()] * 8
        return (s.get("prompt", ""), s.get("negative_prompt", ""), s.get("seed", -1), s.get("steps", 20),
                s.get("guidance", 2.0), s.get("width") or 0, s.get("height") or 0, s.get("scheduler", "default"))

    inputs = [prompt, negative, seed, steps, guidance, width, height, scheduler, base, hires, one_step, preview_every]
    for name, weight in slots:
        inputs += [name, weight]
    run_event = go.click(stream, inputs=inputs, outputs=[image, status, info, gallery, last_seed, gallery_paths],
                         concurrency_id=GPU_LANE, concurrency_limit=1, show_progress="minimal")
    prompt.submit(stream, inputs=inputs, outputs=[image, status, info, gallery, last_seed, gallery_paths],
                  concurrency_id=GPU_LANE, concurrency_limit=1, show_progress="minimal")
    stop.click(request_stop, outputs=[status], queue=False)
    random_btn.click(lambda: -1, outputs=[seed], queue=False)
    reuse_btn.click(lambda s: s if s is not None else gr.skip(), inputs=[last_seed], outputs=[seed], queue=False)
    for name, _ in slots:
        name.change(on_adapter_change, inputs=[s[0] for s in slots], outputs=[one_step], queue=False)
    gallery.select(recall, inputs=[gallery_paths], outputs=[prompt, negative, seed, steps, guidance, width, height, scheduler],
                   queue=False)
    del run_event
    return GenerateTab(adapter_pickers=[s[0] for s in slots], recent=recent, gallery_outputs=[gallery, gallery_paths])
