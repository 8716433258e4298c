"""Everything diffusers-facing: model loading, schedulers, samplers and pipelines.

Names are resolved lazily so that `import pipelines` stays cheap and one feature's import cost
(or failure) never reaches another. Add a public name by adding one line to _EXPORTS.
"""
from importlib import import_module

_EXPORTS = {
    "load_pipeline": "pipelines.loading",
    "set_attention": "pipelines.loading",
    "PipelineLoadError": "pipelines.loading",
    "EMBEDDED_SOURCES": "pipelines.loading",
    "minilm_path": "pipelines.text",
    "load_minilm": "pipelines.text",
    "load_minilm_tokenizer": "pipelines.text",
    "tiny_sd_pipeline": "pipelines.tiny",
    "tiny_pixart_pipeline": "pipelines.tiny",
    "tiny_sd3_pipeline": "pipelines.tiny",
    "generate": "pipelines.text2image",
    "generate_from": "pipelines.text2image",
    "seeded_generators": "pipelines.text2image",
    "GenerationSettings": "pipelines.text2image",
    "SCHEDULERS": "pipelines.text2image",
    "GenerationError": "pipelines.text2image",
    "native_size": "pipelines.text2image",
    "size_multiple": "pipelines.text2image",
    "family_kwargs": "pipelines.text2image",
    "decode_preview": "pipelines.text2image",
    "make_scheduler": "pipelines.text2image",
    "DCSolverScheduler": "pipelines.dcsolver",
    "DCDPMSolverScheduler": "pipelines.dcsolver",
    "diffusehigh": "pipelines.diffuse_high",
    "DiffuseHighPipeline": "pipelines.diffuse_high",
    "one_step": "pipelines.hipa",
    "OneStepPipeline": "pipelines.hipa",
    "HiPALossConfig": "pipelines.hipa",
    "hipa_loss": "pipelines.hipa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
