"""Reading images the same way everywhere (embed, search, explain), and the batched tensor pipeline
(`embed images --decode gpu`): JPEG bytes decoded by torchvision (nvJPEG on CUDA) and resized, cropped and
normalised as tensors on the device, equivalent to the PIL path (cosine >= 0.999, tests/test_scale.py)."""

from __future__ import annotations

from dataclasses import dataclass

JPEG_MAGIC = b"\xff\xd8\xff"
DRAFT_FACTOR = 2  # JPEG draft (DCT-scaled) decoding only while the image stays >= 2x the model's side


def load_rgb(path, draft_side: int | None = None, name: str | None = None):
    """Open an image (a path, or a file object named ``name`` in messages) as RGB. CMYK, palette,
    grayscale, 16-bit and alpha images are converted (alpha is composited on white, 16-bit is scaled down
    by its mode's range rather than clipped or stretched). Above PIL's pixel limit a warning names the
    file; above twice that (a decompression bomb), ValueError. With ``draft_side``, a JPEG whose shorter
    side is at least 2x ``draft_side`` is decoded at a reduced scale (``Image.draft``: 1/2, 1/4 or 1/8 in
    the DCT) that keeps the shorter side >= 2x ``draft_side``; the bicubic resize that follows sees as many
    pixels as it needs. ``TAR#MEMBER`` (a tar member, as `embed images` records them) is read from the
    tar. Raises on unreadable files."""
    import io
    import warnings

    import numpy as np
    from PIL import Image, ImageOps

    from vlmtools.wds import member_source, read_source, split_member_path

    member = split_member_path(path)
    if member is not None:
        name = name or str(path)
        path = io.BytesIO(read_source(member_source(*member)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{name or path}: image too large to decode safely ({exc})") from None
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        from vlmtools.console import warn

        w, h = img.size
        warn(f"{name or path}: a very large image ({w}x{h} = {w * h / 1e6:.0f} megapixels); decoding it takes much memory")
    with img:
        if draft_side and img.format == "JPEG" and min(img.size) >= DRAFT_FACTOR * draft_side:
            w, h = img.size
            scale = DRAFT_FACTOR * draft_side / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
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


def read_image(path, what: str = "image"):
    """load_rgb for a command that cannot go on without this image: a missing or unreadable file is
    BadInput (exit 2) naming it (``what``: how the message names it, e.g. "--image")."""
    from pathlib import Path

    from vlmtools.errors import BadInput
    from vlmtools.wds import split_member_path

    if not Path(path).is_file() and split_member_path(path) is None:
        raise BadInput(f"{what} {path}: no such file" if what != "image" else f"{path}: no such image file")
    try:
        return load_rgb(path)
    except Exception as exc:  # PIL raises many types for truncated or unknown files
        raise BadInput(f"{what} {path}: cannot read it as an image ({type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:160]})") from None


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def plain_jpeg(data: bytes) -> bool:
    """Whether the tensor pipeline decodes this JPEG as the PIL path would: RGB or greyscale, no EXIF
    rotation (nvJPEG ignores EXIF orientation and CMYK needs PIL's conversion). Reads the header only."""
    import io

    from PIL import Image

    if not is_jpeg(data):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1
    except Exception:  # let the decoder (and then PIL) say what is wrong with it
        return True


@dataclass(frozen=True)
class TensorPreprocess:
    """An open_clip eval transform (Resize(shorter side, bicubic, antialias) -> CenterCrop -> ToTensor ->
    Normalize) as parameters, applied to uint8 CHW tensors on any device."""

    resize: int | tuple[int, int]   # int: shorter side; (h, w): squash to that size
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, transform) -> "TensorPreprocess | None":
        """The parameters of a torchvision Compose, or None when it holds a step this pipeline cannot
        reproduce (then the PIL path is used)."""
        from torchvision import transforms as T

        resize = crop = mean = std = None
        for step in getattr(transform, "transforms", []):
            name = type(step).__name__
            if isinstance(step, T.Resize):
                if step.interpolation != T.InterpolationMode.BICUBIC or step.max_size is not None:
                    return None
                size = step.size
                resize = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
                resize = tuple(resize) if isinstance(resize, (list, tuple)) else int(resize)
            elif isinstance(step, T.CenterCrop):
                crop = tuple(int(s) for s in step.size)
            elif isinstance(step, T.Normalize):
                mean, std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
            elif name not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "function"):
                return None  # ResizeKeepRatio, CenterCropOrPad, ...: not reproduced here
        if resize is None or mean is None:
            return None
        if crop is None:
            crop = resize if isinstance(resize, tuple) else (resize, resize)
        return cls(resize, crop, mean, std)

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = (h, w) if h <= w else (w, h)
        if short == self.resize:
            return h, w
        new_short, new_long = self.resize, int(self.resize * long / short)  # torchvision's rule
        return (new_short, new_long) if h <= w else (new_long, new_short)

    def __call__(self, images):
        """uint8 (3, H, W) tensors (one device) -> one float (N, 3, crop_h, crop_w) batch. Images of the
        same size are resized together (one kernel per distinct size, not per image)."""
        import torch
        import torch.nn.functional as F

        device = images[0].device
        out = torch.empty((len(images), 3, *self.crop), dtype=torch.float32, device=device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape[-2:]), []).append(i)
        ch, cw = self.crop
        for (h, w), idx in groups.items():
            x = torch.stack([images[i] for i in idx]).float()
            nh, nw = self._resized_size(h, w)
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp_(0, 255).round_()  # PIL resizes to uint8
            if nh < ch or nw < cw:  # CenterCrop pads small images with zeros
                pad_h, pad_w = max(ch - nh, 0), max(cw - nw, 0)
                x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
                nh, nw = x.shape[-2:]
            top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
            out[idx] = x[:, :, top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255.0
        return out.sub_(mean).div_(std)


def decode_jpegs(datas, device: str):
    """JPEG byte tensors -> (uint8 RGB (3, H, W) tensors on ``device``, or None per failing file). One
    batched decode call (nvJPEG on CUDA); when it fails, files are decoded one by one so that one bad file
    costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except Exception:  # a corrupt file fails the whole batch: retry file by file
        out = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except Exception:
                out.append(None)
        return out


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
