"""The studio in a real browser: Debian's chromium driven by playwright, against `python app.py` served on
127.0.0.1 by the test itself (a tiny SD folder as base, a temporary workspace).

Screenshots of each tab are written to docs/images/ui-*.png (set STUDIO_SCREENSHOTS to write elsewhere).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("STUDIO_SCREENSHOTS", ROOT / "docs" / "images"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py` in a subprocess, its log in a file."""

    def __init__(self, base, home, log_path, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(log_path)
        env = dict(os.environ, STUDIO_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "w")
        started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--base", str(base), "--port", str(self.port),
                                      *extra], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the studio exited early:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > 90:
                self.stop()
                raise AssertionError(f"the studio did not come up in 90 s:\n{self.log_path.read_text()}")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - started

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("studio-home")


@pytest.fixture(scope="module")
def server(tiny_sd_dir, workspace, tmp_path_factory):
    srv = Server(tiny_sd_dir, workspace, tmp_path_factory.mktemp("logs") / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    p.goto(server.url)
    p.wait_for_selector("#gen-run")
    yield p
    context.close()


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"ui-{name}.png"), full_page=True)


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def open_tab(page, name):
    page.get_by_role("tab", name=name).click()


def test_page_opens_fast_and_generates(page, server, workspace):
    assert server.start_seconds < 30, f"cold start took {server.start_seconds:.1f} s"
    for name in ("Generate", "Train", "Compare", "Library"):
        assert page.get_by_role("tab", name=name).is_visible()
    page.locator("#gen-prompt textarea").fill("a photo of a bag")
    set_number(page, "gen-steps", 6)
    set_number(page, "gen-seed", 7)
    set_number(page, "gen-preview-every", 2)
    page.locator("#gen-run").click()
    page.wait_for_function("document.querySelector('#gen-status').innerText.includes('Done')", timeout=90_000)
    assert page.locator("#gen-image img").count() == 1
    assert "seed 7" in page.locator("#gen-status").inner_text()
    assert "Seed: 7" in page.locator("#gen-info textarea").input_value()
    # The PNG on disk carries its settings, and the gallery shows it.
    pngs = list((workspace / "outputs").glob("*/*.png"))
    assert len(pngs) == 1
    from studio.images import read_settings

    assert read_settings(pngs[0])["seed"] == 7
    assert page.locator("#gen-gallery img").count() >= 1
    shot(page, "generate")


def test_user_mistake_shows_one_line_and_server_stays_up(page, server):
    page.locator("#gen-prompt textarea").fill("a photo of a bag")
    set_number(page, "gen-width", 13)
    page.locator("#gen-run").click()
    toast = page.locator(".toast-body").first
    toast.wait_for(timeout=60_000)
    assert "multiple of" in toast.inner_text()
    assert server.proc.poll() is None
