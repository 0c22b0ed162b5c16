"""The run report in a real headless Chromium: it renders offline, without errors, with visible images and plots.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium`` (the ``test``
extra). The browser talks to chromedriver over loopback, so the test opts out of the no-network guard for
localhost only; the page itself is a file:// URL that must load nothing but data: URIs.
"""

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.allow_localhost,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,2000"]


@pytest.fixture(scope="module")
def report_path(random_world_dir, tmp_path_factory):
    from directalign.config import build_config
    from directalign.report import write_report
    from directalign.training import train

    out = tmp_path_factory.mktemp("browser-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        cfg = build_config({}, [f"run.output_dir={out}", "train.steps=3", "train.batch_size=2",
                                "srpo.rollout_steps=2", "eval.seeds=[0,1]", "eval.steps=2", "eval.best_of=1",
                                "run.progress=false", "train.learning_rate=1e-2", "run.sample_every=1"])
        train(cfg, log=lambda *_: None)
        return write_report(out)


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def pixel_std(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32).std())


def test_report_renders_offline_in_chromium(report_path: Path, browser):
    from selenium.webdriver.common.by import By

    browser.get("about:blank")  # drop what the start page logged (it tries the network; the report must not)
    browser.get_log("performance")
    browser.get_log("browser")
    browser.get(report_path.resolve().as_uri())
    assert "directalign report" in browser.title

    # no console errors
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == [], errors

    # no failed requests, nothing fetched but the file itself and data: URIs
    failed, urls = [], []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Network.loadingFailed":
            failed.append(params)
        elif method == "Network.responseReceived" and params["response"].get("status", 200) >= 400:
            failed.append(params["response"])
        elif method == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
    assert failed == [], failed
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls

    # every image decoded
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    n_prompts = json.loads((report_path.parent / "summary.json").read_text())["eval_prompts"]
    n_heldout = 4  # run.sample_every=1 over 3 steps: the grids of steps 0, 1, 2 and 3
    assert len(images) == 2 * n_prompts + n_heldout
    assert all(c and w > 0 and h > 0 for c, w, h in images), images

    # the four training-curve plots are there, each with a drawn line
    plots = browser.find_elements(By.CSS_SELECTOR, "svg.plot")
    # 4 standard curves (reward, loss, grad norm, seconds) + SRPO's own metrics: k, reward and sigma per branch
    assert len(plots) == 4 + 6
    for plot in plots:
        assert plot.size["width"] > 100 and plot.size["height"] > 100
        assert len(plot.find_elements(By.TAG_NAME, "polyline")) == 1
    # the held-out points of the samples during training sit on the reward curve, drawn inside the plot
    points = plots[0].find_elements(By.CSS_SELECTOR, "path.extra-point")
    assert len(points) == n_heldout and all(pt.size["width"] > 3 for pt in points)
    assert sum(len(p.find_elements(By.CSS_SELECTOR, "path.extra-point")) for p in plots) == n_heldout
    grid = browser.find_element(By.CSS_SELECTOR, "table.heldout img.sample")
    browser.execute_script("arguments[0].scrollIntoView();", grid)
    assert grid.size["width"] > 50 and pixel_std(grid.screenshot_as_png) > 5

    # the page and the sample images are visibly drawn
    assert pixel_std(browser.get_screenshot_as_png()) > 10
    first = browser.find_elements(By.CSS_SELECTOR, "img.sample")[0]
    browser.execute_script("arguments[0].scrollIntoView();", first)
    assert first.size["width"] > 50
    assert pixel_std(first.screenshot_as_png) > 5
    assert "Hacking indicators" in browser.find_element(By.TAG_NAME, "body").text
