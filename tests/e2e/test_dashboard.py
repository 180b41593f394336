"""/dashboard in headless Chromium (Debian's chromium + chromium-driver, Selenium from PyPI):
the page loads with no console errors, a counter it shows lies between two /metrics scrapes
taken around it while a load runs (and equals /metrics once the load stops), and a screenshot
is saved. --api-key guards the page and its data."""
from __future__ import annotations

import base64
import shutil
import threading
import time

import httpx
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

KEY = "dash-key"
COUNTER = "vllm:generation_tokens_total"


def _chromium():
    """(binary, driver) paths, or skip saying what is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="pip install selenium")
    return binary, driver


@pytest.fixture(scope="module")
def server():
    with RemoteServer(str(build_tiny_model("llama")), ["--max-model-len", "128",
                                                        "--api-key", KEY]) as srv:
        yield srv


def _browser(binary: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    # the API key on every request of the page, as a browser sends Basic credentials
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                            {"headers": {"Authorization": f"Bearer {KEY}"}})
    return browser


def _load(url: str, stop: threading.Event) -> None:
    """Completions back to back until ``stop``: the counters move while the page polls."""
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        while not stop.is_set():
            client.post(f"{url}/v1/completions", json={
                "model": client.get(f"{url}/v1/models").json()["data"][0]["id"],
                "prompt": "Hello", "max_tokens": 16, "ignore_eos": True})


def _page_value(browser, metric: str) -> float:
    raw = browser.execute_script(
        f"return document.querySelector('[data-metric=\"{metric}\"]').dataset.value")
    return float(raw)


def _updates(browser) -> int:
    return int(browser.execute_script(
        "return document.getElementById('status').dataset.updates || '0'"))


def _wait_update(browser, after: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = _updates(browser)
        if count > after:
            return count
        time.sleep(0.1)
    raise AssertionError("the page did not refresh its numbers")


def test_api_key_guards_dashboard(server):
    assert httpx.get(f"{server.url}/dashboard").status_code == 401
    assert "Basic" in httpx.get(f"{server.url}/dashboard/data").headers["www-authenticate"]
    assert httpx.get(f"{server.url}/dashboard/data",
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    resp = httpx.get(f"{server.url}/dashboard/data", headers={"Authorization": f"Basic {basic}"})
    assert resp.status_code == 200 and COUNTER in resp.json()["metrics"]
    js = httpx.get(f"{server.url}/dashboard/static/uPlot.iife.min.js",
                   headers={"Authorization": f"Bearer {KEY}"})
    assert js.status_code == 200 and "uPlot" in js.text
    assert httpx.get(f"{server.url}/dashboard/static/..%2Fdashboard.py",
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_dashboard_in_headless_chromium(server, tmp_path):
    binary, driver = _chromium()
    browser = _browser(binary, driver)
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(server.url, stop), daemon=True)
    try:
        browser.get(f"{server.url}/dashboard")
        seen = _wait_update(browser, 0)
        loader.start()
        checks = 0
        deadline = time.monotonic() + 60
        while checks < 3 and time.monotonic() < deadline:  # while the load runs
            before = server.metrics()[COUNTER]
            seen = _wait_update(browser, seen)
            shown = _page_value(browser, COUNTER)
            after = server.metrics()[COUNTER]
            assert before <= shown <= after, (before, shown, after)
            checks += before < after  # count only windows where the counter moved
        assert checks == 3, "the load did not move the generation-token counter"
        stop.set()
        loader.join(60)
        final = server.metrics()[COUNTER]
        _wait_update(browser, _updates(browser))
        _wait_update(browser, _updates(browser))  # a poll that started after the load ended
        assert _page_value(browser, COUNTER) == final
        # the per-model table (one row: the base model) matches the per-model counters
        cells = browser.execute_script(
            "return [...document.querySelectorAll('#per-model tr td')].map(td => td.textContent)")
        started = server.metrics()["pagedllm:model_requests_started_total"]
        assert len(cells) == 4 and float(cells[1]) == started > 0, (cells, started)
        assert browser.find_element("id", "model").text.strip("· ")
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        shutil.copy(shot, "/tmp/pagedllm-dashboard.png")  # kept after the run, for people
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        stop.set()
        browser.quit()
