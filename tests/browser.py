"""Headless Chromium for the page tests: Debian's chromium driven by playwright.

Without Chromium a test is skipped, or fails where IMGCLF_REQUIRE_BROWSER is set (CI installs it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

# Nothing in a page test may reach the network: Chromium's own background traffic is off too.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@dataclass
class Browsed:
    """A page, and what it did: console errors and warnings, uncaught errors, and every URL it requested."""

    page: object
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("IMGCLF_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


@contextmanager
def chromium_page(width: int = 1200, height: int = 900) -> Iterator[Browsed]:
    """A fresh page in headless Chromium at a ``width`` x ``height`` viewport, recording what it does."""
    path = chromium_path()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            browsed = Browsed(page)
            page.on("console", lambda m: browsed.problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda err: browsed.problems.append(str(err)))
            page.on("request", lambda r: browsed.requests.append(r.url))
            yield browsed
        finally:
            browser.close()
