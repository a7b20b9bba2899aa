"""The search service over real HTTP (uvicorn on a free localhost port), and its page in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from beam_jobs import serve_search
from tests.fixtures.datasets import BuiltDataset

MAX_UPLOAD = 64 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(digits_index: str) -> Iterator[str]:
    """The service serving the digits index on 127.0.0.1 (the default host), for this module."""
    import uvicorn

    config = serve_search.parse_config(["--index_dir", digits_index, "--port", str(_free_port()),
                                        "--max_upload_bytes", str(MAX_UPLOAD)])
    assert config.host == "127.0.0.1"
    server = uvicorn.Server(uvicorn.Config(serve_search.build_app(config), host=config.host, port=config.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://{config.host}:{config.port}"
    server.should_exit = True
    thread.join(timeout=15)


def _request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
            return response.status, json.loads(body) if "json" in kind else body
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _first_image(dataset: BuiltDataset) -> tuple[str, str]:
    with open(dataset.source.manifest, newline="") as handle:
        uri, label = next(csv.reader(handle))[:2]
    return (uri if os.path.isabs(uri) else os.path.join(os.path.dirname(dataset.source.manifest), uri)), label


def test_api_answers_with_the_right_neighbors(service: str, digits_dataset: BuiltDataset) -> None:
    path, label = _first_image(digits_dataset)
    with open(path, "rb") as handle:
        status, body = _request(f"{service}/api/search?k=5", handle.read(), {"Content-Type": "image/png"})
    assert status == 200
    neighbors = body["neighbors"]
    assert len(neighbors) == 5 and neighbors[0]["score"] > 0.999 and neighbors[0]["label"] == label
    assert sum(n["label"] == label for n in neighbors) >= 4
    status, by_id = _request(f"{service}/api/neighbors?image_id={neighbors[0]['image_id']}&k=3")
    assert status == 200 and len(by_id["neighbors"]) == 3
    assert neighbors[0]["image_id"] not in [n["image_id"] for n in by_id["neighbors"]]
    status, png = _request(f"{service}{neighbors[0]['thumbnail']}")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, info = _request(f"{service}/api/info")
    assert status == 200 and info["count"] >= 1700 and info["recall_at_k"] >= 0.95


def test_api_rejects_non_images_oversized_uploads_and_unknown_ids(service: str) -> None:
    status, body = _request(f"{service}/api/search", b"this is a text file, not an image")
    assert status == 400 and body["reason"] == "not_an_image"
    status, body = _request(f"{service}/api/search", b"\x89PNG" + b"\0" * (MAX_UPLOAD + 1))
    assert status == 413
    assert _request(f"{service}/api/neighbors?image_id=nope")[0] == 404
    assert _request(f"{service}/api/thumbnail/nope")[0] == 404
    assert _request(f"{service}/api/neighbors?image_id=nope&k=100000")[0] == 422


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_page_shows_the_neighbors_of_an_uploaded_image(service: str, digits_dataset: BuiltDataset, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                     f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(service + "/")
        assert "Image search" in driver.title
        path, label = _first_image(digits_dataset)
        driver.find_element(By.ID, "file").send_keys(path)
        driver.find_element(By.ID, "submit").click()
        wait = WebDriverWait(driver, 60)
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "figure.neighbor img")))
        # Every thumbnail has loaded and has pixels (a broken image has naturalWidth 0).
        wait.until(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('figure.neighbor img, #query-image')];"
            "return imgs.length >= 11 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "figure.neighbor figcaption")]
        assert len(captions) == 10 and captions[0].startswith(f"{label} ")
        assert sum(c.startswith(f"{label} ") for c in captions) >= 8
        screenshot = tmp_path / "serve_search.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 1000
        driver.find_elements(By.CSS_SELECTOR, "img.sample")[0].click()  # Picking an indexed image works too.
        wait.until(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('figure.neighbor img')];"
            "return imgs.length === 10 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
    finally:
        driver.quit()
