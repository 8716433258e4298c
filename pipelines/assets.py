"""Where the shipped assets live (torch-free: the page lists sample subjects before any model loads).

assets/ at the top of a source checkout (also what an editable install runs), else the copy a wheel installed
as the package `studio_assets` (pyproject.toml maps that package to assets/).
"""
import importlib.util
from pathlib import Path

ASSETS_PACKAGE = "studio_assets"


# The HiPA one-step adapter shipped for each embedded model (folders under assets/).
SHIPPED_HIPA = {"embedded": "hipa", "embedded-dit": "hipa-dit"}


def assets_dir() -> Path:
    """The embedded models, the evaluator, the HiPA adapters and the sample subjects."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "assets").is_dir():
        return root / "assets"
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return root / "assets"  # neither: load_pipeline names the missing embedded model


def shipped_hipa(base) -> Path | None:
    """The HiPA adapter folder shipped for an embedded model, or None for any other base."""
    name = SHIPPED_HIPA.get(str(base))
    return assets_dir() / name if name else None
