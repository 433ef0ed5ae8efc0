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


class TextSource:
    """What a t2i head reads for caption k of a pair set, fetched per batch so that memory is bounded by a
    batch, not by the caption count: pooled embeddings (mlp) read from the text store's memory-mapped
    shards, or token features (qformer) computed by the frozen text tower (COCO's ~590k captions as
    ViT-L-14 token features held at once would be ~65 GB)."""

    def __init__(self, texts, rows: list[int], uses_tokens: bool, encoder=None):
        import numpy as np

        self.rows = np.asarray(rows, dtype=np.int64)  # text-store row of each caption
        self.uses_tokens = uses_tokens
        if uses_tokens:
            strings = [texts.meta[r].get("text") for r in rows]
            if any(not isinstance(t, str) for t in strings):
                raise BadInput(f"{texts.path}: --arch qformer needs the texts (\"text\" in the store's rows)")
            self.strings, self.encoder = strings, encoder
            self.dim = int(encoder.text_token_features(strings[:1])[0].shape[-1])
        else:
            self.view, self.dim = texts.row_view(), texts.dim

    def __call__(self, idx, device) -> tuple:
        """The inputs of captions ``idx`` (a tensor or array of positions) on ``device``."""
        import numpy as np

        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)
        if self.uses_tokens:
            tokens, mask = self.encoder.text_token_features([self.strings[i] for i in idx])
            return tokens.to(device).float(), mask.to(device)
        return (torch.from_numpy(self.view.take(self.rows[idx])).to(device),)


class Pairs:
    """Caption/image pairs: caption k is text-store row ``source.rows[k]`` of image ``target[k]`` (a row of
    ``images``: the train images, then the val images). Captions of train images come first."""

    def __init__(self, source: TextSource, target, images, image_ids: list[str], n_train_images: int):
        import numpy as np

        self.source, self.target, self.images, self.image_ids = source, target, images, image_ids
        self.n_train_images = n_train_images
        self.n_train = int(np.searchsorted(target, n_train_images))  # captions of train images

    def __len__(self) -> int:
        return len(self.target)

    def arrays(self, split: str) -> tuple:
        """What fit batches for "train" or "val": (caption positions, their images' rows)."""
        import numpy as np

        span = slice(0, self.n_train) if split == "train" else slice(self.n_train, len(self))
        return (np.arange(len(self), dtype=np.int64)[span], self.target[span])

    def predict(self, head, positions, device: str, chunk: int = 1024):
        """Captions ``positions`` through ``head``, chunk by chunk: (N, d) on ``device``."""
        with torch.no_grad():
            out = [head(*self.source(positions[i:i + chunk], device)) for i in range(0, len(positions), chunk)]
        return torch.cat(out) if out else torch.zeros((0, self.images.shape[1]), device=device)

    def recall(self, head, positions, target, device: str, ks=(1, 5)) -> dict:
        """Recall@k of captions ``positions`` among the images they belong to (a split's images)."""
        cand, row = torch.unique(torch.as_tensor(target), return_inverse=True)
        pred = self.predict(head, positions, device).cpu().float()
        return recall_at(pred, torch.from_numpy(self.images)[cand], row, ks=ks)


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


def _pairs(images, texts, train_rows, val_rows, by_image, uses_tokens, encoder=None) -> Pairs:
    import numpy as np

    rows = list(train_rows) + list(val_rows)
    text_rows, target = [], []
    for j, i in enumerate(rows):
        for t in by_image[i]:
            text_rows.append(t)
            target.append(j)
    return Pairs(TextSource(texts, text_rows, uses_tokens, encoder), np.asarray(target, dtype=np.int64),
                 images.row_view(rows)[:], [str(images.meta[i]["id"]) for i in rows], len(train_rows))


def _fit_functions(pairs: Pairs, device: str, contrastive_weight: float):
    """loss_fn and metric_fn for loop.fit over Pairs.arrays(): a batch is (caption positions, image rows),
    its inputs fetched then. The metric is recall@1 among the images of the captions it is given (the val
    images for val; for train, those of the sampled train captions)."""
    images = torch.from_numpy(pairs.images).to(device)

    def loss(model, positions, target):
        return t2i_loss(model, *pairs.source(positions, device), images[target], target,
                        contrastive_weight=contrastive_weight)

    def metric(model, positions, target):
        return pairs.recall(model, positions, target.cpu(), device, ks=(1,))["r1"]

    return loss, metric


def train_t2i(text_store, output, *, images: str, options, arch: str = "mlp", where: Sequence[str] = (),
              val_where: Sequence[str] = (), val_fraction: float | None = None,
              contrastive_weight: float = CONTRASTIVE_WEIGHT, model: str | None = None,
              pretrained: str | None = None) -> dict:
    """`vlmtools train t2i`: returns the summary, with val recall@1/5 before and after translation."""
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
    pairs = _pairs(img, txt, train_rows, val_rows, by_image, uses_tokens, encoder)
    train_arrays, val_arrays = pairs.arrays("train"), pairs.arrays("val") if val_rows else None
    config = dict(input_dim=pairs.source.dim, output_dim=img.dim)
    retrieval = {}
    if val_arrays is not None:  # the raw text embeddings as the translation
        pooled = Pairs(TextSource(txt, pairs.source.rows.tolist(), False), pairs.target, pairs.images,
                       pairs.image_ids, len(train_rows))
        retrieval["before"] = pooled.recall(lambda x: F.normalize(x, dim=-1), *val_arrays, "cpu")
        retrieval.update(val_images=len(val_rows), val_texts=len(val_arrays[0]))
    loss, metric = _fit_functions(pairs, device, contrastive_weight)
    data = TrainData(img, spec, None, None)
    inputs = {"image_store": {"path": str(img.path), "sha": digest(pairs.images[:len(train_rows)],
                                                                   pairs.image_ids[:len(train_rows)]),
                              "rows": len(train_rows)},
              "text_store": {"path": str(txt.path), "sha": digest(txt.row_view(), [r.get("id") for r in txt.meta]),
                             "rows": len(train_arrays[0])}}

    def after(head) -> dict:
        if val_arrays is None:
            return {}
        return {"retrieval": {**retrieval, "after": pairs.recall(head, *val_arrays, device)}}

    summary = train_and_save(
        "t2i-qformer" if uses_tokens else "t2i-mlp", config, data, output, options, classes=None,
        training={"arch": arch, "images": str(images), "where": list(where), "val_where": list(val_where),
                  "val_fraction": val_fraction, "contrastive_weight": contrastive_weight,
                  "temperature": TEMPERATURE},
        inputs=inputs, train_arrays=train_arrays, val_arrays=val_arrays,
        description=f"train t2i ({arch})", loss_fn=loss, metric_fn=metric, metric="r1", extra_fn=after)
    if val_arrays is not None:
        b, a = summary["retrieval"]["before"], summary["retrieval"]["after"]
        info(f"val text->image recall@1 {100 * b['r1']:.1f}% -> {100 * a['r1']:.1f}%, recall@5 "
             f"{100 * b['r5']:.1f}% -> {100 * a['r5']:.1f}% ({len(val_rows)} images, {len(val_arrays[0])} texts)")
    return summary


def translate(head_path, strings: list[str], pooled, spec, device: str = "auto", chunk: int = 1024):
    """Texts through a t2i head: (N, d) float32 numpy, L2-normalized. ``pooled``: their text embeddings
    (for mlp); qformer heads encode the strings' token features with ``spec``'s text tower, ``chunk``
    texts at a time (memory bounded by a chunk, not by the number of texts)."""
    import numpy as np

    from vlmtools.heads.base import load_head
    from vlmtools.heads.predict import check_model
    from vlmtools.models import load_model, resolve_device

    device = resolve_device(device)
    head, hinfo = load_head(head_path, device)
    if not hinfo["kind"].startswith("t2i"):
        raise BadInput(f"--t2i {head_path}: a {hinfo['kind']} head, not a t2i head")
    check_model(hinfo, spec.as_dict(), head_path, "the text store")
    encoder = load_model(spec, device) if getattr(head, "uses_tokens", False) else None

    def inputs(i: int) -> tuple:
        if encoder is not None:
            tokens, mask = encoder.text_token_features(strings[i:i + chunk])
            return tokens.to(device).float(), mask.to(device)
        return (torch.from_numpy(np.ascontiguousarray(pooled[i:i + chunk], dtype=np.float32)).to(device),)

    out = []
    with torch.no_grad():
        for i in range(0, len(strings), chunk):
            x = inputs(i)
            if x[0].shape[-1] != hinfo["input_dim"]:
                raise BadInput(f"--t2i {head_path}: takes {hinfo['input_dim']}-d inputs, these texts give "
                               f"{x[0].shape[-1]}-d")
            out.append(head(*x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, hinfo["config"]["output_dim"]), np.float32)
