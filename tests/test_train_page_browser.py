"""The attention-across-training page end to end in a real headless Chromium (as tests/test_html_browser.py): it
loads with no console errors, the step slider redraws the heads, the scores table and the marker on the loss curve,
a title that looks like markup stays text, and a screenshot is not blank."""
import io

import pytest
import torch
from matplotlib.image import imread

from selfattn.train import TrainConfig, train

pytestmark = pytest.mark.browser

BROWSER_WINDOW = "1300,1100"  # the driver fixture is in conftest.py


def _data_url(d, selector):
    return d.execute_script(f"return document.querySelector({selector!r}).toDataURL()")


def test_training_page_in_headless_chromium(driver, tmp_path):
    from selenium.webdriver.common.by import By
    torch.set_num_threads(1)
    c = TrainConfig(task="repeat", seq_len=16, period=4, n_symbols=8, n_layer=2, n_head=2, d_model=16, mlp=False,
                    steps=12, batch_size=4, lr=1e-2, warmup=1, eval_every=4, eval_batches=1, snapshot_every=4)
    train(c, tmp_path / "run", progress=False)
    page = tmp_path / "run" / "training.html"
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "http://" not in text and "https://" not in text  # self-contained
    driver.get(page.as_uri())
    assert driver.execute_script("return document.body.dataset.step") == "0"
    assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
    heads = driver.find_elements(By.CSS_SELECTOR, "#heads canvas")
    assert [h.get_attribute("data-head") for h in heads] == ["0.0", "0.1", "1.0", "1.1"]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#table tr")) == 1 + 4  # header + every head
    assert "initialization" in driver.find_element(By.ID, "steplabel").text
    before = [_data_url(driver, "#heads canvas"), _data_url(driver, "#loss"), _data_url(driver, "#scores"),
              driver.find_element(By.ID, "table").text]
    slider = driver.find_element(By.ID, "step")
    assert slider.get_attribute("max") == "3"  # snapshots at 0, 4, 8, 12
    driver.execute_script("const s = document.getElementById('step'); s.value = '3';"
                          "s.dispatchEvent(new Event('input'));")
    assert driver.execute_script("return document.body.dataset.step") == "12"
    assert driver.find_element(By.ID, "steplabel").text.startswith("step 12 loss ")
    after = [_data_url(driver, "#heads canvas"), _data_url(driver, "#loss"), _data_url(driver, "#scores"),
             driver.find_element(By.ID, "table").text]
    assert all(a != b for a, b in zip(after, before))  # heads, loss marker, score marker and table all moved

    # a title that looks like markup is shown as text, not parsed
    from selfattn.inspect.training_page import training_html
    from selfattn.train.snapshots import load_snapshots
    evil = "</script><b>bold</b>&"
    page2 = tmp_path / "evil.html"
    page2.write_text(training_html(load_snapshots(tmp_path / "run"), [1.0, 0.5], [(2, 0.4)], title=evil))
    driver.get(page2.as_uri())
    assert driver.find_element(By.ID, "title").text == evil
    assert driver.execute_script("return document.querySelectorAll('b').length") == 0

    shot = driver.get_screenshot_as_png()
    img = imread(io.BytesIO(shot), format="png")
    colours = {tuple(p) for p in (img[..., :3] * 255).astype("uint8").reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 50, "screenshot is (nearly) blank"
    assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
