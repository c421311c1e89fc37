"""The edge's dashboard in a real headless Chromium (selenium): no console errors, the API's numbers on the page.

Needs Debian's ``chromium`` and ``chromium-driver``: installed with apt-get
when the test runs as root and they are missing; otherwise the test is
skipped and says why. Chromium runs with a fresh profile directory and
without background networking, so it reaches nothing but the loopback edge.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from live_server import serve
from popex.data import encode_png

pytestmark = pytest.mark.slow

_PACKAGES = ("chromium", "chromium-driver")
_APT_TIMEOUT_S = 600
_PAGE_TIMEOUT_S = 30.0
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


def _chromium_and_driver() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing the Debian packages as root when missing; else skip."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium and chromium-driver: not installed, and not root with apt-get to "
                    "install them (apt-get install chromium chromium-driver)")
    result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *_PACKAGES],
                            capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False)
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(f"apt-get could not install {' '.join(_PACKAGES)}: {result.stderr.strip()[-300:]}")
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, chromedriver = _chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in _FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=chromedriver)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(_PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


def test_the_dashboard_shows_the_status_without_console_errors(app, model_actions, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert model_actions.wait_idle()
    client = app.test_client()
    image = encode_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    for _ in range(5):
        assert client.post("/api/v1/classify", data=image, content_type="image/png").status_code == 200
    with serve(app) as base_url:
        browser.get(base_url + "/")
        WebDriverWait(browser, _PAGE_TIMEOUT_S).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
        status = client.get("/api/v1/status").get_json()
        shown_mbps = float(browser.find_element(By.ID, "uplink-mbps").get_attribute("data-value"))
        shown_rtt = float(browser.find_element(By.ID, "rtt-ms").get_attribute("data-value"))
        assert shown_mbps == pytest.approx(status["uplink"]["uplink_mbps"])
        assert shown_rtt == pytest.approx(status["uplink"]["rtt_ms"])
        rows = browser.find_elements(By.CSS_SELECTOR, "#strategies tbody tr")
        assert {row.get_attribute("data-model") for row in rows} == {m["model_id"] for m in status["models"]}
        for row, model in zip(sorted(rows, key=lambda r: r.get_attribute("data-model")),
                              sorted(status["models"], key=lambda m: m["model_id"])):
            assert row.find_element(By.CLASS_NAME, "split").text == str(model["strategy"]["split"])
        assert "5 recent requests" in browser.find_element(By.ID, "requests-summary").text
        table = client.get(f"/api/v1/models/{status['models'][0]['model_id']}/strategies").get_json()
        assert browser.find_element(By.ID, "pareto-summary").text.startswith(f"{table['n_rows']} rows")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == [], errors
