"""X/Y comparison grids: one prompt and seed, one setting varied along X and another along Y
(adapters x weights, schedulers x steps, guidance x seeds, ...). Every cell is a run_generate call.

    from studio.compare import run_grid
    grid, cells = run_grid(settings, "scheduler", ["ddim", "unipc"], "steps", [5, 10], base="embedded")
"""
from dataclasses import replace

AXES = {  # axis kind -> how a value is read from text
    "scheduler": str,
    "steps": int,
    "guidance": float,
    "seed": int,
    "adapter": str,     # a library name or folder; "none" = the plain base
    "weight": float,    # the weight of the chosen adapter
}
NONE = ("none", "-", "")
MAX_CELLS = 64
MIN_CELL_PIXELS = 128  # small models make tiny images: cells are enlarged (nearest) to stay readable


def parse_axis(kind: str, text) -> list:
    """'ddim, unipc' -> ['ddim', 'unipc']; '5,10' -> [5, 10]. kind 'none' -> [None]."""
    if kind in (None, "", "none"):
        return [None]
    if kind not in AXES:
        raise ValueError(f"unknown axis '{kind}': choose one of {', '.join(AXES)}")
    values = [v.strip() for v in str(text or "").split(",") if v.strip()]
    if not values:
        raise ValueError(f"give the {kind} values along the axis, separated by commas")
    try:
        return [AXES[kind](v) for v in values]
    except ValueError:
        raise ValueError(f"the {kind} axis takes {AXES[kind].__name__} values, got '{text}'") from None


def cell_request(settings, kinds_values, adapter=None, weight: float = 1.0, home=None):
    """The settings and adapters of one cell: the axis values replace the shared settings."""
    from studio import library

    changes = {}
    adapter_ref, adapter_weight = adapter, float(weight)
    for kind, value in kinds_values:
        if kind in (None, "", "none"):
            continue
        if kind in ("scheduler", "steps", "guidance", "seed"):
            changes[kind] = value
        elif kind == "adapter":
            adapter_ref = None if str(value).lower() in NONE else value
        elif kind == "weight":
            adapter_weight = float(value)
    cell = replace(settings, extra=dict(settings.extra), **changes)
    adapters = []
    if adapter_ref and str(adapter_ref).lower() not in NONE:
        adapters = [(str(library.resolve_adapter(adapter_ref, home)), adapter_weight)]
    return cell, adapters


def label(kind, value) -> str:
    if kind in (None, "", "none"):
        return ""
    return f"{kind}: {value}"


def make_grid(rows, x_labels, y_labels):
    """rows: list (Y) of lists (X) of PIL images -> one labelled PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    first = rows[0][0]
    scale = max(1, -(-MIN_CELL_PIXELS // max(first.width, first.height)))
    cw, ch = first.width * scale, first.height * scale
    left = max([int(ImageDraw.Draw(first).textlength(t, font=font)) for t in y_labels] + [0]) + (12 if any(y_labels) else 0)
    top = 22 if any(x_labels) else 0
    grid = Image.new("RGB", (left + cw * len(rows[0]), top + ch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for x, text in enumerate(x_labels):
        draw.text((left + x * cw + 4, 5), text, fill="black", font=font)
    for y, text in enumerate(y_labels):
        draw.text((4, top + y * ch + ch // 2 - 6), text, fill="black", font=font)
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cw, ch), Image.NEAREST), (left + x * cw, top + y * ch))
    return grid


def run_grid(settings, x_kind, xs, y_kind=None, ys=(None,), base="embedded", adapter=None, weight: float = 1.0,
             home=None, device=None, stop=None, on_cell=None):
    """Generate every (x, y) cell with the same prompt and seed. on_cell(done, total, image) after each;
    stop() -> True ends early (cells not made stay blank). Returns (grid image, [[cell settings]])."""
    from PIL import Image

    from studio.generate import get_pipeline, run_generate

    xs, ys = list(xs), list(ys or [None])
    total = len(xs) * len(ys)
    if total > MAX_CELLS:
        raise ValueError(f"{total} cells is too many for one grid; at most {MAX_CELLS}")
    settings.validate()
    pipe = get_pipeline(base, device=device)
    rows, made, done = [], [], 0
    for y in ys:
        row, row_settings = [], []
        for x in xs:
            if stop is not None and stop():
                break
            cell, adapters = cell_request(settings, [(x_kind, x), (y_kind, y)], adapter, weight, home)
            images, _ = run_generate(cell, base=base, pipe=pipe, adapters=adapters)
            row.append(images[0])
            row_settings.append(cell.to_dict())
            done += 1
            if on_cell is not None:
                on_cell(done, total, images[0])
        rows.append(row)
        made.append(row_settings)
    size = rows[0][0].size if rows and rows[0] else (64, 64)
    rows = [row + [Image.new("RGB", size, "lightgray")] * (len(xs) - len(row)) for row in rows]
    grid = make_grid(rows, [label(x_kind, x) for x in xs], [label(y_kind, y) for y in ys])
    return grid, made
