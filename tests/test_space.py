"""The Gradio Space in a real headless browser (Debian's chromium driven by Selenium) against the app on localhost."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.demo import build_shapes_world
from clip_diffusionlm.demo.shapes_world import ShapesWorldConfig
from clip_diffusionlm.pipelines.pipeline_clip_diffusion_caption import RECOMMENDED_INFERENCE_STEPS

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver on PATH; install them with `apt-get install chromium chromium-driver` "
    "(.ci/run does) to run the browser test of the Space",
)
APP = Path(__file__).resolve().parents[1] / "space" / "app.py"


def load_app_module():
    spec = importlib.util.spec_from_file_location("space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_space_captions_an_uploaded_shapes_image_in_a_browser(tokenizer, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    world = build_shapes_world(tmp_path / "shapes", 2, 1, 1, 1, seed=0, config=ShapesWorldConfig(image_size=96))
    image_path = tmp_path / "shapes.png"
    PIL.Image.open(sorted((world / "images").glob("*.png"))[0]).convert("RGB").save(image_path)
    # SPACE_TEST_MODEL=outputs/demo/pipeline runs the same check on a trained pipeline (the README's screenshot).
    model = os.environ.get("SPACE_TEST_MODEL")
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(model) if model else tiny_pipeline(tokenizer)
    pipe.set_progress_bar_config(disable=True)
    # The Space starts at the pipeline's recommended number of steps.
    expected = pipe(PIL.Image.open(image_path).convert("RGB"), num_inference_steps=RECOMMENDED_INFERENCE_STEPS,
                    generator=torch.Generator().manual_seed(0)).captions[0]

    app = load_app_module()
    demo = app.build_demo(pipe, [str(image_path)], "CLIP-DiffusionLM test")
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        upload = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        upload.send_keys(str(image_path))
        wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#image img"))
        browser.find_element(By.ID, "caption-button").click()
        caption_box = browser.find_element(By.CSS_SELECTOR, "#caption textarea")
        wait.until(lambda driver: caption_box.get_attribute("value"))
        caption = caption_box.get_attribute("value")
        # The table's text: its label, the three headers, then step, timestep and caption of every row.
        cells = browser.find_element(By.ID, "trajectory").text.split("\n")[4:]
        rows = [cells[index : index + 3] for index in range(0, len(cells), 3)]
        artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(artifacts / "space.png"))
    finally:
        demo.close()

    assert caption == expected
    assert [row[0] for row in rows] == [str(step) for step in range(1, RECOMMENDED_INFERENCE_STEPS + 1)]
    assert rows[-1][2] == expected  # the last step's estimate is the caption
    assert (artifacts / "space.png").stat().st_size > 10_000
    print(f"browser test: {time.monotonic() - started:.1f} s")
