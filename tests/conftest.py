"""Shared pytest setup: tests import the oracle as ``from oracle import check_attention``.

TRITON_INTERPRET=1 is set before anything imports triton (transformers does, at import time, when it is
installed): the Triton kernels then run on CPU tensors through triton's interpreter (tests/test_triton.py). It
changes nothing for the other kernels."""
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))


# Headless Chromium for the page tests (tests/test_*_browser.py): one browser per test module
# (a module sets BROWSER_WINDOW = "width,height" for another window size)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync"]


def _binary(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


@pytest.fixture(scope="module")
def driver(request):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chrome, chromedriver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if chrome is None or chromedriver is None:  # scripts/install-browser.sh installs both; say so, do not skip
        pytest.fail("headless Chromium not found: run scripts/install-browser.sh (Debian: chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="selfattn-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    window = getattr(request.module, "BROWSER_WINDOW", "1300,1000")
    for a in CHROMIUM_FLAGS + [f"--window-size={window}", f"--user-data-dir={profile}"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)
