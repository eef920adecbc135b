"""Writes docs/page.png, the README's picture of the page: a real server with the default
model, a cat photo classified and three photos run as a job, in headless Chromium.

    .venv/bin/python scripts/page_screenshot.py      (make page-screenshot)
"""

import sys
import tempfile
from pathlib import Path

from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.browser import headless_chromium  # noqa: E402
from harness.server import running_server  # noqa: E402
from harness.services import find_program  # noqa: E402

PHOTOS = [ROOT / "tests" / "data" / name for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]


def main() -> None:
    with (
        tempfile.TemporaryDirectory() as work,
        running_server({}, Path(work) / "server.log") as server,
    ):
        driver = headless_chromium(find_program("chromium"), find_program("chromedriver"))
        try:
            driver.set_window_size(1000, 1400)
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 60, poll_frequency=0.05)

            def text(element_id: str) -> str:
                return str(driver.execute_script(f"return $('{element_id}').innerText"))

            wait.until(lambda _: text("s-ready") == "Ready")
            driver.find_element("id", "one").send_keys(str(PHOTOS[0]))
            wait.until(lambda _: "answered in" in text("timing"))
            driver.find_element("id", "many").send_keys("\n".join(map(str, PHOTOS)))
            wait.until(lambda _: "finished" in text("job-state"))
            target = ROOT / "docs" / "page.png"
            target.parent.mkdir(exist_ok=True)
            driver.save_screenshot(str(target))
            print(f"wrote {target.relative_to(ROOT)}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
