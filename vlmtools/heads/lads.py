"""LADS: Latent Augmentation using Domain descriptionS (Dunlap et al., ICLR 2023), the baseline of study 004,
as its authors' code has it: github.com/lisadunlap/LADS at 08e812e (configs/base.yaml, configs/CUB/lads.yaml,
methods/augmentations.py: ``Directional`` and its ``MLP``; methods/clip_transformations.py: ``Noop``,
``EmbeddingDataset``, ``ClipMLP``; clip_utils.py: ``zeroshot_classifier``, ``get_ensamble_preds``) and
main.py at 0cf64d6 for the ensemble. What each choice is and where it comes from (AUTHORS holds the numbers):

- inputs: L2-normalized image embeddings (METHOD.NORMALIZE); the backbone of their configs is OpenAI CLIP
  ViT-L/14 (EXP.CLIP_MODEL, not overridden for CUB): here, whatever model the store was embedded with.
- the domain direction of class c: normalize(normalize(T(target, c)) - normalize(T(source, c))), one text
  embedding per prompt (``Noop``); their CUB prompts are "a photo of a {} bird." -> "a painting of a {} bird.".
- the augmenter f_aug: Linear(d, 384), ReLU, Linear(384, d), PyTorch's default initialisation; its output
  is the augmented embedding itself, not a residual (augmentations.py ``MLP``, HIDDEN_DIM 384).
- its loss: alpha * L_dir + (1 - alpha) * L_cc, alpha = 0.5 (AUGMENTATION.ALPHA; DOM_WEIGHT 1), where
  L_dir = mean over the batch of 1 - cos(f_aug(x) - x, direction[y]) (``directional_loss_builder``) and
  L_cc = class-weighted cross-entropy of the unscaled cosines normalize(f_aug(x)) . T_cc (``get_class_logits``:
  no logit scale), T_cc the embeddings of "a photo of a {}" (hard-coded in ``Directional.__init__``);
  class weights w_c = min_c' n_c' / n_c (``EmbeddingDataset.get_counts``).
- its training: AdamW, lr 1e-3, weight decay 0.05, batch 256, 200 epochs (CUB's AUGMENTATION.MODEL and
  EPOCHS); the epoch with the lowest loss on the val rows is kept (``train_network``).
- the probe: one Linear layer (METHOD.MODEL.NUM_LAYERS 1) on the original + normalize(f_aug(x)) rows
  (INCLUDE_ORIG_TRAINING), class-weighted cross-entropy (DATA.UPWEIGHT_CLASSES), AdamW lr 1e-3, weight
  decay 0.05, batch 256, 400 epochs (CUB's METHOD.MODEL and EXP.EPOCHS); the first epoch with the best
  balanced accuracy on the val rows is kept (``ClipMLP.train_val_loop``); inputs normalized at prediction.
- the ensemble of their CUB config (EXP.ENSAMBLE; here ``--ensemble``, off by default): the mean of the
  probe's softmax and CLIP zero-shot's softmax(100 * cos) over class vectors averaged over the source and
  target prompts (``get_ensamble_preds``; main.py reports "ensamble test acc" from it).
Not followed: their AdamW is transformers' (eps 1e-6, decay applied after the step), ours torch's (eps
1e-8); their val loss is a mean of batch means, ours the mean over val rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

AUTHORS = {"hidden": 384, "alpha": 0.5, "aug_epochs": 200, "epochs": 400, "lr": 1e-3, "weight_decay": 0.05,
           "batch_size": 256, "cc_template": "a photo of a {}", "logit_scale": 1.0, "ensemble_scale": 100.0}


class AugNet(nn.Module):
    """f_aug: (n, d) -> (n, d), Linear(ReLU(Linear(x))): the augmented embedding (before normalization)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.dim, self.hidden = dim, hidden or AUTHORS["hidden"]
        self.fc1 = nn.Linear(dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """w_c = (1 / n_c) / max_c' (1 / n_c') = min count / n_c, for the classes that occur (others 0)."""
    counts = torch.bincount(y, minlength=n_classes).float()
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    return inv / inv.max()


def text_directions(source_emb: torch.Tensor, target_emb: torch.Tensor) -> torch.Tensor:
    """(C, d): per class, the unit vector from the source prompt's embedding to the target prompt's."""
    return F.normalize(F.normalize(target_emb, dim=1) - F.normalize(source_emb, dim=1), dim=1)


def directional_loss(x: torch.Tensor, aug: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """L_dir: mean of 1 - cos(aug - x, direction of the image's class); ``directions`` is (n, d)."""
    return (1 - F.cosine_similarity(aug - x, directions, dim=1)).mean()


def class_consistency(aug: torch.Tensor, y: torch.Tensor, cc_emb: torch.Tensor, weights: torch.Tensor | None = None,
                      logit_scale: float = AUTHORS["logit_scale"]) -> torch.Tensor:
    """L_cc: class-weighted cross-entropy of logit_scale * normalize(aug) . T_cc (the authors' scale: 1)."""
    return F.cross_entropy(logit_scale * F.normalize(aug, dim=1) @ cc_emb.T, y, weight=weights)


def lads_loss(net: AugNet, x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor, cc_emb: torch.Tensor,
              weights: torch.Tensor | None = None, *, alpha: float = AUTHORS["alpha"],
              logit_scale: float = AUTHORS["logit_scale"]) -> tuple[torch.Tensor, dict]:
    """alpha L_dir + (1 - alpha) L_cc on one batch; ``directions`` and ``cc_emb`` are (C, d) -> (loss, parts)."""
    aug = net(x)
    dr = directional_loss(x, aug, directions[y])
    cc = class_consistency(aug, y, cc_emb, weights, logit_scale)
    return alpha * dr + (1 - alpha) * cc, {"dir": dr.item(), "cc": cc.item()}


@torch.no_grad()
def augment(net: AugNet, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """The augmented (target-domain) embeddings of normalized images, L2-normalized (``augment_single``)."""
    net.eval()
    parts = [F.normalize(net(F.normalize(x[s:s + batch], dim=1)), dim=1) for s in range(0, x.shape[0], batch)]
    return torch.cat(parts) if parts else x.new_zeros((0, x.shape[1]))


def balanced_accuracy(model, x, y) -> float:
    """Mean over the classes present in ``y`` of their recall (the authors' val criterion)."""
    from vlmtools.heads.loop import batched_logits

    pred = batched_logits(getattr(model, "probe", model), x).argmax(1)  # a LADS head: its probe alone
    recalls = [float((pred[y == c] == c).float().mean()) for c in torch.unique(y).tolist()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


# ----------------------------------------------------------------------------- the head and `train lads`

from vlmtools.heads.augmented import AugmentedProbe  # noqa: E402
from vlmtools.heads.base import register  # noqa: E402


@register("lads")
class LadsHead(AugmentedProbe):
    """The LADS probe (``fc``, on normalized inputs) and the augmenter it was trained with (``aug``). With
    ``ensemble``, forward gives log of the mean of the probe's softmax and zero-shot CLIP's softmax(100 *
    cos) over the class vectors in the ``zeroshot`` buffer (so classify's softmax of it is that mean)."""

    augmenter = AugNet

    def __init__(self, input_dim: int, n_classes: int, hidden: int, ensemble: bool = False):
        super().__init__(input_dim=input_dim, n_classes=n_classes, hidden=hidden, ensemble=ensemble)
        if ensemble:
            self.register_buffer("zeroshot", torch.zeros(n_classes, input_dim))

    def probe(self, x):
        return self.fc(F.normalize(x, dim=1))

    def forward(self, x):
        logits = self.probe(x)
        if not self.config.get("ensemble"):
            return logits
        zs = AUTHORS["ensemble_scale"] * F.normalize(x, dim=1) @ self.zeroshot.T
        return torch.log((F.softmax(logits, dim=1) + F.softmax(zs, dim=1)) / 2)


def train_lads(store, output, *, options, where=(), val_where=(), val_fraction=None, model=None,
               pretrained=None, source: str = "a photo of a {}.", target: str = "a painting of a {}.",
               cc_template: str = AUTHORS["cc_template"], classes=None, text_store=None,
               alpha: float = AUTHORS["alpha"], aug_epochs: int = AUTHORS["aug_epochs"], hidden: int | None = None,
               logit_scale: float = AUTHORS["logit_scale"], ensemble: bool = False, shots: int | None = None,
               use_cache: bool = True) -> dict:
    """`vlmtools train lads`: f_aug on the train rows, the lowest-val-loss epoch kept (step 1), then the
    linear probe on the original + augmented rows (step 2). ``options`` is the probe's (``lads_options``
    gives the authors'); step 1 uses its lr, weight decay, batch size and seed."""
    from dataclasses import replace

    import numpy as np

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
    check_templates([cc_template], option="--cc-template")
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
    cc_emb = torch.from_numpy(A.class_text_embeddings(data.classes, [cc_template], data.spec, **opts))
    directions = text_directions(src, tgt)
    n_classes, d = len(data.classes), data.reader.dim
    hidden = hidden or AUTHORS["hidden"]
    x = F.normalize(torch.from_numpy(data.train.x), dim=1)
    y = torch.from_numpy(data.train.y)
    weights = class_weights(y, n_classes)
    with seeded(options.seed):
        net = AugNet(d, hidden)
    on = {}

    def loss(m, xb, yb):
        if xb.device not in on:
            on[xb.device] = tuple(t.to(xb.device) for t in (directions, cc_emb, weights))
        dr, cc, w = on[xb.device]
        return lads_loss(m, xb, yb, dr, cc, w, alpha=alpha, logit_scale=logit_scale)[0]

    val = None
    if data.val is not None:
        val = (F.normalize(torch.from_numpy(data.val.x), dim=1), torch.from_numpy(data.val.y))
    step1 = A.fit_augmenter(net, (x, y), loss, options, aug_epochs, "train lads: augmenter", val=val)
    net.cpu()
    extra_x = augment(net, x).numpy()
    with torch.no_grad():
        shift = F.cosine_similarity(net(x) - x, directions[y], dim=1)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    config = dict(input_dim=d, n_classes=n_classes, hidden=hidden, ensemble=ensemble)
    buffers = {}
    if ensemble:  # zeroshot_classifier over [source, target] per class: mean of unit vectors, renormalized
        buffers["zeroshot"] = F.normalize(F.normalize(src, dim=1) + F.normalize(tgt, dim=1), dim=1)
    probe_weights = class_weights(torch.from_numpy(np.concatenate([data.train.y, data.train.y])), n_classes)
    on_probe = {}

    def probe_loss(m, xb, yb):
        if xb.device not in on_probe:
            on_probe[xb.device] = probe_weights.to(xb.device)
        return F.cross_entropy(m.probe(xb), yb, weight=on_probe[xb.device])

    training = {"where": list(where), "val_where": list(val_where), "val_fraction": val_fraction,
                "source": source, "target": target, "cc_template": cc_template,
                "text_store": None if text_store is None else str(text_store), "alpha": alpha,
                "aug_epochs": aug_epochs, "aug_best_epoch": step1.best_epoch, "hidden": hidden,
                "logit_scale": logit_scale, "ensemble": ensemble, "shots": shots}
    # --solver lbfgs: one augmented row per image; the L2 prior counts images, as in LARE (ours)
    probe_opts = replace(options, l2=options.l2 * 2)
    training.update(l2=options.l2, probe_l2=probe_opts.l2)
    return A.fit_probe_with("lads", config, state, data, extra_x, data.train.y, output, probe_opts, training=training,
                            inputs=data.inputs(), buffers=buffers,
                            extra={"augmented_rows": len(extra_x),
                                   "shift_alignment_mean": round(float(shift.mean()), 4)},
                            description="train lads: probe", loss_fn=probe_loss,
                            metric_fn=balanced_accuracy, metric="balanced_acc", ties="first")


def lads_options(**overrides):
    """The authors' probe settings (AdamW, lr 1e-3, weight decay 0.05, batch 256, 400 epochs, the best val
    epoch kept, no early stop) as a FitOptions; ``overrides`` replace fields."""
    from vlmtools.heads.loop import FitOptions

    return FitOptions(**{"solver": "adamw", "epochs": AUTHORS["epochs"], "lr": AUTHORS["lr"],
                         "weight_decay": AUTHORS["weight_decay"], "batch_size": AUTHORS["batch_size"],
                         "patience": 0, **overrides})
