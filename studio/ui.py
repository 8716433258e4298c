"""The studio in the browser: a Gradio page with Generate, Train, Compare and Library tabs.

Started by `python app.py` or `studio serve`. The page holds no logic of its own: every button calls the
same studio functions as the CLI (studio.generate.run_generate, the job store, studio.library).
Models load lazily at first use, so the page is served in seconds; every model-using event shares one
queue lane (concurrency id "gpu") and the queue is bounded.
"""
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local studio

import gradio as gr  # noqa: E402

from studio import library  # noqa: E402

log = logging.getLogger("studio.ui")

GPU_LANE = "gpu"  # concurrency_id of every event that runs a model: one at a time
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CSS = """
#gen-status, #train-status {min-height: 1.5em}
.studio-note {opacity: 0.8; font-size: 0.9em}
#gen-image img, #train-preview img, #cmp-grid img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain}
#gen-gallery img, #train-samples img {image-rendering: pixelated}
"""


@dataclass
class UIContext:
    """What every tab needs: the default base model, the workspace, and per-session stop flags."""
    base: str = "embedded"
    home: Path = field(default_factory=library.studio_home)
    device: str | None = None
    _stops: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop_event(self, request, kind: str, reset: bool = True) -> threading.Event:
        """The stop flag for one session's `kind` of job (cleared when a new job starts)."""
        key = (getattr(request, "session_hash", None) or "-", kind)
        with self._lock:
            event = self._stops.setdefault(key, threading.Event())
        if reset:
            event.clear()
        return event


_LIBRARIES = threading.Lock()


def load_libraries():
    """Import diffusers and transformers once, one handler at a time. The page's handlers run on several
    threads (the model lane, the memory line); two threads importing these packages' lazy modules together can
    deadlock in Python's import machinery, which then hands one of them a half-initialised module
    ("cannot import name 'AutoModel' from 'transformers'")."""
    with _LIBRARIES:
        import diffusers
        import transformers

        transformers.AutoModel, transformers.CLIPTextModel  # noqa: B018 - resolves the lazy chains diffusers uses
        diffusers.DiffusionPipeline, diffusers.AutoencoderKL, diffusers.UNet2DConditionModel  # noqa: B018


def first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_error_types():
    from studio.cli import user_error_types as types

    return types()


def raise_for_ui(exc):
    """A user mistake becomes one clear line in the page; anything else is logged and reported briefly."""
    if isinstance(exc, gr.Error):
        raise exc
    if isinstance(exc, user_error_types()):
        raise gr.Error(first_line(exc), print_exception=False)
    log.exception("unexpected error in the UI", exc_info=exc)
    raise gr.Error(f"internal error: {type(exc).__name__}: {first_line(exc)} (see the server log)", print_exception=False)


def base_choices(ctx: UIContext) -> list:
    choices = ["embedded", "embedded-dit"]
    if ctx.base not in choices:
        choices.insert(0, ctx.base)
    return choices


def build_app(base: str = "embedded", home=None, device=None) -> gr.Blocks:
    """The whole studio page. Importing and building it loads no model."""
    from studio import ui_compare, ui_generate, ui_library, ui_train

    ctx = UIContext(base=str(base), home=library.studio_home(home), device=device)
    with gr.Blocks(title="Diffusion Studio") as demo:
        gr.Markdown("## Diffusion Studio\n<span class='studio-note'>Fine-tune a diffusion model on a subject, "
                    f"then generate with it. Base model: <code>{ctx.base}</code> · workspace: <code>{ctx.home}</code></span>")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                gen = ui_generate.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = ui_train.build(ctx)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                compare = ui_compare.build(ctx)
            with gr.Tab("Library", id="library", elem_id="tab-library"):
                # Anything that changes the library refreshes every adapter picker.
                lib = ui_library.build(ctx, gen.adapter_pickers + compare.adapter_pickers)
        demo.load(gen.recent, outputs=gen.gallery_outputs, queue=False)
        train.connect(demo, lib)  # polls the job store (and refreshes the library) from page load on
    demo.studio_context = ctx
    return demo


def launch(base="embedded", host="127.0.0.1", port=7860, home=None, auth=None, max_upload="20mb",
           queue_size=16, device=None, block=True):
    """Serve the studio. Binds 127.0.0.1 unless told otherwise; `auth` = (user, password) or None."""
    ctx_home = library.studio_home(home)
    for sub in ("adapters", "outputs", "jobs", "exports"):
        (ctx_home / sub).mkdir(parents=True, exist_ok=True)
    if host not in LOCAL_HOSTS and not auth:
        log.warning("serving on %s without a password: anyone on the network can use this studio (set --auth user:password)", host)
    if block:
        # `kill` (SIGTERM) ends the server like Ctrl-C: exit handlers run, so a training worker is interrupted
        # cleanly and its job resumes at the next start.
        import signal

        def _interrupt(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _interrupt)
    demo = build_app(base=base, home=ctx_home, device=device)
    demo.queue(max_size=int(queue_size), default_concurrency_limit=1)
    allowed = [str(ctx_home / "outputs"), str(ctx_home / "jobs"), str(ctx_home / "exports")]
    demo.launch(server_name=host, server_port=int(port), auth=auth, max_file_size=max_upload,
                allowed_paths=allowed, prevent_thread_lock=not block, show_error=True, ssr_mode=False,
                quiet=False, css=CSS, footer_links=[], inbrowser=False, share=False)
    return demo
