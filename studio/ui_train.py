"""Train tab: subject images, method, steps; Start / Stop / Resume; live progress, loss curve, previews, log."""
from dataclasses import dataclass

import gradio as gr


@dataclass
class TrainTab:
    def connect(self, demo, lib):
        pass


def build(ctx) -> TrainTab:
    gr.Markdown("Training arrives with the job store.", elem_id="train-status")
    return TrainTab()
