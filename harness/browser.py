"""Headless Chromium through Debian's chromium and chromium-driver (`make services`
installs both), for the page's tests and its README screenshot."""

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver


def headless_chromium(chromium: str, chromedriver: str) -> WebDriver:
    """A headless Chromium that keeps its console log. Both paths are given, so Selenium
    Manager, which would download a driver, never runs."""
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # No sandbox: the tests run as root in CI; the page is our own, served on loopback.
    # No network either: every name but the loopback address fails to resolve, so that a
    # page which fetches from elsewhere (a CDN) fails here as it would offline.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(chromedriver))
