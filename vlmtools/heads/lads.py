"""LADS: Latent Augmentation using Domain descriptionS (Dunlap et al., ICLR 2023), the baseline of study 004.

An augmentation network f_aug: R^d -> R^d (2 layers, residual: f_aug(x) = x + MLP(x), starting at the
identity) is trained to move a source-domain image embedding x of class y to where the same image would
lie in the target domain, with two losses:
  L_DA (domain alignment): 1 - cos(f_aug(x) - x,  T(target, y) - T(source, y)), where T(source, y) and
        T(target, y) are the text embeddings of the class in the source and target prompts ("a photo of a
        {}" -> "a painting of a {}"): the image's shift follows the text's shift;
  L_CC (class consistency): CE(softmax(s * normalize(f_aug(x)) . T(target, .)), y): the augmented embedding
        must still be classified as y by the zero-shot classifier of the target prompts;
  L = alpha L_DA + (1 - alpha) L_CC.
Then the linear probe is fit on the original embeddings + normalize(f_aug(x)).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vlmtools.heads.lare import DEFAULT_LOGIT_SCALE, class_consistency


class AugNet(nn.Module):
    """f_aug: (n, d) -> (n, d), x + Linear(GELU(Linear(x)))."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.dim, self.hidden = dim, hidden or dim
        self.fc1 = nn.Linear(dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, dim)
        with torch.no_grad():  # start at the identity
            self.fc2.weight.normal_(0.0, 1e-3)
            nn.init.zeros_(self.fc2.bias)

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def domain_alignment(x: torch.Tensor, aug: torch.Tensor, text_shift: torch.Tensor) -> torch.Tensor:
    """1 - cos(aug - x, text_shift), mean over the batch; text_shift is (n, d), one row per image."""
    return (1 - F.cosine_similarity(aug - x, text_shift, dim=1, eps=1e-8)).mean()


def lads_loss(net: AugNet, x: torch.Tensor, y: torch.Tensor, source_emb: torch.Tensor, target_emb: torch.Tensor,
              *, alpha: float = 0.5, logit_scale: float = DEFAULT_LOGIT_SCALE) -> tuple[torch.Tensor, dict]:
    """alpha L_DA + (1-alpha) L_CC on one batch. source_emb/target_emb: (C, d) class text embeddings in the
    source and target prompts -> (loss, {part: value})."""
    aug = net(x)
    da = domain_alignment(x, aug, (target_emb - source_emb)[y])
    cc = class_consistency(F.normalize(aug, dim=1), y, target_emb, logit_scale)
    loss = alpha * da + (1 - alpha) * cc
    return loss, {"da": da.item(), "cc": cc.item()}


@torch.no_grad()
def augment(net: AugNet, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """The augmented (target-domain) embeddings, L2-normalized like stored embeddings."""
    net.eval()
    parts = [F.normalize(net(x[s:s + batch]), dim=1) for s in range(0, x.shape[0], batch)]
    return torch.cat(parts) if parts else x.new_zeros((0, x.shape[1]))


# ----------------------------------------------------------------------------- the head and `train lads`

from vlmtools.heads.augmented import AugmentedProbe  # noqa: E402
from vlmtools.heads.base import register  # noqa: E402


@register("lads")
class LadsHead(AugmentedProbe):
    """The LADS probe (``fc``) and the augmentation network it was trained with (``aug``)."""

    augmenter = AugNet


def train_lads(store, output, *, options, where=(), val_where=(), val_fraction=None, model=None,
               pretrained=None, source: str = "a photo of a {}.", target: str = "a painting of a {}.",
               classes=None, text_store=None, alpha: float = 0.5, aug_epochs: int = 20,
               hidden: int | None = None, logit_scale: float = DEFAULT_LOGIT_SCALE, shots: int | None = None,
               use_cache: bool = True) -> dict:
    """`vlmtools train lads`: f_aug on the train rows (step 1), then the linear probe on the original +
    augmented rows (step 2)."""
    from vlmtools.classify import check_templates
    from vlmtools.errors import BadInput
    from vlmtools.heads import augmented as A
    from vlmtools.heads.data import load_train_val
    from vlmtools.heads.loop import seeded

    options.check()
    A.check_common(None, alpha, hidden, shots)
    if aug_epochs < 1 or not logit_scale > 0:
        raise BadInput("--aug-epochs must be >= 1 and --logit-scale > 0")
    check_templates([source], option="--source")
    check_templates([target], option="--target")
    if source == target:
        raise BadInput("--source and --target are the same prompt: there is no domain shift to follow")
    A.check_output(output)
    data = load_train_val(store, where=where, val_where=val_where, val_fraction=val_fraction, seed=options.seed,
                          model=model, pretrained=pretrained)
    A.check_class_list(classes, data)
    A.take_shots(data, shots, options.seed)
    texts = A.open_text_store(text_store, data.spec, data.reader.dim)
    opts = dict(text_store=texts, device=options.device, use_cache=use_cache)
    src = torch.from_numpy(A.class_text_embeddings(data.classes, [source], data.spec, **opts))
    tgt = torch.from_numpy(A.class_text_embeddings(data.classes, [target], data.spec, **opts))
    d = data.reader.dim
    with seeded(options.seed):
        net = AugNet(d, hidden or d)
    on = {}

    def loss(m, xb, yb):
        if xb.device not in on:
            on[xb.device] = (src.to(xb.device), tgt.to(xb.device))
        s, t = on[xb.device]
        return lads_loss(m, xb, yb, s, t, alpha=alpha, logit_scale=logit_scale)[0]

    A.fit_augmenter(net, data, loss, options, aug_epochs, "train lads: augmenter")
    net.cpu()
    x = torch.from_numpy(data.train.x)
    extra_x = augment(net, x).numpy()
    with torch.no_grad():
        shift = F.cosine_similarity(net(x) - x, (tgt - src)[torch.from_numpy(data.train.y)], dim=1)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    training = {"where": list(where), "val_where": list(val_where), "val_fraction": val_fraction,
                "source": source, "target": target, "text_store": None if text_store is None else str(text_store),
                "alpha": alpha, "aug_epochs": aug_epochs, "logit_scale": logit_scale, "shots": shots}
    return A.fit_probe_with("lads", dict(input_dim=d, n_classes=len(data.classes), hidden=hidden or d), state,
                            data, extra_x, data.train.y, output, options, training=training,
                            inputs=data.inputs(),
                            extra={"augmented_rows": len(extra_x),
                                   "shift_alignment_mean": round(float(shift.mean()), 4)},
                            description="train lads: probe")
