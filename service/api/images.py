"""The image encodings the API answers with: workers store PNG; `output_format` jpeg or webp is re-encoded here (Pillow,
no torch), with `output_compression` as the quality in percent (OpenAI's default, 100, is the best quality)."""

from __future__ import annotations

import io

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(png: bytes, output_format: str, compression: int | None = None) -> bytes:
    """The stored PNG as `output_format` (png: unchanged)."""
    if output_format == "png":
        return png
    quality = 100 if compression is None else max(1, compression)
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    out = io.BytesIO()
    if output_format == "jpeg":
        rgb.save(out, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif output_format == "webp":
        rgb.save(out, format="WEBP", quality=quality, lossless=quality >= 100)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return out.getvalue()
