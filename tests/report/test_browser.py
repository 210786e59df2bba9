"""The report page in a real headless Chromium: no console error, no network request, figures drawn, sortable."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ptqlab.report import write_report
from ptqlab.store import Store

PACKAGES = ["chromium", "chromium-driver"]  # Debian's browser and its WebDriver


def _binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _install() -> None:
    """Install Chromium and its driver with apt when missing (the test set-up; needs root)."""
    if all(_binaries()):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and apt-get cannot install it here (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    assert all(_binaries()), "apt-get installed chromium but its binaries are not on PATH"


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    _install()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600", "--disable-background-networking", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def test_report_page_in_chromium(store: Store, tmp_path: Path, driver: Any) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    report = write_report(store.path, tmp_path / "rep")
    driver.get(report.index.resolve().as_uri())
    assert driver.title == "ptqlab report"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file://", "data:", "about:")) for u in urls), urls
    sizes = driver.execute_script(
        "return Array.from(document.querySelectorAll('figure svg')).map(function (e) {"
        " var r = e.getBoundingClientRect(); return [r.width, r.height]; });")
    assert len(sizes) == len(report.figures) and all(w > 50 and h > 50 for w, h in sizes), sizes
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L")
    low, high = shot.getextrema()
    assert high - low > 100 and len(shot.getcolors(1 << 16) or []) > 10  # text and tables, not a blank page
    # a click on a column head sorts the table by it
    table = driver.find_element(By.CSS_SELECTOR, "#zq-weight table")
    head = next(th for th in table.find_elements(By.TAG_NAME, "th") if th.text == "Δ ppl")
    head.click()
    col = [th.text for th in table.find_elements(By.TAG_NAME, "th")].index("Δ ppl")
    values = [float(r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-v"))
              for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert values == sorted(values) and values != [float(x) for x in sorted(values, reverse=True)]
    # every run id in a table links to its row in the list of runs
    link = table.find_element(By.CSS_SELECTOR, "td.runs a")
    assert driver.find_element(By.ID, link.get_attribute("href").split("#")[1]).tag_name == "tr"
