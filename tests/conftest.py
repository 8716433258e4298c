import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
