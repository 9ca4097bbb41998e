"""`my3dgen view` in a real browser: headless Chromium opens the page, the face turns with the mouse and the slider.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium (the dev extra);
skips, saying so, where they are missing. The screenshots are kept in the test's tmp dir. With
MY3DGEN_VIEW_DOCS_BASE=<base .safetensors> it shows seeds of that base instead of the random tiny
generator and also writes the page's screenshot to docs/images/view.png (how the docs' picture is made).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.view_fixtures import LiveViewer, serve, tiny_scene

DOCS_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "view.png"


pytestmark = pytest.mark.usefixtures("one_thread")


def _scene():
    base = os.environ.get("MY3DGEN_VIEW_DOCS_BASE")
    if not base:
        return tiny_scene(), "tiny"
    from my3dgen_cli.generators import open_base
    from my3dgen_cli.view.scene import Scene, Source

    G, ref = open_base(base)
    return Scene(G, [Source("seed1", seed=1), Source("seed5", seed=5)]), ref.name


@pytest.fixture
def page_viewer(tmp_path: Path) -> Iterator[LiveViewer]:
    scene, title = _scene()
    yield from serve(scene, tmp_path / "saved", title=title)


@pytest.fixture
def chromium(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("headless Chromium is not installed here (Debian: apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing (pip install -e '.[dev]')")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,760", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_page_turns_the_face_with_a_drag_and_the_yaw_slider(chromium, page_viewer: LiveViewer, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    wait = WebDriverWait(driver, 90)
    driver.get(page_viewer.page_url())
    image = driver.find_element(By.ID, "frame")

    def shown(yaw: str) -> bool:
        return image.get_attribute("data-yaw") == yaw and image.get_attribute("data-quality") == "full"

    wait.until(lambda d: shown("0"))
    assert driver.find_element(By.ID, "mix-row").is_displayed()  # two latents: the interpolation slider
    front = image.screenshot_as_png

    ActionChains(driver).click_and_hold(image).move_by_offset(40, 0).move_by_offset(40, 0).release().perform()
    wait.until(lambda d: shown("28"))  # 80 px to the right at 0.35 degree per px
    assert driver.find_element(By.ID, "yaw").get_attribute("value") == "28"
    dragged = image.screenshot_as_png

    driver.find_element(By.ID, "yaw").send_keys(Keys.END)  # the yaw slider to its end, as a keyboard user does
    wait.until(lambda d: shown("90"))
    side = image.screenshot_as_png
    driver.save_screenshot(str(tmp_path / "view.png"))
    for name, png in (("front", front), ("dragged", dragged), ("side", side)):
        (tmp_path / f"frame_{name}.png").write_bytes(png)
    assert np.abs(_pixels(front) - _pixels(dragged)).mean() > 1.0
    assert np.abs(_pixels(dragged) - _pixels(side)).mean() > 1.0
    assert "full" in driver.find_element(By.ID, "caption").text
    if os.environ.get("MY3DGEN_VIEW_DOCS_BASE"):
        wait.until(lambda d: "render" in d.find_element(By.ID, "caption").text)
        yaw, mix = driver.find_element(By.ID, "yaw"), driver.find_element(By.ID, "mix")
        yaw.send_keys(Keys.HOME, *[Keys.RIGHT] * 65)  # -90 + 65
        mix.send_keys(*[Keys.PAGE_UP] * 5)  # 0.1 a step
        wait.until(lambda d: shown("-25") and image.get_attribute("data-mix") == "0.5")
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(DOCS_IMAGE))
