"""Image sizes as the API, the manifest and the command line spell them: "WxH", multiples of 8 (the VAE factor)."""

from __future__ import annotations

import re

SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(value: str) -> tuple[int, int]:
    """'WxH' -> (width, height); raises ValueError unless both are positive multiples of 8."""
    m = SIZE_RE.match(value.strip().lower())
    if not m:
        raise ValueError(f"size must look like 'WIDTHxHEIGHT', e.g. '64x64', got {value!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {value!r}")
    return width, height
