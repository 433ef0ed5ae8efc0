"""LARE: Latent Augmentation using Regional Embedding (study 004, seeds/004_*.txt).

Step 1 learns f_Box: R^d -> R^2d, a box (hyper-rectangle) [X-, X+] around every image embedding x.
Step 2 samples K points uniformly in each training box, labels them with the image's class, and fits a
linear probe on the original + sampled embeddings (the probe code of `train probe`).

f_Box here is a 2-layer network (Linear d->h, GELU, Linear h->2d) whose 2d outputs are read as a centre
offset and a raw half-width:   centre = x + out[:d],   half = softplus(out[d:]) + MIN_HALF,
X- = centre - half,  X+ = centre + half.  X- <= X+ holds by construction (every side is > 0).

Losses (the study's eq. 1-5), on a batch of n images with labels y and class text embeddings T (C, d):
  L_CC+ = CE(softmax(s * X+ . T), y),  L_CC- = the same at X-,  L_CC = the same at the midpoint (X+ + X-)/2
    (s = logit scale, CLIP's 100 by default: on unit vectors the raw dot products lie in [-1, 1], and a
    softmax over them is nearly flat);
  L_BV  = the box volume loss, one of VOLUME_LOSSES:
    "log-side" (default, bounded below by 0): mean over images and dimensions of softplus(log b - log side),
        b = box_size * (mean per-dimension std of the training embeddings). It rewards growing every side
        with a gradient that fades once a side exceeds b, so the class-consistency terms decide how far a box
        grows: the study's intent ("make each box large", eq. 1) with a loss that has a minimum.
    "literal": the study's eq. 1 as printed, mean over images of X+ . X- (= |centre|^2 - |half|^2). It is
        unbounded below: minimizing it grows the half-widths without limit (along directions that the class
        texts do not see), so for alpha < 1 it diverges; kept selectable to show that.
  L = (1 - alpha) L_BV + (alpha / 3) (L_CC+ + L_CC- + L_CC).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from vlmtools.errors import BadInput

VOLUME_LOSSES = ("log-side", "literal")
MIN_HALF = 1e-6          # every half-width is at least this: boxes never collapse to a point
DEFAULT_LOGIT_SCALE = 100.0


class BoxNet(nn.Module):
    """f_Box: (n, d) embeddings -> (X-, X+), each (n, d), with X- < X+ by construction."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.dim, self.hidden = dim, hidden or dim
        self.fc1 = nn.Linear(dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, 2 * dim)

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden}

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, half-width)."""
        out = self.fc2(F.gelu(self.fc1(x)))
        delta, width = out[:, :self.dim], out[:, self.dim:]
        return x + delta, F.softplus(width) + MIN_HALF

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre, half = self.raw(x)
        return centre - half, centre + half


def init_box_net(net: BoxNet, half_width: float) -> None:
    """Start with boxes centred on their images (offset 0) and every half-width = ``half_width``."""
    with torch.no_grad():
        nn.init.zeros_(net.fc2.weight)
        nn.init.zeros_(net.fc2.bias)
        # softplus(b) = h  <=>  b = log(expm1(h))
        h = max(float(half_width), 1e-4)
        net.fc2.bias[net.dim:] = math.log(math.expm1(h))
        # a small random second layer, so that the gradient reaches fc1
        net.fc2.weight.normal_(0.0, 1e-3)


def embedding_scale(x: torch.Tensor) -> float:
    """The mean per-dimension standard deviation of embeddings (n, d): the unit of box sides."""
    if x.shape[0] < 2:
        return float(x.abs().mean()) or 1.0
    return float(x.std(dim=0).mean()) or 1.0


def volume_loss(lo: torch.Tensor, hi: torch.Tensor, kind: str = "log-side", side: float = 1.0) -> torch.Tensor:
    """L_BV of boxes [lo, hi] (see the module doc). ``side``: the side length b of "log-side"."""
    if kind == "log-side":
        sides = (hi - lo).clamp_min(1e-12)
        return F.softplus(math.log(side) - torch.log(sides)).mean()
    if kind == "literal":
        return (hi * lo).sum(dim=1).mean()
    raise ValueError(f"volume loss {kind!r}: expected one of {', '.join(VOLUME_LOSSES)}")


def class_consistency(points: torch.Tensor, y: torch.Tensor, class_emb: torch.Tensor,
                      logit_scale: float = DEFAULT_LOGIT_SCALE) -> torch.Tensor:
    """CE(softmax(s * points . T), y), mean over the batch."""
    return F.cross_entropy(logit_scale * points @ class_emb.T, y)


def lare_loss(net: BoxNet, x: torch.Tensor, y: torch.Tensor, class_emb: torch.Tensor, *, alpha: float = 0.5,
              volume: str = "log-side", side: float = 1.0,
              logit_scale: float = DEFAULT_LOGIT_SCALE) -> tuple[torch.Tensor, dict]:
    """L = (1-alpha) L_BV + (alpha/3)(L_CC+ + L_CC- + L_CC) on one batch -> (loss, {part: value})."""
    lo, hi = net(x)
    bv = volume_loss(lo, hi, volume, side)
    cc_hi = class_consistency(hi, y, class_emb, logit_scale)
    cc_lo = class_consistency(lo, y, class_emb, logit_scale)
    cc_mid = class_consistency((lo + hi) / 2, y, class_emb, logit_scale)
    loss = (1 - alpha) * bv + (alpha / 3) * (cc_hi + cc_lo + cc_mid)
    parts = {"bv": bv.item(), "cc_plus": cc_hi.item(), "cc_minus": cc_lo.item(), "cc_mid": cc_mid.item()}
    return loss, parts


def sample_boxes(lo: torch.Tensor, hi: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K points drawn uniformly in each box: (n, d) corners -> (n * k, d), the k samples of box i at rows
    i*k .. i*k+k-1."""
    n, d = lo.shape
    if k <= 0 or n == 0:
        return lo.new_zeros((0, d))
    u = torch.rand((n, k, d), generator=generator, dtype=lo.dtype, device=lo.device)
    return (lo[:, None, :] + u * (hi - lo)[:, None, :]).reshape(n * k, d)


@torch.no_grad()
def box_stats(net: BoxNet, x: torch.Tensor, batch: int = 4096) -> dict:
    """Per image: log volume (sum of log side lengths), mean, min and max side; as float64 numpy arrays."""
    import numpy as np

    out = {"log_volume": [], "mean_side": [], "min_side": [], "max_side": []}
    net.eval()
    for start in range(0, x.shape[0], batch):
        lo, hi = net(x[start:start + batch])
        sides = (hi - lo).double()
        out["log_volume"].append(torch.log(sides).sum(dim=1))
        out["mean_side"].append(sides.mean(dim=1))
        out["min_side"].append(sides.min(dim=1).values)
        out["max_side"].append(sides.max(dim=1).values)
    return {k: (torch.cat(v).cpu().numpy() if v else np.zeros(0)) for k, v in out.items()}


# ----------------------------------------------------------------------------- the head and `train lare`

from vlmtools.heads.augmented import AugmentedProbe  # noqa: E402
from vlmtools.heads.base import register  # noqa: E402


@register("lare")
class LareHead(AugmentedProbe):
    """The LARE probe (``fc``) and the f_Box it sampled from (``aug``). forward = the probe."""

    augmenter = BoxNet

    def boxes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aug(x)


def train_lare(store, output, *, options, where=(), val_where=(), val_fraction=None, model=None,
               pretrained=None, templates: str | None = None, descriptors=None, classes=None, text_store=None,
               samples: int = 10, alpha: float = 0.5, volume: str = "log-side", box_size: float = 1.0,
               box_epochs: int = 20, hidden: int | None = None, logit_scale: float = DEFAULT_LOGIT_SCALE,
               shots: int | None = None, use_cache: bool = True) -> dict:
    """`vlmtools train lare`: f_Box on the train rows (step 1), K uniform samples per train box, then the
    linear probe on original + sampled rows (step 2). Every input is checked before training."""
    from vlmtools.classify import check_templates
    from vlmtools.heads import augmented as A
    from vlmtools.heads.data import load_train_val
    from vlmtools.heads.loop import seeded
    from vlmtools.prompts import load_templates

    options.check()
    A.check_common(samples, alpha, hidden, shots)
    if volume not in VOLUME_LOSSES:
        raise BadInput(f"--volume-loss {volume!r}: expected one of {', '.join(VOLUME_LOSSES)}")
    if not box_size > 0 or box_epochs < 1 or not logit_scale > 0:
        raise BadInput("--box-size and --logit-scale must be > 0, --box-epochs >= 1")
    A.check_output(output)
    if templates is not None and descriptors is not None:
        raise BadInput("--templates and --descriptors exclude each other: T is the class prompts or the "
                       "class descriptors")
    template_list = load_templates(templates or "photo")
    check_templates(template_list, templates or "photo")
    data = load_train_val(store, where=where, val_where=val_where, val_fraction=val_fraction, seed=options.seed,
                          model=model, pretrained=pretrained)
    A.check_class_list(classes, data)
    A.take_shots(data, shots, options.seed)
    texts = A.open_text_store(text_store, data.spec, data.reader.dim)
    if samples > 0:  # K = 0 needs no class texts (no model load)
        class_emb = torch.from_numpy(A.class_text_embeddings(
            data.classes, template_list, data.spec, descriptors=descriptors, text_store=texts,
            device=options.device, use_cache=use_cache, where=str(store)))
    d = data.reader.dim
    config = dict(input_dim=d, n_classes=len(data.classes), hidden=hidden or d)
    x = torch.from_numpy(data.train.x)
    side = box_size * embedding_scale(x)
    box_info = {}
    with seeded(options.seed):
        net = BoxNet(d, hidden or d)
        init_box_net(net, side / 2)
    if samples > 0:
        on = {}

        def loss(m, xb, yb):
            t = on.get(xb.device)
            if t is None:
                t = on[xb.device] = class_emb.to(xb.device)
            return lare_loss(m, xb, yb, t, alpha=alpha, volume=volume, side=side, logit_scale=logit_scale)[0]

        A.fit_augmenter(net, data, loss, options, box_epochs, "train lare: boxes")
        net.cpu().eval()
        with torch.no_grad():
            lo, hi = net(x)
            if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise BadInput(f"the boxes diverged (--volume-loss {volume}, --alpha {alpha}); use "
                                    f"--volume-loss log-side or a larger --alpha")
            gen = torch.Generator().manual_seed(options.seed)
            extra_x = F.normalize(sample_boxes(lo, hi, samples, gen), dim=1).numpy()
        extra_y = data.train.y.repeat(samples)
        stats = box_stats(net, x)
        box_info = {"box_log_volume_mean": round(float(stats["log_volume"].mean()), 4),
                    "box_mean_side": round(float(stats["mean_side"].mean()), 6)}
    else:  # K = 0: no boxes to sample from; the head is the plain probe (f_Box left at its initial weights)
        extra_x, extra_y = torch.zeros((0, d)).numpy(), data.train.y[:0]
    box_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    training = {"where": list(where), "val_where": list(val_where), "val_fraction": val_fraction,
                "templates": None if descriptors else templates or "photo",
                "descriptors": None if descriptors is None else str(descriptors),
                "text_store": None if text_store is None else str(text_store),
                "samples": samples, "alpha": alpha, "volume_loss": volume, "box_size": box_size,
                "box_side": side, "box_epochs": box_epochs, "logit_scale": logit_scale, "shots": shots}
    return A.fit_probe_with("lare", config, box_state, data, extra_x, extra_y, output, options,
                            training=training, inputs=data.inputs(),
                            extra={"samples": samples, "sampled_rows": len(extra_x), **box_info},
                            description="train lare: probe")
