"""Headless Chromium for `sae-lens show --screenshot`, the browser test and the render benchmark.

Debian's `chromium` and `chromium-driver` packages are driven through Selenium with those executables: nothing
is downloaded, and the flags keep Chromium from reaching for a network it does not have.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "install Debian's browser and its driver (`apt-get install chromium chromium-driver`, run by `make setup` as "
    "root) and selenium (`pip install selenium`), or set SOFTSAE_CHROMIUM and SOFTSAE_CHROMEDRIVER to their paths"
)
# Without the background-networking flags, Chromium's start-up on a closed network waits on requests that never
# return; root needs --no-sandbox; a fresh profile keeps runs independent.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)
WINDOW = (1400, 1000)


def browser_paths() -> tuple[str | None, str | None]:
    """The Chromium and ChromeDriver executables: $SOFTSAE_CHROMIUM / $SOFTSAE_CHROMEDRIVER, else from PATH."""
    chromium = os.environ.get("SOFTSAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("SOFTSAE_CHROMEDRIVER") or shutil.which("chromedriver")
    return chromium, driver


def missing() -> str | None:
    """Why no browser can be started here (what is missing and how to install it), or None when one can."""
    chromium, driver = browser_paths()
    absent = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("selenium")
    return f"no {', '.join(absent)}: {INSTALL_HINT}" if absent else None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium driven by Selenium, window WINDOW, in a fresh profile removed afterwards."""
    reason = missing()
    if reason is not None:
        raise FileNotFoundError(f"sae-lens show: cannot start a browser, {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_paths()
    profile = tempfile.mkdtemp(prefix="softsae-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for flag in (*CHROMIUM_FLAGS, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_rendered(driver: Any, timeout: float = 60.0) -> float:
    """Wait until the page has drawn its text; return the milliseconds from navigation start it reports."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.renderMs"))
    return float(driver.execute_script("return document.body.dataset.renderMs"))


def hover(driver: Any, token: int, timeout: float = 10.0) -> None:
    """Move the mouse onto token `token` of the page's text (scrolled into view first), as a user would, and wait
    until the panel shows that token."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, f"t{token}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    ActionChains(driver).move_to_element(element).perform()
    wait_selected(driver, token, timeout)


def wait_selected(driver: Any, token: int, timeout: float = 10.0) -> None:
    """Wait until the panel shows token `token` (events reach the page's script after the page's own work)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.getElementById('panel').dataset.token") == str(token)
    )


def screenshot(page: str | Path, png: str | Path, token: int | None = None) -> Path:
    """Open `page` in headless Chromium, hover token `token` (default: the first row's highest-ranked token) so
    the panel shows its features, and save the window as the PNG `png`."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with chromium() as driver:
        driver.get(Path(page).resolve().as_uri())
        wait_rendered(driver)
        if token is None:
            token = driver.execute_script(
                "return JSON.parse(document.getElementById('data').textContent).rows[0].ranked.high[0]"
            )
        hover(driver, int(token))
        # Off the text onto the title (which scrolls the window back up): a pointer left over the text would select
        # whichever token the scroll brings under it.
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
        driver.execute_script("window.scrollTo(0, 0)")
        wait_selected(driver, int(token))
        driver.save_screenshot(str(png))
    return png
