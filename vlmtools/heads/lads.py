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
