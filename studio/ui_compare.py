"""Compare tab: an X/Y grid of images from one prompt and seed."""
from dataclasses import dataclass, field

import gradio as gr


@dataclass
class CompareTab:
    adapter_pickers: list = field(default_factory=list)


def build(ctx) -> CompareTab:
    gr.Markdown("X/Y comparison grid: coming next.")
    return CompareTab()
