"""The interactive page end to end in a real headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/install-browser.sh): it loads with no console errors, layer/head switches and hovering change what is
drawn, and a screenshot is not blank."""
import io

import pytest
import torch
from matplotlib.image import imread

from selfattn.inspect import attention_html, capture
from selfattn.nn import Attention

pytestmark = pytest.mark.browser

TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "</script>&", ".", "[SEP]"]


class ThreeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Attention(24, 3) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = x + 3 * layer(x)
        return x


def _canvas(d):
    return d.execute_script("return document.getElementById('heat').toDataURL()")


def test_page_in_headless_chromium(driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    torch.manual_seed(0)
    cap = capture(ThreeLayers().eval(), torch.randn(1, len(TOKENS), 24))
    page = tmp_path / "view.html"
    attention_html(cap, TOKENS, page, title="test page", subtitle="three random layers",
                   special=[t.startswith("[") for t in TOKENS])
    driver.get(page.as_uri())
    assert driver.execute_script("return document.body.dataset.drawn") == "0:0"
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    # the token that looks like markup is shown as text
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "g.tok text")]
    assert labels[:len(TOKENS)] == TOKENS
    assert len(driver.find_elements(By.CSS_SELECTOR, "#stats tbody tr")) == 3

    before_links = driver.find_element(By.ID, "links-svg").get_attribute("innerHTML")
    before = _canvas(driver)
    Select(driver.find_element(By.ID, "layer")).select_by_value("2")
    assert driver.execute_script("return document.body.dataset.drawn") == "2:0"
    after_layer = _canvas(driver)
    assert after_layer != before
    assert driver.find_element(By.ID, "links-svg").get_attribute("innerHTML") != before_links
    Select(driver.find_element(By.ID, "head")).select_by_value("1")
    assert driver.execute_script("return document.body.dataset.drawn") == "2:1"
    assert _canvas(driver) != after_layer
    assert "current" in driver.find_elements(By.CSS_SELECTOR, "#stats tbody tr")[1].get_attribute("class")
    # clicking a statistics row shows that head
    driver.find_elements(By.CSS_SELECTOR, "#stats tbody tr")[2].click()
    assert driver.execute_script("return document.body.dataset.drawn") == "2:2"
    assert Select(driver.find_element(By.ID, "head")).first_selected_option.text == "head 2"

    # hover a query token: only its links stay, the focus line names what it attends to
    n_lines = len(driver.find_elements(By.CSS_SELECTOR, "#links-svg line"))
    ActionChains(driver).move_to_element(driver.find_elements(By.CSS_SELECTOR, "g.tok")[2]).perform()
    focus = driver.find_element(By.ID, "focus").text
    assert focus.startswith("“cat” attends most to:")
    assert 0 < len(driver.find_elements(By.CSS_SELECTOR, "#links-svg line")) <= len(TOKENS) < n_lines
    # hover a key token: what attends to it
    ActionChains(driver).move_to_element(driver.find_elements(By.CSS_SELECTOR, "g.tok")[len(TOKENS) + 3]).perform()
    assert driver.find_element(By.ID, "focus").text.startswith("Most attending to “sat”")

    shot = driver.get_screenshot_as_png()
    (tmp_path / "shot.png").write_bytes(shot)
    img = imread(io.BytesIO(shot), format="png")
    assert img.shape[0] > 500 and img.shape[1] > 800
    colours = {tuple(p) for p in (img[..., :3] * 255).astype("uint8").reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 50, "screenshot is (nearly) blank"
    assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
