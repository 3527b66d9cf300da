"""Regenerate the README's pictures (needs the dev requirements and Debian's chromium + chromium-driver):

    .venv/bin/python docs/make_images.py            # docs/explain.png, docs/heads.png, docs/bench.png
    .venv/bin/python docs/make_images.py --no-bench # skip the benchmark (minutes on a small CPU)
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from selfattn.app import cli
from selfattn.app.explain import DEFAULT_TEXT

DOCS = Path(__file__).resolve().parent


def screenshot(page: Path, out: Path, hover_token: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="selfattn-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
              "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1320,1180",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        d.get(page.as_uri())
        ActionChains(d).move_to_element(d.find_elements(By.CSS_SELECTOR, "g.tok")[hover_token]).perform()
        d.save_screenshot(str(out))
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--no-bench", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "attention.html"
        code = cli.main(["explain", DEFAULT_TEXT, "--layer", "2", "--out", str(page),
                         "--out", str(DOCS / "heads.png")])
        if code:
            return code
        screenshot(page, DOCS / "explain.png", hover_token=10)  # hover "it": what does the pronoun attend to?
    if not args.no_bench:
        return cli.main(["bench", "--quick", "--out", str(DOCS / "bench.png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
