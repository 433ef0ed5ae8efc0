"""Procedural rendering of one object on a habitat background, in numpy: image, exact mask.

Everything is drawn on a float RGB canvas in [0, 1] from a numpy Generator, so a seed fixes every pixel.
Shapes are inside-tests in the object's own coordinates (radius 1), so patterns rotate with the object.
"""

from __future__ import annotations

import numpy as np

COLOURS = {  # name -> RGB in [0, 1]; saturated, so they stand out from the muted habitats
    "red": (0.86, 0.10, 0.10),
    "orange": (0.98, 0.52, 0.05),
    "yellow": (0.98, 0.88, 0.12),
    "green": (0.10, 0.78, 0.22),
    "blue": (0.12, 0.30, 0.95),
    "purple": (0.55, 0.15, 0.78),
    "pink": (0.98, 0.48, 0.78),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent")
PATTERNS = ("solid", "striped", "dotted")
SIZES = ("small", "large")
HABITATS = ("grass", "water", "sand", "snow", "rock")
DOMAINS = ("photo", "painting")
PAINT_STYLES = ("posterized", "brush", "ink")

SIZE_RADIUS = {"small": 0.21, "large": 0.33}  # object radius as a fraction of the image side


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly interpolated value noise in [0, 1], ``cells`` cells across."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False)
    i = pos.astype(int)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur (edge-padded) of an (H, W, C) or (H, W) array."""
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="edge")
    h, w = img.shape[:2]
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


# ----------------------------------------------------------------------------- backgrounds

def background(rng: np.random.Generator, habitat: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    low = smooth_noise(rng, size, 4)
    fine = rng.random((size, size))
    if habitat == "grass":
        base = np.array([0.33, 0.52, 0.20])
        blades = np.repeat(rng.random((size // 6 + 1, size)), 6, axis=0)[:size]  # short vertical streaks
        shade = 0.75 + 0.35 * low[..., None] + 0.25 * (blades[..., None] - 0.5)
    elif habitat == "water":
        base = np.array([0.20, 0.42, 0.66])
        phase = rng.uniform(0, 2 * np.pi)
        waves = np.sin(yy * rng.uniform(28, 40) + phase + 1.5 * np.sin(xx * rng.uniform(6, 10)))
        shade = 0.85 + 0.2 * low[..., None] + 0.12 * (waves[..., None] > 0.75)
    elif habitat == "sand":
        base = np.array([0.86, 0.76, 0.54])
        ripples = np.sin((xx + yy) * rng.uniform(18, 26) + rng.uniform(0, 6))
        shade = 0.9 + 0.1 * low[..., None] + 0.05 * ripples[..., None] + 0.12 * (fine[..., None] - 0.5)
    elif habitat == "snow":
        base = np.array([0.93, 0.95, 0.98])
        shade = 0.9 + 0.08 * low[..., None] + 0.03 * (fine[..., None] - 0.5)
        shade = shade - np.array([0.08, 0.05, 0.0]) * (1 - low[..., None])  # bluish hollows
    elif habitat == "rock":
        base = np.array([0.50, 0.48, 0.46])
        blotch = smooth_noise(rng, size, 9)
        cracks = np.abs(smooth_noise(rng, size, 6) - 0.5) < 0.03
        shade = 0.7 + 0.5 * blotch[..., None] + 0.1 * (fine[..., None] - 0.5) - 0.35 * cracks[..., None]
    else:
        raise ValueError(f"unknown habitat {habitat!r}")
    return np.clip(base * shade, 0, 1)


# ----------------------------------------------------------------------------- objects

def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in object coordinates (u right, v up, radius 1)."""
    if shape == "circle":
        return u * u + v * v <= 0.92
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return (v >= -0.72) & (v <= 1.0 - 1.75 * np.abs(u))
    if shape == "star":
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(u, v)  # 0 points up
        t = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at a tip, 0 between tips
        return rho <= 0.42 + 0.6 * t ** 1.5
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "crescent":
        return (u * u + v * v <= 0.95) & ((u - 0.5) ** 2 + (v - 0.1) ** 2 > 0.62)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    """Where the object's second (pattern) colour shows."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "striped":
        return ((u + phase) % 0.5) < 0.22
    if pattern == "dotted":
        du = ((u + phase) % 0.52) - 0.26
        dv = ((v + phase) % 0.52) - 0.26
        return du * du + dv * dv < 0.11 ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def draw_object(rng: np.random.Generator, canvas: np.ndarray, attrs: dict,
                scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """Composite the object onto ``canvas`` (in place); return its exact mask and its geometry."""
    size = canvas.shape[0]
    radius = SIZE_RADIUS[attrs["size"]] * scale * size * rng.uniform(0.92, 1.08)
    margin = radius + 2
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(-0.3, 0.3)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = (xx - cx) / radius, (cy - yy) / radius  # v points up
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = shape_mask(attrs["shape"], u, v)
    # a dark outline one pixel wide keeps the silhouette readable on any background
    outline = _box_blur(inside.astype(float)) > 0.01
    colour = np.clip(np.array(COLOURS[attrs["colour"]]) + rng.normal(0, 0.04, 3), 0, 1)
    second = np.array([0.92, 0.92, 0.92]) if attrs["colour"] == "black" else colour * 0.3
    body = np.where(pattern_mask(attrs["pattern"], u, v, rng.uniform(0, 1))[..., None], second, colour)
    light = 1.0 + 0.12 * (v * 0.7 - u * 0.3)[..., None]  # soft directional shading on the body
    canvas[outline] = canvas[outline] * 0.25
    canvas[inside] = np.clip(body * light, 0, 1)[inside]
    geometry = {"x": round(float(cx) / size, 4), "y": round(float(cy) / size, 4),
                "radius": round(float(radius) / size, 4), "angle": round(float(angle), 4)}
    return outline, geometry


# ----------------------------------------------------------------------------- nuisances
# What makes a harder world's images harder without changing what they show: neutral clutter (pebbles and
# twigs in colours no class has), an occluding branch over part of the object, a smaller object, noise.
# None of them is named by a caption or a descriptor; the object's mask is what stays visible.

NEUTRALS = np.array([[0.45, 0.33, 0.22], [0.62, 0.52, 0.40], [0.55, 0.55, 0.52], [0.36, 0.30, 0.26],
                     [0.72, 0.68, 0.60]])  # browns, greys, beige: no class colour is near them
NUISANCES = ("scale", "clutter", "occlusion", "noise")


def draw_clutter(rng: np.random.Generator, canvas: np.ndarray, n: int) -> None:
    """``n`` pebbles (ellipses) or twigs (thin bars), each 5-12% of the side, in neutral colours."""
    size = canvas.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for _ in range(n):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.12) * size
        a = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / r
        v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / r
        inside = (u * u + (v / 0.6) ** 2 <= 1) if rng.random() < 0.6 else ((np.abs(u) <= 1.4) & (np.abs(v) <= 0.12))
        colour = np.clip(NEUTRALS[rng.integers(len(NEUTRALS))] + rng.normal(0, 0.03, 3), 0, 1)
        canvas[inside] = 0.8 * colour + 0.2 * canvas[inside]


def draw_occluder(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, fraction: float) -> np.ndarray:
    """A branch (a neutral bar across the image) in front of the object, placed to hide about ``fraction``
    of its pixels; returns the object's mask minus what the branch hides."""
    size = canvas.shape[0]
    ys, xs = np.nonzero(mask)
    if fraction <= 0 or len(ys) == 0:
        return mask
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    a = rng.uniform(0, np.pi)
    d = (xx - xs.mean()) * np.cos(a) + (yy - ys.mean()) * np.sin(a)    # signed distance across the bar
    dm = d[mask]
    width = max(2.0, rng.uniform(0.08, 0.16) * size)
    # slide the bar across the object and keep the offset whose hidden share is closest to the target
    offsets = np.linspace(dm.min() - width, dm.max(), 48)
    hidden = np.array([((dm >= o) & (dm < o + width)).mean() for o in offsets])
    best = offsets[np.argmin(np.abs(hidden - fraction) + 1e-3 * rng.random(len(offsets)))]
    bar = (d >= best) & (d < best + width)
    colour = np.clip(NEUTRALS[rng.integers(len(NEUTRALS))] + rng.normal(0, 0.03, 3), 0, 1)
    grain = 0.85 + 0.3 * smooth_noise(rng, size, 8)[..., None]
    canvas[bar] = np.clip(colour * grain, 0, 1)[bar]
    return mask & ~bar


def random_nuisance(rng: np.random.Generator) -> dict:
    """One training image's nuisances: each kind with probability 1/2 (at least one)."""
    kinds = [k for k in NUISANCES if rng.random() < 0.5] or [NUISANCES[rng.integers(len(NUISANCES))]]
    out = {}
    for kind in kinds:
        if kind == "scale":
            out["scale"] = float(rng.uniform(0.6, 1.0))
        elif kind == "clutter":
            out["clutter"] = int(rng.integers(1, 5))
        elif kind == "occlusion":
            out["occlusion"] = float(rng.uniform(0.1, 0.4))
        else:
            out["noise"] = float(rng.uniform(0.02, 0.08))
    return out


# ----------------------------------------------------------------------------- domains

def photo_finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    gx, gy = rng.normal(0, 0.12, 2)
    light = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5)  # uneven lighting
    img = 0.6 * img + 0.4 * _box_blur(img)  # a lens is never perfectly sharp
    return np.clip(img * light[..., None] + rng.normal(0, 0.025, img.shape), 0, 1)


def paint_finish(rng: np.random.Generator, img: np.ndarray, style: str) -> np.ndarray:
    size = img.shape[0]
    if style == "posterized":
        img = _box_blur(img)
        grey = img.mean(axis=2, keepdims=True)
        img = np.clip(grey + 1.4 * (img - grey), 0, 1)  # boost saturation, then flatten to few levels
        img = np.round(img * 3) / 3
    elif style == "brush":
        # smear along one random direction, then modulate with stroke-shaped streaks
        dy, dx = np.round(np.array([np.sin(a := rng.uniform(0, np.pi)), np.cos(a)]) * 1.0).astype(int)
        acc = np.zeros_like(img)
        for k in range(-2, 3):
            acc += np.roll(img, (k * dy, k * dx), axis=(0, 1))
        img = acc / 5
        streaks = np.repeat(rng.random((size, size // 4 + 1)), 4, axis=1)[:, :size]
        if abs(dy) > abs(dx):
            streaks = streaks.T
        img = img * (0.85 + 0.3 * streaks[..., None])
    elif style == "ink":
        flat = np.round(_box_blur(img) * 4) / 4
        lum = img.mean(axis=2)
        gx = np.abs(np.diff(lum, axis=1, append=lum[:, -1:]))
        gy = np.abs(np.diff(lum, axis=0, append=lum[-1:, :]))
        edges = (gx + gy) > 0.12
        paper = np.array([0.97, 0.94, 0.86])
        img = 0.55 * flat + 0.45 * paper
        img[edges] = 0.1
    else:
        raise ValueError(f"unknown paint style {style!r}")
    canvas_grain = 0.04 * (rng.random((size, size, 1)) - 0.5)
    return np.clip(img + canvas_grain, 0, 1)


def render(rng: np.random.Generator, attrs: dict, size: int = 64,
           nuisance: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """attrs (colour, shape, pattern, size, habitat, domain, style) -> (uint8 HxWx3, bool HxW mask, geometry).

    ``nuisance`` (optional): {"scale": radius factor, "clutter": pieces, "occlusion": share of the object
    hidden, "noise": extra pixel noise σ}; without it the generator is drawn exactly as before nuisances
    existed, so earlier worlds keep their bytes. The mask is the object's visible silhouette including its
    outline, before any domain stylization."""
    nuisance = nuisance or {}
    img = background(rng, attrs["habitat"], size)
    if nuisance.get("clutter"):
        draw_clutter(rng, img, int(nuisance["clutter"]))
    mask, geometry = draw_object(rng, img, attrs, float(nuisance.get("scale", 1.0)))
    if nuisance.get("occlusion"):
        visible = draw_occluder(rng, img, mask, float(nuisance["occlusion"]))
        geometry["occluded"] = round(1 - float(visible.sum()) / max(1, int(mask.sum())), 4)
        mask = visible
    if attrs["domain"] == "photo":
        img = photo_finish(rng, img)
    else:
        img = paint_finish(rng, img, attrs["style"])
    if nuisance.get("noise"):
        sigma = float(nuisance["noise"])
        blotches = smooth_noise(rng, size, 6)[..., None] - 0.5
        img = np.clip(img + rng.normal(0, sigma, img.shape) + 2 * sigma * blotches, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), mask, geometry


def photo_like(rng: np.random.Generator, w: int, h: int, shapes: int = 6):
    """A photo-like PIL image (smooth colour field, soft-edged shapes, mild sensor grain; not noise): what
    JPEG decoders and draft mode are checked and benchmarked on."""
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 20 + 1, w // 5 + 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(2))).astype(np.int16)
    arr += rng.normal(0, 4, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
