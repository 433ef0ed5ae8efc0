"""Saliency maps: Grad-CAM, attention rollout and RISE, on any differentiable image scorer.

The methods are plain functions of tensors so that they work on open_clip towers (through ``ClipTower``)
and on the small synthetic models the tests build:

- ``gradcam(x, score_fn, layer, to_grid)``: Grad-CAM (Selvaraju et al.) on the activations of ``layer``
  (``to_grid`` turns them into (B, C, h, w)); ``score_fn(x) -> (B,)`` is differentiable.
- ``rollout(attentions, prefix)``: attention rollout (Abnar & Zuidema) from head-averaged attention
  matrices (B, L, L), one per block; the class token's row over the patch tokens.
- ``rise(x, score_fn, masks, cell, p, seed, batch)``: RISE (Petsiuk et al.), N random masks evaluated
  ``batch`` at a time; ``batch=1`` is the per-mask loop (the benchmark compares the two).

Every map comes back as float32 (H, W) in [0, 1] at the input's resolution (min-max scaled; a constant
map is all zeros). torch is imported inside functions (``vlmtools --help`` stays fast).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from vlmtools.errors import BadInput

METHODS = ("gradcam", "rollout", "rise", "ala")


def unit_range(m):
    """Min-max scale a numpy map to [0, 1] (float32); a constant map becomes zeros."""
    import numpy as np

    m = np.asarray(m, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo <= 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def upsample(grid, size: tuple[int, int]):
    """(h, w) or (B, h, w) tensor -> same at ``size`` (bilinear), as a tensor."""
    import torch.nn.functional as F

    squeeze = grid.dim() == 2
    g = grid[None, None] if squeeze else grid[:, None]
    out = F.interpolate(g.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------- Grad-CAM

def gradcam(x, score_fn: Callable, layer, to_grid: Callable):
    """Grad-CAM of ``score_fn`` (summed over the batch) at ``layer``'s output; x (B, 3, H, W) ->
    list of B maps (H, W) in [0, 1]."""
    import torch

    acts: list = []

    def hook(_module, _inputs, output):
        output = output[0] if isinstance(output, tuple) else output
        output.retain_grad()
        acts.append(output)

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a graph even when the model's weights are frozen
            score = score_fn(x)
            if not acts:
                raise RuntimeError("Grad-CAM: the hooked layer did not run")
            score.sum().backward()
    finally:
        handle.remove()
    act = acts[-1]
    if act.grad is None:
        raise RuntimeError("Grad-CAM: the score does not depend on the hooked layer")
    a = to_grid(act.detach(), x.shape[0])
    g = to_grid(act.grad.detach(), x.shape[0])
    weights = g.mean(dim=(2, 3), keepdim=True)           # (B, C, 1, 1): pooled gradients
    cam = torch.relu((weights * a).sum(dim=1))           # (B, h, w)
    cam = upsample(cam, tuple(x.shape[-2:]))
    return [unit_range(c.cpu().numpy()) for c in cam]


# ----------------------------------------------------------------------------- attention rollout

def rollout(attentions: Sequence, prefix: int = 1, grid: tuple[int, int] | None = None,
            size: tuple[int, int] | None = None, residual: float = 0.5):
    """Attention rollout: A_hat = residual·I + (1-residual)·A per block (rows renormalised), multiplied
    from the first block to the last; the map is the first prefix token's row over the patch tokens.
    attentions: list of (B, L, L) head-averaged -> list of B maps at ``size`` (default: the grid)."""
    import torch

    joint = None
    for att in attentions:
        att = att.float()
        eye = torch.eye(att.shape[-1], device=att.device).expand_as(att)
        a = residual * eye + (1 - residual) * att
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    if joint is None:
        raise BadInput("attention rollout needs at least one attention block")
    cls_row = joint[:, 0, prefix:]                       # (B, N)
    n = cls_row.shape[-1]
    if grid is None:
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise RuntimeError(f"rollout: {n} patch tokens do not form a square grid")
        grid = (side, side)
    maps = cls_row.reshape(-1, *grid)
    if size is not None:
        maps = upsample(maps, size)
    return [unit_range(m.cpu().numpy()) for m in maps]


# ----------------------------------------------------------------------------- RISE

def check_rise(masks: int, cell: int, p: float, batch: int) -> None:
    if masks < 1:
        raise BadInput("--masks must be at least 1")
    if cell < 1:
        raise BadInput("--cell must be at least 1")
    if not 0.0 < p < 1.0:
        raise BadInput(f"--p {p}: expected a probability strictly between 0 and 1")
    if batch < 1:
        raise BadInput("--batch-size must be at least 1")


def rise_masks(n: int, cell: int, p: float, size: tuple[int, int], seed: int, device="cpu"):
    """RISE masks (n, H, W) float in [0, 1]: a cell×cell binary grid kept with probability p, upsampled
    bilinearly to (cell+1)·(H/cell) and cropped at a random shift (seeded: the same seed gives the
    same masks)."""
    import torch
    import torch.nn.functional as F

    H, W = size
    gen = torch.Generator().manual_seed(int(seed))
    grid = (torch.rand((n, 1, cell, cell), generator=gen) < p).float()
    ch, cw = math.ceil(H / cell), math.ceil(W / cell)
    up = F.interpolate(grid, size=((cell + 1) * ch, (cell + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(H)[None, :])                    # (n, H)
    cols = (dx[:, None] + torch.arange(W)[None, :])                    # (n, W)
    up = up[:, 0]
    masks = up[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return masks.to(device)


def rise(x, score_fn: Callable, masks: int = 4000, cell: int = 7, p: float = 0.5, seed: int = 0,
         batch: int = 64, mask_tensor=None):
    """RISE saliency of ``score_fn`` for one image x (1, 3, H, W): sum_i score(x·M_i)·M_i / (N·p).
    ``batch`` masked images go through the model at once; pass ``mask_tensor`` to reuse masks."""
    import torch

    check_rise(masks, cell, p, batch)
    H, W = x.shape[-2:]
    m = mask_tensor if mask_tensor is not None else rise_masks(masks, cell, p, (H, W), seed, x.device)
    sal = torch.zeros((H, W), device=x.device)
    with torch.no_grad():
        for start in range(0, m.shape[0], batch):
            mb = m[start:start + batch]
            scores = score_fn(x * mb[:, None])                # (b,)
            sal += (scores.float()[:, None, None] * mb).sum(dim=0)
    sal = sal / (m.shape[0] * p)
    return unit_range(sal.cpu().numpy())


# ----------------------------------------------------------------------------- open_clip towers

class ClipTower:
    """An open_clip image tower seen by the saliency methods: its kind (vit | resnet), the layer Grad-CAM
    hooks, the attention matrices rollout needs, and the (differentiable) normalised image embedding."""

    def __init__(self, model, cam_layer: int | None = None):
        """``cam_layer``: the block (ViT, 0-based) or stage (ResNet, 1-4) Grad-CAM hooks; default the last."""
        self.model = model
        self.visual = model.visual
        blocks = getattr(getattr(self.visual, "transformer", None), "resblocks", None)
        if blocks is not None:
            self.kind = "vit"
            self.blocks = list(blocks)
            self.batch_first = getattr(self.visual.transformer, "batch_first", True)
            n = len(self.blocks)
            if cam_layer is not None and not -n <= cam_layer < n:
                raise BadInput(f"--layer {cam_layer}: this ViT has blocks 0..{n - 1}")
            # The last block's output reaches the pooled embedding only through the class token, so its
            # patch tokens get no gradient; Grad-CAM hooks the block's attention input (ln_1) instead.
            self.cam_layer = self.blocks[-1 if cam_layer is None else cam_layer].ln_1
        elif hasattr(self.visual, "layer4"):
            self.kind = "resnet"
            self.blocks = []
            if cam_layer is not None and cam_layer not in (1, 2, 3, 4):
                raise BadInput(f"--layer {cam_layer}: a ResNet tower has stages 1..4")
            self.cam_layer = getattr(self.visual, f"layer{cam_layer or 4}")
        else:
            raise BadInput(f"{type(self.visual).__name__}: visual explanations support open_clip ViT and "
                           f"ModifiedResNet image towers only")

    def embed(self, x):
        import torch.nn.functional as F

        out = self.model.encode_image(x)
        if isinstance(out, tuple):
            out = out[0]
        return F.normalize(out.float(), dim=-1)

    def to_grid(self, act, batch: int):
        """A hooked activation -> (B, C, h, w)."""
        if self.kind == "resnet":
            return act
        if not self.batch_first or (act.shape[0] != batch and act.shape[1] == batch):
            act = act.transpose(0, 1)
        tokens = act[:, 1:]                                   # drop the class token
        side = int(round(math.sqrt(tokens.shape[1])))
        return tokens.reshape(batch, side, side, -1).permute(0, 3, 1, 2)

    def lattice(self, size: int, method: str) -> list[int] | None:
        """The cell grid [h, w] a method's maps are drawn at, before upsampling: the Grad-CAM layer's
        (found by one forward pass of a blank image), the ViT's token grid for rollout; None for others."""
        import torch

        if method == "rollout" and self.kind == "vit":
            return [int(v) for v in self.visual.grid_size]
        if method != "gradcam":
            return None
        acts: list = []
        handle = self.cam_layer.register_forward_hook(
            lambda _m, _i, out: acts.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                p = next(self.model.parameters())
                self.model.encode_image(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        finally:
            handle.remove()
        return [int(v) for v in self.to_grid(acts[-1], 1).shape[-2:]]

    def attentions(self, x):
        """Head-averaged attention (B, L, L) of every ViT block, recomputed from the block's ln_1 output
        and its attention weights (open_clip asks nn.MultiheadAttention for no weights)."""
        import torch

        if self.kind != "vit":
            raise BadInput("--method rollout needs a ViT image tower; this model's is a ResNet "
                           "(use gradcam or rise)")
        with torch.no_grad():
            return self._attentions(x)

    def _attentions(self, x):
        import torch

        inputs: list = []
        handles = [b.ln_1.register_forward_hook(lambda _m, _i, out: inputs.append(out)) for b in self.blocks]
        try:
            self.model.encode_image(x)
        finally:
            for h in handles:
                h.remove()
        out = []
        for block, h in zip(self.blocks, inputs):
            if not self.batch_first or (h.shape[0] != x.shape[0] and h.shape[1] == x.shape[0]):
                h = h.transpose(0, 1)
            attn = block.attn
            d = h.shape[-1]
            w, b = attn.in_proj_weight, attn.in_proj_bias
            q = h @ w[:d].T + (b[:d] if b is not None else 0)
            k = h @ w[d:2 * d].T + (b[d:2 * d] if b is not None else 0)
            heads = attn.num_heads
            B, L, _ = h.shape
            q = q.reshape(B, L, heads, -1).transpose(1, 2)
            k = k.reshape(B, L, heads, -1).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            out.append(a.mean(dim=1))
        return out
