"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright."""

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.web.conftest import TOKEN, Served

pytestmark = pytest.mark.peers


def test_an_administrator_finds_the_study_its_overlays_and_requeues_a_failed_job(served: Served) -> None:
    chromium = require_tool("chromium", "chromium")
    require_tool("chromedriver", "chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{served.base}/?token={TOKEN}")
            assert "Overview" in page.inner_text("h1")
            page.click("text=Studies")
            page.click(f"text={served.cr_study}")
            page.wait_for_function(
                "() => { const imgs = [...document.querySelectorAll('.previews img')];"
                " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
            )
            widths = page.eval_on_selector_all(".previews img", "imgs => imgs.map(i => i.naturalWidth)")
            # the overlays really loaded, at their own width (the 512 px phantom's: previews are
            # at most 640 px wide, never enlarged)
            assert len(widths) == 2 and all(w == 512 for w in widths)
            text = page.inner_text("main")
            assert "nodule" in text and "effusion" in text and "positive" in text
            shot = os.environ.get("DICOM_NODE_SCREENSHOT")
            if shot:  # how docs/figures/dashboard-study.png is made
                page.screenshot(path=shot, full_page=True)
            page.goto(f"{served.base}/studies/{served.ct_study}")
            assert "failed" in page.inner_text("table")
            page.click("button:has-text('Requeue')")
            notice = page.inner_text("#notice")
            assert "requeued: now queued" in notice
        finally:
            browser.close()


def test_playwright_uses_no_downloaded_browser() -> None:
    assert shutil.which("chromium") is None or Path(shutil.which("chromium")).is_file()  # type: ignore[arg-type]
