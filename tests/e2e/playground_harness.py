"""Helpers of the playground's browser tests (a module of its own: `from conftest import ...` would resolve to
whichever conftest.py was imported last)."""

from __future__ import annotations

import os
from pathlib import Path

DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 400, "height": 800}


def screenshots_dir() -> Path | None:
    """Where to write the README's screenshots (SPO_PLAYGROUND_SCREENSHOTS, e.g. docs/playground), or None."""
    value = os.environ.get("SPO_PLAYGROUND_SCREENSHOTS")
    return Path(value).resolve() if value else None


def screenshot(page, name: str, out: Path) -> None:
    """A full-page PNG at desktop and at 400 px width (`name-desktop.png`, `name-400px.png`) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("400px", NARROW)):
        page.set_viewport_size(size)
        page.wait_for_timeout(100)  # one layout pass at the new width
        page.screenshot(path=str(out / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(DESKTOP)
