"""Compare tab: an X/Y grid from one prompt and seed (adapters x weights, schedulers x steps, ...).

Each cell is a studio.generate.run_generate call made by studio.compare.run_grid; the grid is saved as a PNG
in the workspace's outputs folder with the shared settings in its metadata."""
import queue
import threading
import time
from dataclasses import dataclass

import gradio as gr

from studio import library
from studio.ui import GPU_LANE, base_choices, load_libraries, raise_for_ui
from studio.ui_generate import NO_ADAPTER, SCHEDULER_CHOICES, adapter_choices

AXIS_CHOICES = [("Scheduler", "scheduler"), ("Steps", "steps"), ("Guidance", "guidance"), ("Seed", "seed"),
                ("Adapter", "adapter"), ("Adapter weight", "weight")]
EXAMPLES = {"scheduler": "ddim, euler, unipc, dpm++", "steps": "5, 10, 20", "guidance": "1, 2, 4",
            "seed": "0, 1, 2", "adapter": "none, my-adapter", "weight": "0, 0.5, 1.0", "none": ""}


@dataclass
class CompareTab:
    adapter_pickers: list


def build(ctx) -> CompareTab:
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value="a photo of a sneaker", lines=2, elem_id="cmp-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="cmp-negative")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="cmp-seed")
                steps = gr.Number(label="Steps", value=20, precision=0, minimum=1, elem_id="cmp-steps")
                guidance = gr.Number(label="Guidance", value=2.0, elem_id="cmp-guidance")
            scheduler = gr.Dropdown(SCHEDULER_CHOICES, value="default", label="Scheduler", elem_id="cmp-scheduler")
            with gr.Row(equal_height=True):
                adapter = gr.Dropdown(adapter_choices(ctx), value=NO_ADAPTER, label="Adapter (for all cells / the weight axis)",
                                      elem_id="cmp-adapter", scale=3)
                weight = gr.Number(label="Weight", value=1.0, elem_id="cmp-weight", scale=1)
            with gr.Row():
                x_kind = gr.Dropdown(AXIS_CHOICES, value="scheduler", label="X axis", elem_id="cmp-x-kind")
                x_values = gr.Textbox(label="X values (comma-separated)", value=EXAMPLES["scheduler"], elem_id="cmp-x-values")
            with gr.Row():
                y_kind = gr.Dropdown([("None", "none")] + AXIS_CHOICES, value="steps", label="Y axis", elem_id="cmp-y-kind")
                y_values = gr.Textbox(label="Y values (comma-separated)", value="5, 20", elem_id="cmp-y-values")
            base = gr.Dropdown(base_choices(ctx), value=ctx.base, allow_custom_value=True, label="Base model",
                               elem_id="cmp-base")
            with gr.Row():
                go = gr.Button("Make grid", variant="primary", elem_id="cmp-run")
                stop = gr.Button("Stop", variant="stop", elem_id="cmp-stop")
        with gr.Column(scale=3):
            grid = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="cmp-grid", height=520)
            status = gr.Markdown("Pick what varies along X and Y; every cell uses the same prompt and seed.",
                                 elem_id="cmp-status")

    def stream(prompt_v, negative_v, seed_v, steps_v, guidance_v, scheduler_v, adapter_v, weight_v, xk, xv, yk, yv,
               base_v, request: gr.Request):
        from pipelines.text2image import GenerationSettings
        from studio.compare import parse_axis, run_grid

        stop_flag = ctx.stop_event(request, "compare")
        try:
            if not str(prompt_v or "").strip():
                raise ValueError("write a prompt first")
            xs, ys = parse_axis(xk, xv), parse_axis(yk, yv)
            settings = GenerationSettings(prompt=str(prompt_v), negative_prompt=str(negative_v or ""), steps=int(steps_v),
                                          guidance=float(guidance_v), seed=int(seed_v), scheduler=scheduler_v or "default")
            settings.validate()
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        base_name = str(base_v or ctx.base).strip()
        chosen = None if adapter_v in (None, "", NO_ADAPTER) else adapter_v
        events, result = queue.Queue(), {}

        def work():
            try:
                load_libraries()
                result["grid"] = run_grid(settings, xk, xs, yk, ys, base=base_name, adapter=chosen, weight=float(weight_v),
                                          home=ctx.home, device=ctx.device, stop=stop_flag.is_set,
                                          on_cell=lambda done, total, image: events.put((done, total)))
            except BaseException as exc:  # noqa: BLE001
                result["error"] = exc
            finally:
                events.put(None)

        started = time.monotonic()
        total = len(xs) * len(ys)
        yield gr.skip(), f"Loading `{base_name}` and making {total} cells…"
        thread = threading.Thread(target=work, name="studio-compare", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = events.get()
                if item is None:
                    finished = True
                    break
                done, total = item
                yield gr.skip(), f"Cell {done}/{total} · {time.monotonic() - started:.0f} s"
        finally:
            if not finished:
                stop_flag.set()
        thread.join()
        if "error" in result:
            raise_for_ui(result["error"])
        image, _ = result["grid"]
        from studio.images import save_png

        path = library.new_output_path(settings.seed, ctx.home).with_name(f"grid-{time.strftime('%H%M%S')}.png")
        settings.extra.update({"Grid X": f"{xk}: {xv}", "Grid Y": f"{yk}: {yv}", "Model": base_name})
        if chosen:
            settings.extra["Adapter"] = f"{chosen}:{float(weight_v):g}"
        save_png(image, path, settings)
        stopped = " (stopped early: grey cells were not made)" if stop_flag.is_set() else ""
        yield str(path), f"Grid of {total} cells in {time.monotonic() - started:.1f} s{stopped} · saved {path.name}"

    def on_axis(kind):
        return gr.update(value=EXAMPLES.get(kind, ""), interactive=kind != "none")

    def request_stop(request: gr.Request):
        ctx.stop_event(request, "compare", reset=False).set()
        return "Stopping after the current cell…"

    x_kind.change(on_axis, inputs=[x_kind], outputs=[x_values], queue=False)
    y_kind.change(on_axis, inputs=[y_kind], outputs=[y_values], queue=False)
    go.click(stream, inputs=[prompt, negative, seed, steps, guidance, scheduler, adapter, weight, x_kind, x_values,
                             y_kind, y_values, base],
             outputs=[grid, status], concurrency_id=GPU_LANE, concurrency_limit=1, show_progress="minimal")
    stop.click(request_stop, outputs=[status], queue=False)
    return CompareTab(adapter_pickers=[adapter])
