"""End-to-end fixtures: a real headless Chromium (Debian's `chromium`) to open reports with, driven
by selenium through Debian's `chromedriver` (both by path: selenium's driver manager never runs),
and one tiny run whose report the tests open."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


class Chromium:
    """Headless Chromium on local files: screenshots and the DOM after scripts ran."""

    def __init__(self, binary: str):
        self.binary = binary

    def _run(self, *args, timeout: int = 180) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="attnprog-chromium-") as profile:
            return subprocess.run([self.binary, *FLAGS, f"--user-data-dir={profile}", *args],
                                  capture_output=True, text=True, timeout=timeout)

    def screenshot(self, page: Path, png: Path, width: int = 1200, height: int = 1600) -> Path:
        result = self._run(f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri())
        assert png.is_file(), f"chromium wrote no screenshot: {result.stderr[-2000:]}"
        return png

    def dump_dom(self, page: Path) -> str:
        """The serialised DOM once the page loaded and its scripts ran."""
        result = self._run("--dump-dom", "--virtual-time-budget=10000", page.resolve().as_uri())
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    """Debian's chromium (`make test` installs it); skips only where it is not installed."""
    binary = _find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed and `make test` could not install it "
                    "(apt-get install -y chromium needs root and a Debian mirror)")
    return Chromium(binary)


@pytest.fixture(scope="session")
def browser():
    """A selenium-driven headless Chromium (1200 x 1000) that logs every network request; skips only
    where chromium, its driver or selenium are not installed."""
    binary, driver = _find_chromium(), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium or chromedriver is not installed and `make test` could not install them "
                    "(apt-get install -y chromium chromium-driver needs root and a Debian mirror)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install "
                                    "-e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--window-size=1200,1000", *FLAGS[1:]):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    with tempfile.TemporaryDirectory(prefix="attnprog-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        try:
            yield session
        finally:
            session.quit()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`attnprog run` on the tiny model: (run directory, what it printed)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    result = subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", "run", "--out", str(out),
         "--model", "tiny-gpt2", "--limit", "30", "--max-tokens", "24", "--candidates", "100",
         "--fraction", "0.25", "--seed", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout
