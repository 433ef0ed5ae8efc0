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


def normalize_params(preprocess):
    """(mean, std) tensors (1, 3, 1, 1) of an open_clip preprocess transform (OpenAI's when it has none)."""
    import torch

    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


def square_tensor(image, size: int, mean, std):
    """A PIL image -> normalised (1, 3, size, size) float tensor, resized without cropping, so that a map
    computed on it lines up with the whole image (saliency maps, ALA features)."""
    import numpy as np
    import torch
    from PIL import Image

    img = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - mean.to(x.device)) / std.to(x.device)
