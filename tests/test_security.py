"""Security checks on the tracked tree and the server defaults (issue #12). Fast: no server is started."""
import inspect
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line and (ROOT / line).is_file()]


# Built from pieces so this file does not match its own patterns.
PICKLE, VISION = "pick" + "le", "torch" + "vision"
PATTERNS = {
    f"{PICKLE}.load": re.compile(rf"\b{PICKLE}\.loads?\s*\("),
    VISION: re.compile(rf"^\s*(import\s+{VISION}|from\s+{VISION}\b)", re.M),
}


def test_no_unpickling_or_vision_package_in_tracked_code():
    files = tracked_python_files()
    assert files, "git ls-files found no Python files"
    found = []
    for path in files:
        if path.name == "test_security.py":
            continue
        text = path.read_text(errors="replace")
        for label, pattern in PATTERNS.items():
            for m in pattern.finditer(text):
                found.append(f"{path.relative_to(ROOT)}: {label}: {m.group(0).strip()}")
        # torch.load( without weights_only=True in the same call
        for m in re.finditer(r"\btorch\.load\s*\(", text):
            call = text[m.start():m.start() + 400]
            depth, end = 0, len(call)
            for i, ch in enumerate(call):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0 and ch == ")":
                    end = i
                    break
            if "weights_only=True" not in call[:end].replace(" ", ""):
                found.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not found, "\n".join(found)


def test_server_binds_localhost_by_default(monkeypatch):
    from studio import ui
    from studio.commands import serve

    assert inspect.signature(ui.launch).parameters["host"].default == "127.0.0.1"
    monkeypatch.delenv("STUDIO_HOST", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1"
    assert args.max_upload  # an upload limit is always passed to gradio
    assert inspect.signature(ui.launch).parameters["max_upload"].default
    assert args.queue_size >= 1


def test_launch_passes_host_and_upload_limit_to_gradio(monkeypatch, tmp_path):
    """launch() hands server_name=127.0.0.1 and max_file_size to gradio (launch itself is stubbed)."""
    from studio import ui

    seen = {}

    class Fake:
        def queue(self, **kw):
            seen["queue"] = kw
            return self

        def launch(self, **kw):
            seen["launch"] = kw

    monkeypatch.setattr(ui, "build_app", lambda **kw: Fake())
    ui.launch(home=tmp_path, block=False)
    assert seen["launch"]["server_name"] == "127.0.0.1"
    assert seen["launch"]["max_file_size"] == "20mb"
    assert seen["launch"]["share"] is False
    assert seen["queue"]["max_size"] >= 1


def _png(path, size=(16, 16)):
    from PIL import Image
    import numpy as np

    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return path


def test_uploads_get_generated_names(tmp_path):
    from studio import library

    evil = tmp_path / "in"
    evil.mkdir()
    a = _png(evil / "..%2f..%2fetc-passwd.png")
    b = _png(evil / "name with spaces;rm -rf.png")
    folder = library.save_subject_upload([str(a), str(b)], home=tmp_path / "home")
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png"]
    assert folder.parent == tmp_path / "home" / "subjects"
    assert not list((tmp_path / "home").rglob("*passwd*"))


def test_uploads_are_limited(tmp_path, monkeypatch):
    from studio import library

    a = _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="too many images"):
        library.save_subject_upload([str(a)] * (library.MAX_UPLOAD_IMAGES + 1), home=tmp_path / "home")
    monkeypatch.setattr(library, "MAX_UPLOAD_PIXELS", 100)
    with pytest.raises(ValueError, match="too large"):
        library.save_subject_upload([str(a)], home=tmp_path / "home")
    text = tmp_path / "fake.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        library.save_subject_upload([str(text)], home=tmp_path / "home")
    # Nothing half-made is left behind.
    subjects = tmp_path / "home" / "subjects"
    assert not subjects.exists() or not any(subjects.iterdir())


@pytest.mark.parametrize("name", ["../../x", "..", "/etc/passwd", "a/b", "x\\..\\y", "", "." ])
def test_library_names_are_never_paths(name):
    from studio import library

    with pytest.raises(ValueError):
        library.check_name(name)
