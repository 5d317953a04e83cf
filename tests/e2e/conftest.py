"""End-to-end fixtures: a real headless Chromium (Debian's `chromium`) to open reports with."""

import shutil
import subprocess
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
