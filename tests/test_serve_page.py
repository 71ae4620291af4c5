"""The page at / in a real headless browser: Debian's Chromium (`make browser`) driven by Selenium
through Debian's chromedriver (never a downloaded browser). Load the page, upload a scene, press
detect, and find the server's labels listed and its boxes drawn on the canvas."""

import os
import shutil

import httpx
import pytest

from serve_fixtures import data_url, live_server, scene_png

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255)]  # the page's (serve/static/app.js)
# `make test` installs the browser (`make browser`) and sets PALIGEMMA_REQUIRE_BROWSER: there a missing
# browser fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("PALIGEMMA_REQUIRE_BROWSER"),
                                reason="Debian's chromium and chromium-driver are not installed (make browser)")


@pytest.fixture(scope="module")
def server():
    with live_server("--slots", "2", "--quiet") as s:
        yield s


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_state(driver, state, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") in (state, "error"))
    assert driver.execute_script("return document.body.dataset.state") == state, \
        driver.find_element("id", "error").text


def test_page_detects_and_draws_boxes(server, browser, tmp_path):
    png, scene = scene_png(13)  # a scene whose shape the demo model finds
    path = tmp_path / "scene.png"
    path.write_bytes(png)
    kinds = scene.shapes[0].kind
    browser.get(server.url + "/")
    wait_for_state(browser, "empty", 30)
    upload = browser.find_element("id", "file")
    browser.execute_script("arguments[0].hidden = false", upload)  # a hidden input takes no keys
    upload.send_keys(str(path))
    wait_for_state(browser, "ready", 30)
    box = browser.find_element("id", "objectsText")
    box.clear()
    box.send_keys(kinds)
    browser.find_element("css selector", "button[data-task=detect]").click()
    wait_for_state(browser, "done")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 1000

    # What the server answers for the same request (greedy: the same answer).
    answer = httpx.post(server.url + "/v1/generate", json={"image": data_url(png), "prompt": f"detect {kinds}",
                                                           "max_tokens": 96}, timeout=60).json()
    assert browser.find_element("id", "answer").text == answer["text"]
    shown = [(li.get_attribute("data-label"), li.get_attribute("data-box"))
             for li in browser.find_elements("css selector", "li.object")]
    expected = [(o["label"], ",".join(map(str, o["box"])) if o["box"] else "") for o in answer["objects"]]
    assert shown == expected and any(box for _, box in shown), answer["text"]

    # The last box drawn (nothing covers it) has its left edge in its colour; the canvas is the scene at 3x.
    scale = 384 / 128
    last = max(i for i, o in enumerate(answer["objects"]) if o["box"])
    y0, x0, y1, x1 = answer["objects"][last]["box"]
    x, y = int(x0 * scale) + 1, int((y0 + y1) / 2 * scale)
    pixel = browser.execute_script("return Array.from(document.getElementById('canvas').getContext('2d')"
                                   ".getImageData(arguments[0], arguments[1], 1, 1).data)", x, y)
    assert tuple(pixel[:3]) == PALETTE[last % len(PALETTE)], (last, pixel)
