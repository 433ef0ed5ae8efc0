"""Reading images the same way everywhere (embed, search, explain)."""

from __future__ import annotations


def load_rgb(path: str):
    """Open an image as RGB. CMYK, palette, grayscale, 16-bit and alpha images are converted (alpha is
    composited on white, 16-bit is scaled down by its mode's range rather than clipped or stretched).
    Above PIL's pixel limit a warning names the file; above twice that (a decompression bomb), ValueError. Raises on unreadable files."""
    import numpy as np
    from PIL import Image

    from PIL import ImageOps

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{path}: image too large to decode safely ({exc})") from None
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        from vlmtools.console import warn

        w, h = img.size
        warn(f"{path}: a very large image ({w}x{h} = {w * h / 1e6:.0f} megapixels); decoding it takes much memory")
    with img:
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # The mode decides the scale, never the values: a dark 16-bit image stays dark. "I" is how
            # Pillow opens 16-bit PNG/TIFF greyscale; its full range is 0..65535 as well.
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr / 65535.0 * 255.0, 0, 255).astype(np.uint8), "L")
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            img = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255).astype(np.uint8), "L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img.convert("RGB")
