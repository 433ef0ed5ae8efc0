"""Text -> image translators (study 001, step 1): map a text to where its image's embedding would be, so
text can stand in for images when an adapter is trained (``train adapter --t2i HEAD``).

Trained on pairs: an image store and a text store whose rows carry the ``image_id`` of an image-store row
(e.g. `embed text captions.jsonl` with {"id", "image_id", "text"} rows).

- ``mlp`` (kind t2i-mlp): a residual 2-layer MLP on the pooled text embedding,
  ``normalize(x + W2 gelu(W1 x))``; W2 starts at zero, so before training it is the identity.
- ``qformer`` (kind t2i-qformer): a small Q-Former: learned query tokens that self-attend and cross-attend
  to the CLIP text tower's token features (models.Encoder.encode_text_tokens), mean-pooled and projected
  to the image embedding space, then normalized. Needs the model's text tower (to encode the tokens).

Loss, per batch of (text, image) pairs:
    L = (1 - cos(t2i(text), image)).mean() + CONTRASTIVE_WEIGHT * InfoNCE(text -> images of the batch)
with cosines divided by TEMPERATURE in InfoNCE, and every caption of the same image counted as a positive.
The val metric (early stopping) is text -> image recall@1 among the val images; the head file records
recall@1/5 before (the raw text embedding) and after translation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmtools.console import info
from vlmtools.errors import BadInput
from vlmtools.heads.base import Head, register

ARCHS = ("mlp", "qformer")
CONTRASTIVE_WEIGHT = 0.5
TEMPERATURE = 0.05


@register("t2i-mlp")
class MlpT2I(Head):
    uses_tokens = False

    def __init__(self, input_dim: int, output_dim: int, hidden: int = 0):
        hidden = hidden or 2 * input_dim
        super().__init__(input_dim=input_dim, output_dim=output_dim, hidden=hidden)
        self.skip = nn.Identity() if input_dim == output_dim else nn.Linear(input_dim, output_dim, bias=False)
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc2 = nn.Linear(hidden, output_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return F.normalize(self.skip(x) + self.fc2(F.gelu(self.fc1(x))), dim=-1)


@register("t2i-qformer")
class QFormerT2I(Head):
    uses_tokens = True

    def __init__(self, input_dim: int, output_dim: int, hidden: int = 128, queries: int = 8, heads: int = 4,
                 layers: int = 2):
        super().__init__(input_dim=input_dim, output_dim=output_dim, hidden=hidden, queries=queries,
                         heads=heads, layers=layers)
        self.query = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.proj_in = nn.Linear(input_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, output_dim)

    def forward(self, tokens, mask):
        memory = self.proj_in(tokens.float())
        q = self.query.unsqueeze(0).expand(len(tokens), -1, -1)
        pad = ~mask.bool()
        for block in self.blocks:
            q = block(q, memory, memory_key_padding_mask=pad)
        return F.normalize(self.proj_out(self.norm(q).mean(dim=1)), dim=-1)


def t2i_loss(model, *batch, contrastive_weight: float = CONTRASTIVE_WEIGHT, temperature: float = TEMPERATURE):
    """batch = (*text inputs, image embeddings, image index)."""
    *inputs, image, group = batch
    pred = model(*inputs)
    cos = (pred * image).sum(-1)
    loss = (1 - cos).mean()
    if contrastive_weight:
        logits = pred @ image.mT / temperature
        positive = group[:, None] == group[None, :]
        loss = loss + contrastive_weight * (torch.logsumexp(logits, 1)
                                            - torch.logsumexp(logits.masked_fill(~positive, -1e9), 1)).mean()
    return loss


def recall_at(pred, images, target, ks=(1, 5)) -> dict:
    """Text -> image recall@k: pred (N, d) texts, images (M, d) candidates, target (N,) the right row."""
    ranks = []
    for i in range(0, len(pred), 1024):  # bounds the (texts x images) similarity matrix
        sims = pred[i:i + 1024] @ images.mT
        ranks.append((sims > sims.gather(1, target[i:i + 1024, None])).sum(1))  # images above the right one
    rank = torch.cat(ranks) if ranks else torch.zeros(0)
    return {f"r{k}": round(float((rank < k).float().mean()), 6) for k in ks}


class Pairs:
    """Text/image pairs: text inputs (pooled embeddings, or token features + mask), the text's image
    (row into ``images``) and the candidate image embeddings."""

    def __init__(self, text_inputs: tuple, target, images, image_ids: list[str]):
        self.text_inputs, self.target, self.images, self.image_ids = text_inputs, target, images, image_ids

    def __len__(self) -> int:
        return len(self.target)

    def train_arrays(self) -> tuple:
        return (*self.text_inputs, self.images[self.target], self.target)

    def val_arrays(self) -> tuple:
        return (*self.text_inputs, self.target, self.images)


def recall_metric(model, *rows):
    """fit's metric_fn for t2i: recall@1 of (*text inputs, target, candidate images)."""
    *inputs, target, images = rows
    with torch.no_grad():
        pred = torch.cat([model(*(t[i:i + 4096] for t in inputs)) for i in range(0, len(target), 4096)])
    return recall_at(pred, images, target, ks=(1,))["r1"]


def load_pairs(image_store, text_store, *, where: Sequence[str] = (), val_where: Sequence[str] = (),
               val_fraction: float | None = None, seed: int = 0, model: str | None = None,
               pretrained: str | None = None):
    """(image reader, text reader, spec, train image rows, val image rows, text rows by image row)."""
    import numpy as np

    from vlmtools.heads.data import DEFAULT_VAL_FRACTION, check_val_options, open_store_for, select

    check_val_options(val_where, val_fraction)
    images, spec = open_store_for(image_store, "image", model, pretrained)
    texts, _ = open_store_for(text_store, "text", spec.name, spec.pretrained)
    if texts.dim != images.dim:
        raise BadInput(f"{text_store}: {texts.dim}-d embeddings, but image store {image_store} has {images.dim}-d")
    row_of = {str(rec.get("id")): i for i, rec in enumerate(images.meta)}
    by_image: dict[int, list[int]] = {}
    missing_key = 0
    for t, rec in enumerate(texts.meta):
        if rec.get("image_id") is None:
            missing_key += 1
            continue
        i = row_of.get(str(rec["image_id"]))
        if i is not None:
            by_image.setdefault(i, []).append(t)
    if not by_image:
        why = (f"no row has an \"image_id\"" if missing_key == len(texts.meta)
               else "no row's \"image_id\" is an id of the image store")
        raise BadInput(f"{text_store}: {why}; t2i trains on captions paired with images "
                       f"({{\"id\", \"image_id\", \"text\"}} rows, embedded with `vlmtools embed text`)")
    chosen = set(select(images, where))
    val_rows: list[int] = []
    if val_where:
        val_rows = [i for i in select(images, val_where) if i in by_image]
        chosen -= set(val_rows)
    train_rows = sorted(i for i in chosen if i in by_image)
    if not val_where:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        rng = np.random.default_rng(seed)
        n_val = int(fraction * len(train_rows) + 0.5)
        if n_val and n_val < len(train_rows):
            val_set = set(rng.permutation(train_rows)[:n_val].tolist())
            val_rows = sorted(val_set)
            train_rows = [i for i in train_rows if i not in val_set]
    if not train_rows:
        raise BadInput(f"{image_store}: no selected image has a caption in {text_store}")
    return images, texts, spec, train_rows, sorted(val_rows), by_image


def text_inputs(kind_tokens: bool, texts, rows: list[int], spec, device: str, *, encoder=None):
    """What a t2i head reads for these text-store rows: pooled embeddings, or (token features, mask)."""
    import numpy as np

    if not kind_tokens:
        return (texts.embeddings[np.asarray(rows, dtype=np.int64)],)
    strings = [texts.meta[r].get("text") for r in rows]
    if any(not isinstance(s, str) for s in strings):
        raise BadInput(f"{texts.path}: --arch qformer needs the texts (\"text\" in the store's rows)")
    return token_features(strings, spec, device, encoder=encoder)


def token_features(strings: list[str], spec, device: str, *, encoder=None):
    from vlmtools.console import progress
    from vlmtools.models import load_model

    encoder = encoder or load_model(spec, device)
    with progress("text tokens", total=1, unit="sets") as bar:
        tokens, mask = encoder.encode_text_tokens(strings)
        bar.advance(1)
    return tokens, mask


def _pairs(images, texts, rows, by_image, spec, device, uses_tokens, encoder=None) -> Pairs:
    import numpy as np

    text_rows, target = [], []
    for j, i in enumerate(rows):
        for t in by_image[i]:
            text_rows.append(t)
            target.append(j)
    inputs = text_inputs(uses_tokens, texts, text_rows, spec, device, encoder=encoder)
    emb = images.embeddings[np.asarray(rows, dtype=np.int64)]
    return Pairs(inputs, np.asarray(target, dtype=np.int64), emb, [str(images.meta[i]["id"]) for i in rows])


def train_t2i(text_store, output, *, images: str, options, arch: str = "mlp", where: Sequence[str] = (),
              val_where: Sequence[str] = (), val_fraction: float | None = None,
              contrastive_weight: float = CONTRASTIVE_WEIGHT, model: str | None = None,
              pretrained: str | None = None) -> dict:
    """`vlmtools train t2i`: returns the summary, with val recall@1/5 before and after translation."""
    import numpy as np

    from vlmtools.heads.base import train_and_save
    from vlmtools.heads.data import TrainData, digest
    from vlmtools.models import load_model, resolve_device

    if arch not in ARCHS:
        raise BadInput(f"--arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if contrastive_weight < 0:
        raise BadInput(f"--contrastive-weight {contrastive_weight}: expected >= 0")
    options.check()
    img, txt, spec, train_rows, val_rows, by_image = load_pairs(
        images, text_store, where=where, val_where=val_where, val_fraction=val_fraction, seed=options.seed,
        model=model, pretrained=pretrained)
    device = resolve_device(options.device)
    uses_tokens = arch == "qformer"
    encoder = load_model(spec, device) if uses_tokens else None
    train = _pairs(img, txt, train_rows, by_image, spec, device, uses_tokens, encoder)
    val = _pairs(img, txt, val_rows, by_image, spec, device, uses_tokens, encoder) if val_rows else None
    if uses_tokens:
        kind, config = "t2i-qformer", dict(input_dim=int(train.text_inputs[0].shape[-1]), output_dim=img.dim)
    else:
        kind, config = "t2i-mlp", dict(input_dim=txt.dim, output_dim=img.dim)
    retrieval = {}
    if val is not None:
        before_pred = torch.from_numpy(np.ascontiguousarray(_pooled(txt, val_rows, by_image)))
        retrieval["before"] = recall_at(F.normalize(before_pred, dim=-1), torch.from_numpy(val.images),
                                        torch.from_numpy(val.target))
        retrieval.update(val_images=len(val_rows), val_texts=len(val))

    def loss(m, *batch):
        return t2i_loss(m, *batch, contrastive_weight=contrastive_weight)

    data = TrainData(img, spec, None, None)
    inputs = {"image_store": {"path": str(img.path), "sha": digest(train.images, train.image_ids),
                              "rows": len(train_rows)},
              "text_store": {"path": str(txt.path), "sha": digest(txt.embeddings, [r.get("id") for r in txt.meta]),
                             "rows": len(train)}}
    summary = train_and_save(
        kind, config, data, output, options, classes=None,
        training={"arch": arch, "images": str(images), "where": list(where), "val_where": list(val_where),
                  "val_fraction": val_fraction, "contrastive_weight": contrastive_weight,
                  "temperature": TEMPERATURE},
        inputs=inputs, train_arrays=train.train_arrays(), val_arrays=val.val_arrays() if val else None,
        train_eval=train.val_arrays(),
        description=f"train t2i ({arch})", loss_fn=loss, metric_fn=recall_metric, metric="r1",
        extra_fn=lambda head: _after(head, val, retrieval, device))
    if val is not None:
        b, a = summary["retrieval"]["before"], summary["retrieval"]["after"]
        info(f"val text->image recall@1 {100 * b['r1']:.1f}% -> {100 * a['r1']:.1f}%, recall@5 "
             f"{100 * b['r5']:.1f}% -> {100 * a['r5']:.1f}% ({len(val_rows)} images, {len(val)} texts)")
    return summary


def _pooled(txt, rows, by_image):
    import numpy as np

    return txt.embeddings[np.asarray([t for i in rows for t in by_image[i]], dtype=np.int64)]


def _after(head, val, retrieval: dict, device: str) -> dict:
    if val is None:
        return {}
    from vlmtools.heads.loop import to_tensors

    inputs = to_tensors(val.text_inputs, device)
    with torch.no_grad():
        pred = torch.cat([head(*(t[i:i + 4096] for t in inputs)) for i in range(0, len(val), 4096)]).cpu()
    after = recall_at(pred, torch.from_numpy(val.images), torch.from_numpy(val.target))
    return {"retrieval": {**retrieval, "after": after}}


def translate(head_path, strings: list[str], pooled, spec, device: str = "auto"):
    """Texts through a t2i head: (N, d) float32 numpy, L2-normalized. ``pooled``: their text embeddings
    (for mlp); qformer heads encode the strings' token features with ``spec``'s text tower."""
    import numpy as np

    from vlmtools.heads.base import load_head
    from vlmtools.heads.loop import to_tensors
    from vlmtools.heads.predict import check_model
    from vlmtools.models import resolve_device

    device = resolve_device(device)
    head, hinfo = load_head(head_path, device)
    if not hinfo["kind"].startswith("t2i"):
        raise BadInput(f"--t2i {head_path}: a {hinfo['kind']} head, not a t2i head")
    check_model(hinfo, spec.as_dict(), head_path, "the text store")
    inputs = (token_features(strings, spec, device) if getattr(head, "uses_tokens", False)
              else (np.asarray(pooled, dtype=np.float32),))
    if inputs[0].shape[-1] != hinfo["input_dim"]:
        raise BadInput(f"--t2i {head_path}: takes {hinfo['input_dim']}-d inputs, these texts give "
                       f"{inputs[0].shape[-1]}-d")
    tensors = to_tensors(inputs, device)
    with torch.no_grad():
        out = [head(*(t[i:i + 4096] for t in tensors)).float().cpu() for i in range(0, len(strings), 4096)]
    return torch.cat(out).numpy() if out else np.zeros((0, hinfo["config"]["output_dim"]), np.float32)
