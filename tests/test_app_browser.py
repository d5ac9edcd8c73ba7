"""The interactive page end to end in a real browser: Playwright driving the system's headless
Chromium (Debian's ``chromium`` package; Playwright's own browser download is not used).

Skipped, with the reason, when Gradio, Playwright or Chromium is missing: ``.ci/run`` installs
them (``pip install -e ".[dev,app]"``, ``apt-get install chromium``).
"""

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

from spar.tools.app import build_page, launch_page, sample_images

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # about 10 s on 2 cores: a page, a browser and one segmentation
    # Gradio's queue calls pandas options that pandas 3 deprecates: not this project's code.
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]


CHROMIUM = (
    os.environ.get("SPAR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
MISSING = [
    what
    for what, present in (
        ('Gradio (pip install -e ".[app]")', importlib.util.find_spec("gradio")),
        ('Playwright (pip install -e ".[dev]")', importlib.util.find_spec("playwright")),
        ("Chromium (apt-get install chromium, or SPAR_CHROMIUM=path)", CHROMIUM),
    )
    if not present
]
# Headless, and nothing fetched from outside this machine (its network is closed).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLASSES = ["sky", "person, astronaut", "rocket"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def browser_tools():
    """Skip without the tools, naming what is missing; fail instead where SPAR_REQUIRE_BROWSER
    is set (.ci/run sets it, so that CI never passes without driving the page)."""
    if MISSING:
        reason = "the browser test needs " + ", ".join(MISSING)
        if os.environ.get("SPAR_REQUIRE_BROWSER"):
            pytest.fail(reason + " (SPAR_REQUIRE_BROWSER is set)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def page_url():
    """The page served on 127.0.0.1 (tiny backbone, CPU), in this process."""
    page = build_page(backbone="tiny", device="cpu")
    port = _free_port()
    launch_page(page, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_upload_type_classes_segment(browser, page_url, tmp_path):
    sample = next(p for p in sample_images() if p.stem == "astronaut")
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    tab.set_default_timeout(60_000)
    tab.goto(page_url)

    tab.locator("#input-image input[type=file]").set_input_files(str(sample))
    tab.locator("#input-image img").wait_for()  # uploaded and previewed
    tab.locator("#classes textarea").fill("\n".join(CLASSES))
    tab.locator("#segment").click()

    overlay = tab.locator("#student img")
    overlay.wait_for()
    tab.wait_for_function(
        "() => { const i = document.querySelector('#student img');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    legend = tab.locator("#legend .spar-class")
    legend.first.wait_for()
    assert legend.all_inner_texts() == ["sky", "person", "rocket"]
    assert tab.locator("#teacher img").count() == 1
    assert tab.locator("#features img").count() == 1
    timings = tab.locator("#timings").inner_text()
    assert "student (single pass):" in timings and "teacher (stride 24)" in timings
    screenshot = Path(tmp_path) / "app.png"
    tab.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("SPAR_APP_SCREENSHOT"):  # to refresh docs/images/app.png
        shutil.copy(screenshot, os.environ["SPAR_APP_SCREENSHOT"])
    tab.close()
