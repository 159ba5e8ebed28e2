"""End-to-end: the real app in a real headless Chromium (Debian's /usr/bin/chromium, never a download).

One ``streamlit run app.py`` server per module, one browser. Every page in :data:`PAGE_CASES` gets the
same check (open, pick a sample, find the main figure, screenshot); adding a page is one line there.
Screenshots go to tests/_output/.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = Path(__file__).resolve().parent / "_output"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
STARTUP_S = 120  # the first run imports torch and loads a model on 2 shared cores
RUN_MS = 180_000
CLICK_FRAME = 'iframe[title*="streamlit_image_coordinates"]'

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                       "(apt-get install -y chromium); CI installs it"),
]


@dataclass(frozen=True)
class PageCase:
    """One page to smoke-test: its URL path, title text, the CSS selector of its main figure."""

    url_path: str
    title: str
    main_figure: str
    sample: str = "Chelsea the cat"  # part of a sample caption to pick in the sidebar


PAGE_CASES = (
    PageCase("vit_attention", "ViT attention", CLICK_FRAME),
    PageCase("mobile_former_bridge", "Mobile-Former bridge", '[data-testid="stMain"] [data-testid="stImage"] img'),
    PageCase("moat_windows", "MOAT window vs global", CLICK_FRAME),
    PageCase("fcvit_global_context", "FCViT global context", '[data-testid="stPlotlyChart"]'),
    PageCase("conv2former_modulation", "Conv2Former modulation", '[data-testid="stPlotlyChart"]'),
    PageCase("receptive_field", "Receptive field & CE depth", '[data-testid="stPlotlyChart"]'),
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    # Offline on purpose: the e2e test must never depend on the Hugging Face Hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
        "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
    ]
    with open(OUTPUT / "streamlit.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, process, STARTUP_S)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(RUN_MS)
    try:
        yield page
    finally:
        context.close()


# --- helpers other pages reuse ------------------------------------------------------------------


def wait_for_run(page: Page) -> None:
    """Wait until the script has finished its current run (Streamlit marks it on the app root)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                           timeout=RUN_MS)


def open_page(page: Page, server: str, case: PageCase) -> None:
    page.goto(f"{server}/{case.url_path}")
    page.get_by_role("heading", name=case.title).first.wait_for()
    wait_for_run(page)


def pick_sample(page: Page, caption: str) -> None:
    """Choose a bundled sample in the shared sidebar picker by (part of) its caption."""
    sidebar = page.get_by_test_id("stSidebar")
    sidebar.get_by_test_id("stRadio").get_by_text("Sample", exact=True).click()
    box = sidebar.get_by_test_id("stSelectbox").filter(has_text="Sample image")
    box.locator("input").click()
    page.get_by_role("option", name=re.compile(re.escape(caption))).first.click()
    sidebar.get_by_test_id("stImage").get_by_text(caption).wait_for()
    wait_for_run(page)


def main_figure(page: Page, case: PageCase) -> Locator:
    figure = page.locator(case.main_figure).first
    figure.wait_for(state="visible")
    box = figure.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 100, box
    return figure


def screenshot(page: Page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport to fit it."""
    path = OUTPUT / f"{name}.png"
    viewport = page.viewport_size or {"width": 1440, "height": 1000}
    height = page.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer]')]"
        ".map(e => e.scrollHeight), window.innerHeight)"
    )
    page.set_viewport_size({"width": viewport["width"], "height": min(int(height), 6000)})
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(viewport)
    assert path.stat().st_size > 10_000
    return path


def assert_no_exception(page: Page) -> None:
    errors = page.get_by_test_id("stException")
    assert errors.count() == 0, errors.first.inner_text()


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PAGE_CASES, ids=[c.url_path for c in PAGE_CASES])
def test_page_shows_main_figure(page: Page, server: str, case: PageCase) -> None:
    open_page(page, server, case)
    pick_sample(page, case.sample)
    main_figure(page, case)
    assert_no_exception(page)
    screenshot(page, case.url_path)


def test_vit_click_chooses_query(page: Page, server: str) -> None:
    case = PAGE_CASES[0]
    open_page(page, server, case)
    pick_sample(page, "CIFAR-10 test image: cat")
    readout = page.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(r"Query patch: row \d+"))
    readout.wait_for()
    grid = re.search(r"of the (\d+)×(\d+) grid", readout.inner_text())
    assert grid, readout.inner_text()
    rows, cols = int(grid.group(1)), int(grid.group(2))
    target = (1, cols - 2)  # away from the default centre query
    assert f"row {target[0]}, column {target[1]}" not in readout.inner_text()

    image = page.frame_locator(CLICK_FRAME).locator("#image")
    image.wait_for(state="visible")
    before = image.get_attribute("src")
    box = image.bounding_box()
    assert box is not None
    image.click(position={"x": (target[1] + 0.5) * box["width"] / cols,
                          "y": (target[0] + 0.5) * box["height"] / rows})

    page.get_by_text(f"Query patch: row {target[0]}, column {target[1]}").wait_for()
    wait_for_run(page)
    # The number inputs follow the click, and the picture is re-rendered for the new query.
    assert page.get_by_label("Query row").input_value() == str(target[0])
    assert page.get_by_label("Query column").input_value() == str(target[1])
    after = page.frame_locator(CLICK_FRAME).locator("#image").get_attribute("src")
    assert after and after != before
    assert page.get_by_test_id("stPlotlyChart").count() >= 1
    assert_no_exception(page)
    screenshot(page, "vit_attention_clicked")
