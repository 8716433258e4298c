"""Saving generated images: PNG with the generation settings as text metadata (A1111's "parameters")."""
import json

from PIL import PngImagePlugin

from studio.files import atomic_path


def save_png(image, path, settings):
    """Write `image` to `path` atomically with `settings` (a GenerationSettings) embedded."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", settings.parameters_text())
    info.add_text("studio", json.dumps(settings.to_dict(), sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_settings(path) -> dict:
    """The settings a studio PNG was made with (empty if it carries none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get("studio") if hasattr(image, "text") else None
    return json.loads(text) if text else {}
