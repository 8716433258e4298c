"""`studio bench gpu` on a CPU (the small UNet): every row runs, and the memory column is a real count."""
import argparse
import math

import pytest


@pytest.fixture
def bench_args():
    from studio.bench import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(["--methods", "lora,sara,lora@sara", "--batches", "1", "--steps", "1", "--sample-steps", "1"])


def test_cpu_rows_report_memory_and_sara_stays_below_full_fine_tuning(bench_args, one_torch_thread):
    from studio.bench import gpu

    result = gpu.run(bench_args)
    rows = {row["variant"]: row for row in result["rows"] if "step_ms" in row}
    assert set(rows) == {"lora", "sara", "lora@sara", "peft-lora", "full"}, result["rows"]
    # LoRA at SaRA's budget (the paper's comparison): the rank whose count is nearest SaRA's
    per_rank = rows["lora"]["trainable_params"] / rows["lora"]["rank"]
    assert abs(rows["lora@sara"]["trainable_params"] - rows["sara"]["trainable_params"]) <= per_rank / 2
    assert all(math.isfinite(row["peak_mem_mib"]) and row["peak_mem_mib"] > 0 for row in rows.values())
    unet_params = rows["full"]["trainable_params"]
    # SaRA on random init selects the paper's share of entries (5.8%), by fraction
    assert abs(rows["sara"]["trainable_params"] / unet_params - gpu.SARA_RANDOM_INIT["fraction"]) < 0.002
    # full fine-tuning holds the weights plus a gradient and two Adam moments: at least 4x the weights
    weights_mib = unet_params * 4 / 2**20
    assert rows["full"]["peak_mem_mib"] >= 4 * weights_mib
    assert rows["sara"]["peak_mem_mib"] < rows["full"]["peak_mem_mib"]
    assert rows["lora"]["peak_mem_mib"] < rows["full"]["peak_mem_mib"]
    assert any(row["variant"] == "sampling-sdpa" and row["images_per_s"] > 0 for row in result["rows"])
