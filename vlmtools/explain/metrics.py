"""How good a saliency map is: IoU against an object mask, and RISE's causal insertion/deletion metrics.

- ``binarize``: the study's rule (its official code): a pixel is salient when its value exceeds the
  map's mean + one standard deviation.
- ``iou``: |salient ∩ mask| / |salient ∪ mask| (1.0 when both are empty); mIoU is its mean over images.
- ``causal_curve``: pixels in order of decreasing saliency (ties: raster order) are inserted into a
  blurred copy of the image (insertion; RISE's kernel, σ = 1 px, unless ``sigma`` says otherwise) or
  set to zero in the model's normalised input, i.e. the mean colour (deletion), in ``steps`` equal steps; the curve is the explained class's probability against
  the fraction of pixels changed, x in [0, 1]. ``auc`` is the trapezoidal area under it;
  ID score = insertion − deletion.
"""

from __future__ import annotations

from typing import Callable

MODES = ("insertion", "deletion")


def binarize(m):
    import numpy as np

    m = np.asarray(m, dtype=np.float32)
    return m > (m.mean() + m.std())


def iou(m, mask) -> float:
    """IoU of the map's salient pixels (binarize) with a boolean mask of the same shape."""
    import numpy as np

    salient = binarize(m)
    mask = np.asarray(mask, dtype=bool)
    if salient.shape != mask.shape:
        raise ValueError(f"map {salient.shape} and mask {mask.shape} differ in size")
    union = np.logical_or(salient, mask).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(salient, mask).sum() / union)


def auc(xs, ys) -> float:
    import numpy as np

    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def blur(x, sigma: float = 1.0, radius: int = 5):
    """Gaussian blur of (B, 3, H, W), the insertion canvas. The default is RISE's reference code's kernel
    (gkern(klen=11, nsig=5): 11 taps, σ = 1 px), at any image size."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return x.clone()
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def causal_curve(x, saliency, score_fn: Callable, mode: str, steps: int = 50, batch: int = 64,
                 canvas=None, sigma: float = 1.0):
    """x (1, 3, H, W) model input; saliency (H, W) numpy -> (xs, ys): fraction of pixels inserted or
    deleted, and score_fn (the explained class's probability) after each of ``steps`` steps."""
    import numpy as np
    import torch

    if mode not in MODES:
        raise ValueError(mode)
    H, W = x.shape[-2:]
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.shape != (H, W):
        raise ValueError(f"saliency {sal.shape} is not the input's size {(H, W)}")
    n = H * W
    order = torch.from_numpy(np.argsort(-sal.reshape(-1), kind="stable").copy()).to(x.device)
    counts = [int(round(i * n / steps)) for i in range(steps + 1)]
    if mode == "insertion":
        start = canvas if canvas is not None else blur(x, sigma, max(1, int(round(5 * sigma))))
        finish = x
    else:
        start, finish = x, torch.zeros_like(x)
    start_flat, finish_flat = start.reshape(1, 3, -1), finish.reshape(1, 3, -1)
    ys = []
    with torch.no_grad():
        for b0 in range(0, len(counts), batch):
            chunk = counts[b0:b0 + batch]
            imgs = start_flat.repeat(len(chunk), 1, 1)
            for j, k in enumerate(chunk):
                idx = order[:k]
                imgs[j, :, idx] = finish_flat[0, :, idx]
            ys.append(score_fn(imgs.reshape(len(chunk), 3, H, W)).float().cpu())
    return np.asarray(counts, dtype=np.float64) / n, torch.cat(ys).numpy().astype(np.float64)
