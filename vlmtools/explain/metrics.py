"""How good a saliency map is: IoU against an object mask, and RISE's causal insertion/deletion metrics.

- ``binarize(m, threshold)``: which pixels are salient. The default ``0.5`` is the ALA authors' rule
  (hiranohachiman/Attention-Lattice-Adapter, compute_miou.py and san/model/visualize.py): the map, scaled
  to [0, 1], is saved as an 8-bit grey image (``uint8(255·m)``, truncated) and a pixel is salient when its
  grey value exceeds 127 (OpenCV's THRESH_BINARY at 127). Any T in (0, 1) means grey > floor(255·T).
  ``"mean+std"``: value > the map's mean + one standard deviation (our earlier rule; no reference has it).
- ``iou``: |salient ∩ mask| / |salient ∪ mask|; 1.0 when both are empty (the authors' code divides by 0).
- ``gkern``, ``blur``, ``causal_curve``, ``auc``: RISE's ``CausalMetric`` (eclique/RISE, evaluation.py,
  and the blur of its Evaluation notebook). Insertion starts from the model input blurred by
  ``gkern(klen=11, nsig=5)`` with zero padding; deletion ends at zeros of the normalised input. ``step``
  pixels change per step in order of decreasing saliency, n_steps = ceil(H·W/step), the curve has
  n_steps + 1 scores (before any change ... all changed) at x = i/n_steps, and
  AUC = (Σ scores − first/2 − last/2)/n_steps.
"""

from __future__ import annotations

import math
from typing import Callable

MODES = ("insertion", "deletion")
DEFAULT_THRESHOLD = "0.5"
RISE_KERNEL = (11, 5.0)   # gkern(klen, nsig) of RISE's Evaluation notebook


def parse_threshold(text) -> str:
    """'mean+std' or a number T in (0, 1) (as text); anything else is ValueError."""
    t = str(text).strip().replace(" ", "")
    if t == "mean+std":
        return t
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"--threshold {text!r}: expected a number in (0, 1) (default 0.5: 8-bit grey > 127, "
                         f"the ALA authors' rule) or mean+std") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"--threshold {text!r}: expected a number in (0, 1) or mean+std")
    return repr(v)


def grey8(m):
    """A map in [0, 1] as the 8-bit grey image the ALA authors save: uint8(255·m), truncated."""
    import numpy as np

    return (np.clip(np.asarray(m, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def binarize(m, threshold: str = DEFAULT_THRESHOLD):
    import numpy as np

    m = np.asarray(m, dtype=np.float32)
    if threshold == "mean+std":
        return m > (m.mean() + m.std())
    return grey8(m) > math.floor(255 * float(threshold))


def iou(m, mask, threshold: str = DEFAULT_THRESHOLD) -> float:
    """IoU of the map's salient pixels (binarize) with a boolean mask of the same shape."""
    return region_iou(binarize(m, threshold), mask)


def region_iou(salient, mask) -> float:
    import numpy as np

    salient, mask = np.asarray(salient, dtype=bool), np.asarray(mask, dtype=bool)
    if salient.shape != mask.shape:
        raise ValueError(f"map {salient.shape} and mask {mask.shape} differ in size")
    union = np.logical_or(salient, mask).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(salient, mask).sum() / union)


def lattice_ceiling(mask, lattice: tuple[int, int]) -> float:
    """The best IoU with ``mask`` of any map that is constant on the cells of an h × w lattice (pixel
    (y, x) in cell (floor(y·h/H), floor(x·w/W)), as nearest upsampling draws it): the union of the k cells
    the mask covers most (by share), for the best k. Exact when the cells are of equal size (IoU grows with
    the covered area at a fixed size), the usual case; a map at that lattice cannot do better."""
    import numpy as np

    mask = np.asarray(mask, dtype=bool)
    H, W = mask.shape
    gh, gw = int(lattice[0]), int(lattice[1])
    cell = ((np.arange(H) * gh) // H)[:, None] * gw + ((np.arange(W) * gw) // W)[None, :]
    area = np.bincount(cell.ravel(), minlength=gh * gw).astype(np.float64)
    inside = np.bincount(cell[mask], minlength=gh * gw).astype(np.float64)
    total = float(mask.sum())
    if total == 0:
        return 1.0
    order = np.argsort(-(inside / np.maximum(area, 1)), kind="stable")
    cum_in, cum_area = np.cumsum(inside[order]), np.cumsum(area[order])
    return float(np.max(cum_in / (cum_area + total - cum_in)))


# ----------------------------------------------------------------------------- RISE's causal metric

def gkern(klen: int = 11, nsig: float = 5.0):
    """RISE's gkern: scipy's gaussian_filter (σ = nsig, mode 'reflect', truncated at 4σ) of a unit impulse
    in the middle of a klen × klen window, as (klen, klen) float32. With RISE's σ = 5 > the window, the
    reflected tails fold back in, so the kernel is nearly flat (taps differ by ~14 %), not a Gaussian cut
    to the window. Computed here without scipy: the impulse's reflections that fall within 4σ."""
    import numpy as np

    if klen < 1 or nsig <= 0:
        raise ValueError("gkern: klen >= 1 and nsig > 0")
    radius = int(4.0 * nsig + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * t ** 2 / nsig ** 2)
    w /= w.sum()
    centre = klen // 2
    k1 = np.zeros(klen)
    for i in range(klen):
        for j, wj in zip(t.astype(int), w):
            q = (i + j) % (2 * klen)               # scipy 'reflect' (d c b a | a b c d | d c b a)
            if (q if q < klen else 2 * klen - 1 - q) == centre:
                k1[i] += wj
    return np.outer(k1, k1).astype(np.float32)


def blur(x, kernel=None):
    """(B, 3, H, W) convolved channel by channel with ``kernel`` ((k, k), default RISE's gkern(11, 5)),
    zero padding k//2: RISE's insertion canvas."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    k = np.asarray(gkern(*RISE_KERNEL) if kernel is None else kernel, dtype=np.float32)
    kt = torch.from_numpy(k).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    return F.conv2d(x, kt[None, None].expand(c, 1, *k.shape), padding=k.shape[-1] // 2, groups=c)


def default_step(n_pixels: int) -> int:
    """RISE changes 224 pixels per step at 224 × 224: the same share of any image, rounded up."""
    return max(1, math.ceil(n_pixels / 224))


def salient_order(saliency):
    """Pixel indices in order of decreasing saliency: RISE's flip of an ascending argsort (stable here, so
    tied pixels come in reverse raster order; RISE's numpy default sort leaves their order unspecified)."""
    import numpy as np

    return np.flip(np.argsort(np.asarray(saliency, dtype=np.float32).reshape(-1), kind="stable")).copy()


def causal_curve(x, saliency, score_fn: Callable, mode: str, step: int | None = None, batch: int = 64,
                 canvas=None, kernel=None):
    """RISE's CausalMetric.single_run. x (1, 3, H, W) normalised model input; saliency (H, W) numpy;
    score_fn(images) -> (B,) the explained class's probability. Returns (xs, ys): x = i/n_steps and the
    score after i steps of ``step`` pixels (default ceil(H·W/224)), i = 0..n_steps. Insertion starts
    from ``canvas`` (default ``blur(x, kernel)``) and ends at x; deletion starts at x and ends at zeros."""
    import numpy as np
    import torch

    if mode not in MODES:
        raise ValueError(mode)
    H, W = x.shape[-2:]
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.shape != (H, W):
        raise ValueError(f"saliency {sal.shape} is not the input's size {(H, W)}")
    n = H * W
    step = default_step(n) if step is None else int(step)
    if step < 1:
        raise ValueError("step must be at least 1")
    n_steps = (n + step - 1) // step
    order = torch.from_numpy(salient_order(sal)).to(x.device)
    if mode == "insertion":
        start = canvas if canvas is not None else blur(x, kernel)
        finish = x
    else:
        start, finish = x, torch.zeros_like(x)
    start_flat, finish_flat = start.reshape(1, 3, -1), finish.reshape(1, 3, -1)
    counts = [min(i * step, n) for i in range(n_steps + 1)]
    ys = []
    with torch.no_grad():
        for b0 in range(0, len(counts), batch):
            chunk = counts[b0:b0 + batch]
            imgs = start_flat.repeat(len(chunk), 1, 1)
            for j, k in enumerate(chunk):
                idx = order[:k]
                imgs[j, :, idx] = finish_flat[0, :, idx]
            ys.append(score_fn(imgs.reshape(len(chunk), 3, H, W)).float().cpu())
    return np.arange(n_steps + 1, dtype=np.float64) / n_steps, torch.cat(ys).numpy().astype(np.float64)


def auc(scores) -> float:
    """RISE's auc: (Σ scores − first/2 − last/2)/(len − 1), the trapezoid at equal x steps over [0, 1]."""
    import numpy as np

    a = np.asarray(scores, dtype=np.float64)
    if a.size < 2:
        raise ValueError("auc needs at least two scores")
    return float((a.sum() - a[0] / 2 - a[-1] / 2) / (a.size - 1))
