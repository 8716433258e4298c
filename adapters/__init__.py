"""Parameter-efficient adapters in plain PyTorch (imports torch and safetensors only).

    from adapters import AdapterConfig, attach, save_adapter, load_adapter, METHODS
    handle = attach(model, AdapterConfig(method="loldu", rank=8, targets="attn"), name="default")

The method interface (for adding a method) is documented in adapters/core.py.
"""
from adapters.core import (PRESETS, AdapterConfig, AdapterHandle, AdapterLayer, attach, cast_base, get_adapter,
                           list_adapters, remove_adapter, set_weights)
from adapters.io import load_adapter, read_adapter, save_adapter
from adapters.registry import METHODS

__all__ = ["AdapterConfig", "AdapterHandle", "AdapterLayer", "METHODS", "PRESETS", "attach", "cast_base", "get_adapter",
           "list_adapters", "load_adapter", "read_adapter", "remove_adapter", "save_adapter", "set_weights",
           "export_lora"]


def export_lora(*args, **kwargs):
    """Turn any attached adapter into a plain LoRA file (see adapters/export.py)."""
    from adapters.export import export_lora as _export

    return _export(*args, **kwargs)
