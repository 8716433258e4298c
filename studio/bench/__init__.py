"""Benchmarks: `studio bench <suite>`. Each suite module has add_arguments(parser) and
run(args) -> dict with "rows" (list of dicts) and any other fields; the command writes the JSON
(atomically) and prints the rows as a Markdown table. Speed claims live here, never in tests."""
import platform

import torch


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    return info


def markdown_table(rows, columns=None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
