"""explain's index.html in a real headless browser: Debian's chromium (`make browser`), driven by
selenium through Debian's chromedriver. Hovering or clicking an answer token shows its map."""

import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from paligemma.cli.main import main
from paligemma.ref.tasks import shapes

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# `make test` installs the browser (`make browser`) and sets PALIGEMMA_REQUIRE_BROWSER: there a missing
# browser fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("PALIGEMMA_REQUIRE_BROWSER"),
                                reason="Debian's chromium and chromium-driver are not installed (make browser)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    scene = shapes.random_scene(np.random.default_rng(3), **shapes.DEMO_SCENE)
    Image.fromarray(scene.image).save(folder / "scene.png")
    out = folder / "out"
    assert main(["explain", "--image", str(folder / "scene.png"), "--prompt", "segment triangle",
                 "--out", str(out), "--max-new-tokens", "24"]) == 0
    return out


def shown(browser):
    """(map file, caption, whether the picture loaded, tokens marked on)."""
    src = browser.execute_script("return document.getElementById('map').getAttribute('src')")
    caption = browser.find_element("id", "map-caption").text
    loaded = browser.execute_script("const m = document.getElementById('map'); return m.complete && m.naturalWidth")
    on = [t.get_attribute("id") for t in browser.find_elements("css selector", ".tok.on")]
    return src, caption, loaded, on


def test_hovering_or_clicking_a_token_shows_its_map(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains

    browser.get(pathlib.Path(page / "index.html").as_uri())
    tokens = browser.find_elements("css selector", ".tok")
    assert len(tokens) == len(np.load(page / "attention.npz")["answer"]) > 2
    base = browser.find_element("id", "base")
    assert base.get_attribute("src").endswith("objects.png")  # a segment prompt: its box and mask
    assert browser.execute_script("return arguments[0].naturalWidth", base) == 256
    first = shown(browser)
    assert first[0] == "token_00.png" and first[2] > 0 and first[3] == ["tok-0"]

    ActionChains(browser).move_to_element(tokens[2]).perform()
    src, caption, loaded, on = shown(browser)
    assert (src, on) == ("token_02.png", ["tok-2"]) and caption.startswith("answer token 2:") and loaded > 0
    assert np.any(np.asarray(Image.open(page / "token_02.png")) != np.asarray(Image.open(page / "token_00.png")))

    tokens[1].click()
    src, caption, loaded, on = shown(browser)
    assert (src, on) == ("token_01.png", ["tok-1"]) and caption.startswith("answer token 1:") and loaded > 0
    for name in ("mask.png", "strip.png"):  # the pictures below load too
        picture = browser.find_element("css selector", f"img[src='{name}']")
        assert browser.execute_script("return arguments[0].naturalWidth", picture) > 0
