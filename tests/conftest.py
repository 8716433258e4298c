import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _same_global_rng():
    """Every test starts from the same global random state, so none passes or fails by which tests ran before it
    (an unseeded draw once decided a DiffuseHigh test)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_encode_cache(tmp_path_factory, monkeypatch):
    """Each test its own encode cache (studio.cache, $STUDIO_CACHE): nothing is read from ~/.cache or from what
    another test encoded (subprocesses inherit it)."""
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path_factory.mktemp("encode-cache")))


def _saved(tmp_path_factory, name, builder):
    folder = tmp_path_factory.mktemp(name)
    builder().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from pipelines.tiny import tiny_sd_pipeline

    return _saved(tmp_path_factory, "tiny-sd", tiny_sd_pipeline)


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory):
    from pipelines.tiny import tiny_pixart_pipeline

    return _saved(tmp_path_factory, "tiny-pixart", tiny_pixart_pipeline)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from pipelines.tiny import tiny_sd3_pipeline

    return _saved(tmp_path_factory, "tiny-sd3", tiny_sd3_pipeline)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One CPU thread for a module: on a shared 2-core machine two spinning threads are far slower, and
    bitwise comparisons need the same thread count on both sides."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_subject(tmp_path_factory):
    """make_subject(count, seed, size=(32, 32), captions={}) -> a folder of random RGB images (+ .txt captions)."""
    import numpy as np
    from PIL import Image

    def make(count, seed, size=(32, 32), captions=None):
        folder = tmp_path_factory.mktemp("subject")
        rng = np.random.default_rng(seed)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        for name, text in (captions or {}).items():
            (folder / f"{name}.txt").write_text(text)
        return folder

    return make
