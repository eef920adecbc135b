"""The web page at GET /, in a real headless Chromium (Debian's chromium and
chromium-driver, which `make services` installs) against the real server and model.
Each state of the page is saved as a screenshot under the test's temporary directory."""

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from harness.browser import headless_chromium
from harness.server import Server, running_server
from main import create_app
from settings import Settings
from tests.services import require

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parent / "data"
PHOTOS = {"chelsea.jpg": "cat", "coffee.jpg": "espresso", "rocket.jpg": "missile"}


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver = headless_chromium(require("chromium"), require("chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, server: Server) -> Iterator[WebDriver]:
    browser.set_window_size(1100, 1300)
    browser.get(server.url + "/")
    until(browser, lambda: text(browser, "s-ready") == "Ready")
    browser.get_log("browser")  # start each test with an empty console
    yield browser
    assert console_problems(browser) == []


def console_problems(driver: WebDriver) -> list[str]:
    """Script errors and CSP violations logged since the last call (a missing favicon is
    not one)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]


def until(driver: WebDriver, condition: Callable[[], object], seconds: float = 60) -> None:
    WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda _: condition())


# Read in one script call: the page replaces these elements as results arrive.
def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').innerText"))


def screenshot(driver: WebDriver, path: Path) -> None:
    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        assert image.size[0] > 300


def bar_labels(driver: WebDriver) -> list[str]:
    script = "return [...document.querySelectorAll('#bars .label')].map((e) => e.innerText)"
    return list(driver.execute_script(script))


def table(driver: WebDriver) -> list[list[str]]:
    script = """return [...document.querySelectorAll('#rows tr')]
        .map((row) => [...row.cells].map((cell) => cell.innerText))"""
    return list(driver.execute_script(script))


def test_a_cat_photo_shows_cat_in_the_top_bar(page: WebDriver, tmp_path: Path) -> None:
    below = page.find_element(By.ID, "many-title").location["y"]
    page.find_element(By.ID, "one").send_keys(str(DATA / "chelsea.jpg"))
    until(page, lambda: "cat" in bar_labels(page)[0])
    assert re.fullmatch(r".+, answered in \d+ ms", text(page, "timing"))
    assert len(bar_labels(page)) == 5
    assert page.find_element(By.ID, "preview").is_displayed()
    assert text(page, "one-error") == ""
    # The result filled space kept for it: what is below did not move.
    assert page.find_element(By.ID, "many-title").location["y"] == below
    screenshot(page, tmp_path / "cat.png")


def test_a_text_file_shows_the_415_message(page: WebDriver, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    page.find_element(By.ID, "one").send_keys(str(notes))
    until(page, lambda: "415" in text(page, "one-error"))
    message = text(page, "one-error")
    assert "not an image in an accepted format" in message
    assert message.startswith("notes.txt")
    screenshot(page, tmp_path / "text-file.png")


def test_an_oversized_file_shows_the_413_message(page: WebDriver, tmp_path: Path) -> None:
    # The test server's MAX_UPLOAD_BYTES is 2 MB.
    image = Image.effect_noise((1400, 1400), 120).convert("RGB")
    big = tmp_path / "big.png"
    image.save(big)
    assert big.stat().st_size > 2_000_000
    page.find_element(By.ID, "one").send_keys(str(big))
    until(page, lambda: "413" in text(page, "one-error"))
    assert "MAX_UPLOAD_BYTES" in text(page, "one-error")
    screenshot(page, tmp_path / "oversized.png")


@pytest.mark.parametrize("picker", ["many", "folder"])
def test_three_photos_as_a_job_fill_the_table(page: WebDriver, picker: str, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes((DATA / name).read_bytes())
    if picker == "folder":
        (folder / "notes.txt").write_text("not a photo: a folder's other files are left out")
        page.find_element(By.ID, "folder").send_keys(str(folder))
    else:
        page.find_element(By.ID, "many").send_keys("\n".join(str(folder / n) for n in PHOTOS))
    until(page, lambda: text(page, "job-count") == "3/3" and "finished" in text(page, "job-state"))
    rows = table(page)
    assert [row[0] for row in rows] == ["1", "2", "3"]
    for row, expected in zip(rows, PHOTOS.values(), strict=True):
        assert expected in row[2].lower()
        assert re.fullmatch(r"\d+\.\d%", row[3])
    assert page.find_element(By.ID, "job-progress").get_attribute("value") == "3"
    assert "finished: 3 of 3 images" in text(page, "job-state")
    if picker == "folder":
        assert "left out 1 file that is not an image" in text(page, "job-state")
    screenshot(page, tmp_path / "job-done.png")


def test_a_200_image_job_cancelled_from_the_page_ends_cancelled(
    page: WebDriver, server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    photos = [Image.open(DATA / name).convert("RGB") for name in PHOTOS]
    paths = []
    for index in range(200):
        photo = photos[index % len(photos)].resize((1024 + index, 768))
        path = folder / f"{index:03}.jpg"
        photo.save(path, quality=85)
        paths.append(str(path))
    page.find_element(By.ID, "many").send_keys("\n".join(paths))
    cancel = page.find_element(By.ID, "cancel")
    until(page, cancel.is_enabled)
    screenshot(page, tmp_path / "job-running.png")
    cancel.click()
    until(page, lambda: "cancelled after" in text(page, "job-state"))
    state = text(page, "job-state")
    match = re.search(r"Job ([0-9a-f]{32}) cancelled after (\d+) of 200 images", state)
    assert match, state
    done = int(match.group(2))
    assert done < 200
    assert text(page, "job-count") == f"{done}/200"
    job = httpx.get(f"{server.url}/jobs/{match.group(1)}").json()
    assert job["status"] == "cancelled"
    assert len(table(page)) == 200
    assert page.find_element(By.ID, "many").is_enabled()  # ready for the next job
    screenshot(page, tmp_path / "job-cancelled.png")


def test_the_status_panel_shows_the_server(page: WebDriver, server: Server) -> None:
    metadata = httpx.get(f"{server.url}/metadata").json()["tasks"]["cls"]
    assert text(page, "s-model") == metadata["model"]["name"]
    assert text(page, "s-backend") == metadata["model"]["backend"]
    assert text(page, "s-device") == metadata["model"]["device"]
    assert text(page, "s-batch").startswith(f"up to {metadata['batching']['max_batch_size']}")
    assert re.fullmatch(r"\d+ waiting", text(page, "s-queue"))


def test_with_another_task_the_page_shows_the_tasks_served(
    browser: WebDriver, tmp_path: Path
) -> None:
    with running_server({"TASKS": "examples.sentiment:Sentiment"}, tmp_path / "log") as other:
        browser.get(other.url + "/")
        until(browser, lambda: text(browser, "s-ready") == "Ready")
        until(browser, lambda: "POST /sentiment/jobs" in text(browser, "tasks"))
        assert not browser.find_element(By.ID, "try").is_displayed()
        assert not browser.find_element(By.ID, "many-images").is_displayed()
        assert text(browser, "title") == "Inference server"
        command = browser.find_element(By.CSS_SELECTOR, "#tasks pre code").text
        assert command.startswith(f"curl -s {other.url}/sentiment ")
        answer = subprocess.run(["bash", "-c", command], capture_output=True, timeout=30)
        assert json.loads(answer.stdout)["label"] == "neutral"  # "..." holds no word
        assert console_problems(browser) == []


def test_the_api_docs_render_with_no_network(browser: WebDriver, server: Server) -> None:
    browser.get(server.url + "/docs")
    browser_text = "return document.body.innerText"
    until(browser, lambda: "/cls/jobs" in str(browser.execute_script(browser_text)))
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map((entry) => entry.name)"
    )
    assert fetched, "the page loaded nothing"
    assert [url for url in fetched if not url.startswith(server.url)] == []
    severe = [
        entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
    ]
    assert severe == []  # script errors, CSP violations, failed loads


def test_the_page_works_from_the_keyboard_and_at_375_px(page: WebDriver, tmp_path: Path) -> None:
    reached = []
    for _ in range(8):
        ActionChains(page).send_keys(Keys.TAB).perform()
        reached.append(page.switch_to.active_element.get_attribute("id"))
    assert {"one", "many", "folder"} <= set(reached)
    for element_id in ("one", "many", "folder", "job-progress"):
        labels = page.find_elements(By.CSS_SELECTOR, f"label[for='{element_id}']")
        assert labels, element_id
        assert labels[0].text.strip()
    page.set_window_size(375, 800)
    inner = page.execute_script("return window.innerWidth")
    assert page.execute_script("return document.documentElement.scrollWidth") <= inner
    screenshot(page, tmp_path / "narrow.png")


@pytest.mark.anyio
async def test_web_dir_serves_another_page_and_refuses_a_folder_without_one(
    tmp_path: Path,
) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>embed</title>")
    (tmp_path / "embed.js").write_text("console.log('embed')")
    (tmp_path / ".hidden").write_text("not served")
    app = create_app(Settings(web_dir=tmp_path), exit_on_failure=False)
    # No lifespan: the page needs no model.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/")).text == "<!doctype html><title>embed</title>"
        script = await client.get("/web/embed.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert (await client.get("/web/.hidden")).status_code == 404
        assert (await client.get("/web/page.js")).status_code == 404  # not the shipped page
    (tmp_path / "index.html").unlink()
    with pytest.raises(ValueError, match=r"WEB_DIR=.* has no index\.html"):
        create_app(Settings(web_dir=tmp_path), exit_on_failure=False)


def test_the_page_is_static_files_the_server_holds(server: Server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # 'self' only
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("page.js", "page.css"):
        assert f"/web/{name}" in page.text
        asset = httpx.get(f"{server.url}/web/{name}")
        assert asset.status_code == 200
        assert not re.search(r"https?://", asset.text)  # nothing fetched from elsewhere
        etag = {"If-None-Match": asset.headers["etag"]}
        again = httpx.get(f"{server.url}/web/{name}", headers=etag)
        assert again.status_code == 304
    missing = httpx.get(f"{server.url}/web/..%2Fmain.py")
    assert missing.status_code == 404
    assert "detail" in missing.json()
    assert "/" not in httpx.get(server.url + "/openapi.json").json()["paths"]
