"""The Attention Lattice Adapter (study 003, ALA) on a frozen open_clip image tower.

- Side Branch Network (SBN): one transformer layer per tower layer, over every layer of the tower by
  default (a lattice over all layers: no layer is picked by hand, as the study asks). Layer i adds the
  i-th tower layer's feature map (1x1-projected to ``d_model``, at a ``grid`` × ``grid`` lattice: by
  default the tower's own token grid, e.g. 7 × 7 for ViT-B/32 at 224 px) to the running tokens, then
  attends.
- Attention Branch (AB): per-class response maps from the SBN tokens; their mean over the lattice is the
  AB's class scores, and a sigmoid of a linear mix of them is the attention map α′ (grid × grid).
- Perception Branch (PB): the tower's last feature map (resampled to the lattice), pooled with α′ as
  weights (Σ α′·f / Σ α′), LayerNorm, linear classifier.
- Loss CE(PB) + λ·CE(AB). Alternative Epoch Architect (AEA): on even epochs SBN and AB are frozen and
  produce no attention (the PB pools the plain features and the loss is CE(PB) alone).

Training never reruns CLIP per epoch: ``cache_features`` writes the tower's intermediate features of every
manifest image once, as a store (vlmtools.store.StoreWriter: sharded, atomic, resumable; kind
"features", one flattened float16 row per image), and the head is fitted on those rows by the one loop
(heads.loop.fit, with ALA's loss and an AEA epoch hook). The head's input is that flattened row; ``shapes``
in its config splits it back into feature maps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmtools.errors import BadInput
from vlmtools.heads.base import Head, register

# ----------------------------------------------------------------------------- the tower's layers

def tower_layers(visual) -> int:
    """How many feature layers ``forward_intermediates`` offers: ViT blocks, or ResNet stem + 4 stages."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is not None:
        return len(blocks)
    if hasattr(visual, "layer4"):
        return 5
    raise BadInput(f"{type(visual).__name__}: ALA supports open_clip ViT and ModifiedResNet towers only")


def choose_layers(n: int, layers: Sequence[int] | None) -> list[int]:
    """The layers the SBN reads: every layer of the tower, or ``layers`` (checked; not the study's
    protocol); the last layer is always included (the PB classifies its features)."""
    if layers:
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise BadInput(f"--layers {bad[0]}: the tower has layers 0..{n - 1}")
        chosen = sorted({i % n for i in layers})
    else:
        chosen = list(range(n))
    if chosen[-1] != n - 1:
        chosen.append(n - 1)
    return chosen


def tower_features(visual, x, layers: Sequence[int]) -> list:
    """Feature maps (B, C, h, w) of the chosen layers (ViT patch tokens as a grid)."""
    out = visual.forward_intermediates(x, indices=list(layers), intermediates_only=True, output_fmt="NCHW")
    return list(out["image_intermediates"])


# ----------------------------------------------------------------------------- the head

@register("ala")
class AlaHead(Head):
    def __init__(self, input_dim: int, n_classes: int, shapes: list, layers: list, d_model: int = 64,
                 heads: int = 4, grid: int = 8, lam: float = 1.0, aea: bool = True):
        super().__init__(input_dim=input_dim, n_classes=n_classes, shapes=[list(s) for s in shapes],
                         layers=list(layers), d_model=d_model, heads=heads, grid=grid, lam=lam, aea=aea)
        if sum(c * h * w for c, h, w in shapes) != input_dim:
            raise BadInput(f"ALA config: shapes {shapes} do not add up to input_dim {input_dim}")
        self.sizes = [c * h * w for c, h, w in shapes]
        self.grid = grid
        self.proj = nn.ModuleList(nn.Conv2d(c, d_model, 1) for c, _, _ in shapes)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, d_model) * 0.02)
        self.sbn = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                       batch_first=True, norm_first=True) for _ in shapes)
        self.ab_cls = nn.Linear(d_model, n_classes)
        self.ab_att = nn.Linear(n_classes, 1)
        c_last = shapes[-1][0]
        self.pb_norm = nn.LayerNorm(c_last)
        self.pb = nn.Linear(c_last, n_classes)
        self.attention_off = False  # AEA: set on the epochs where SBN and AB are frozen

    def side_parameters(self):
        """SBN and AB: what AEA freezes on every other epoch."""
        mods = [self.proj, self.sbn, self.ab_cls, self.ab_att]
        return [self.pos] + [p for m in mods for p in m.parameters()]

    def split(self, x) -> list:
        out, start = [], 0
        for (c, h, w), size in zip(self.config["shapes"], self.sizes):
            out.append(x[:, start:start + size].reshape(-1, c, h, w).float())
            start += size
        return out

    def attention(self, feats) -> tuple:
        """(α′ (B, grid, grid) in (0, 1), AB class scores (B, K)) from the chosen layers' feature maps."""
        h = None
        for f, proj, layer in zip(feats, self.proj, self.sbn):
            t = F.adaptive_avg_pool2d(proj(f.float()), self.grid).flatten(2).transpose(1, 2)
            h = t + self.pos if h is None else h + t
            h = layer(h)
        maps = self.ab_cls(h)                                   # (B, G*G, K)
        alpha = torch.sigmoid(self.ab_att(maps)).view(-1, self.grid, self.grid)
        return alpha, maps.mean(dim=1)

    def perceive(self, last, alpha=None):
        """PB class scores from the last layer's features, pooled with α′ (plain mean without)."""
        f = F.interpolate(last.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        f = f.flatten(2)                                        # (B, C, G*G)
        if alpha is None:
            pooled = f.mean(dim=2)
        else:
            a = alpha.flatten(1)[:, None]                       # (B, 1, G*G)
            pooled = (f * a).sum(dim=2) / (a.sum(dim=2) + 1e-6)
        return self.pb(self.pb_norm(pooled))

    def forward(self, x):
        return self.classify(self.split(x))

    def classify(self, feats):
        """PB class scores (logits) of the tower layers' feature maps, attention on."""
        alpha, _ = self.attention(feats)
        return self.perceive(feats[-1], alpha)


def ala_loss(model: AlaHead, x, y):
    """CE(PB) + λ·CE(AB); on AEA's frozen epochs CE(PB) on un-attended features alone."""
    feats = model.split(x)
    if model.attention_off:
        return F.cross_entropy(model.perceive(feats[-1], None), y)
    alpha, ab_logits = model.attention(feats)
    return F.cross_entropy(model.perceive(feats[-1], alpha), y) + model.config["lam"] * F.cross_entropy(ab_logits, y)


def aea_hook(epoch: int, model: AlaHead) -> dict:
    """The Alternative Epoch Architect: even epochs freeze SBN and AB and switch the attention off."""
    off = bool(model.config["aea"]) and epoch % 2 == 0
    model.attention_off = off
    for p in model.side_parameters():
        p.requires_grad_(not off)
    return {"side": "frozen" if off else "trained"}


# ----------------------------------------------------------------------------- feature cache

def token_grid(shapes: Sequence[Sequence[int]]) -> int:
    """The side of the lattice: the tower's own token grid (a ViT's layers share it: 7 for B/32 at 224,
    14 for B/16, 16 for L/14, 24 for L/14 at 336); a ResNet's finest stage."""
    return max(h for _, h, _ in shapes)


def feature_shapes(visual, size: int, layers: Sequence[int], device) -> list[list[int]]:
    with torch.no_grad():
        feats = tower_features(visual, torch.zeros(1, 3, size, size, device=device), layers)
    return [list(f.shape[1:]) for f in feats]


def cache_features(records: list[dict], cache_dir, encoder, layers: list[int], *, shard_size: int = 256,
                   batch: int = 32):
    """Write (or finish) the features store of ``records``' images; returns its reader. Shards already
    on disk are kept (a killed run resumes); images that cannot be read are listed in errors.jsonl."""
    import numpy as np

    from vlmtools.console import info, progress, warn
    from vlmtools.heads.data import digest
    from vlmtools.images import load_rgb, normalize_params, square_tensor
    from vlmtools.store import StoreWriter, open_store

    visual = encoder.model.visual
    size = encoder.image_size
    shapes = feature_shapes(visual, size, layers, encoder.device)
    dim = sum(c * h * w for c, h, w in shapes)
    info(f"feature cache: {len(layers)} tower layers, {dim:,} float16 values ({dim * 2 / 2**20:.2f} MiB) per "
         f"image, {dim * 2 * len(records) / 2**30:.2f} GiB for {len(records)} images")
    mean, std = normalize_params(encoder.preprocess)
    n = len(records)
    extra = {"normalized": False, "layers": list(layers), "shapes": shapes, "image_size": size,
             "input_count": n, "inputs_sha": digest([r["id"] for r in records], [r["path"] for r in records])}
    writer = StoreWriter(cache_dir, kind="features", model=encoder.spec.as_dict(), dim=dim, dtype="float16",
                         shard_size=shard_size, preprocess="square resize (no crop), normalised",
                         extra_info=extra,
                         mismatch_fix=f"delete {cache_dir} to rebuild the feature cache, or pass --cache with "
                                      "another directory")
    n_shards = max(1, math.ceil(n / shard_size))
    todo = [k for k in range(n_shards) if not writer.shard_done(k)]
    writer.clean_partial(todo)
    if todo:
        with progress("caching tower features", total=sum(len(records[k * shard_size:(k + 1) * shard_size])
                                                          for k in todo), unit="images") as bar:
            for k in todo:
                rows, meta, errors = [], [], []
                chunk = records[k * shard_size:(k + 1) * shard_size]
                for b0 in range(0, len(chunk), batch):
                    xs, ok = [], []
                    for rec in chunk[b0:b0 + batch]:
                        try:
                            xs.append(square_tensor(load_rgb(rec["path"]), size, mean, std))
                            ok.append(rec)
                        except Exception as exc:  # PIL raises many kinds
                            errors.append({"id": rec["id"], "path": rec["path"],
                                           "error": f"{type(exc).__name__}: {exc}"})
                            warn(f"{rec['path']}: cannot read the image ({type(exc).__name__}); skipped")
                    if xs:
                        with torch.no_grad(), encoder.autocast():
                            feats = tower_features(visual, torch.cat(xs).to(encoder.device), layers)
                        rows.append(torch.cat([f.float().flatten(1) for f in feats], 1).cpu().numpy())
                        meta.extend(ok)
                    bar.advance(len(chunk[b0:b0 + batch]))
                emb = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
                writer.write_shard(k, emb, meta, errors)
    writer.finalize(n_shards)
    return open_store(cache_dir, kind="features")


# ----------------------------------------------------------------------------- train ala

def train_ala(manifest: str, output, *, options, layers: Sequence[int] | None = None, cache=None,
              where: Sequence[str] = (), val_where: Sequence[str] = (), val_fraction: float | None = None,
              d_model: int = 64, heads: int = 4, grid: int | None = None, lam: float = 1.0, aea: bool = True,
              model: str | None = None, pretrained: str | None = None, batch_images: int = 32) -> dict:
    """`vlmtools train ala`: cache the frozen tower's features of the manifest's images, then fit ALA on
    them with the one loop. Returns the training summary."""
    from vlmtools import formats
    from vlmtools.classify import parse_where, select_rows
    from vlmtools.console import info
    from vlmtools.heads.base import train_and_save
    from vlmtools.heads.data import load_train_val
    from vlmtools.models import ModelSpec, load_model

    options.check()
    if d_model < 1 or heads < 1 or d_model % heads:
        raise BadInput(f"--d-model {d_model} must be a positive multiple of --heads {heads}")
    if grid is not None and grid < 1:
        raise BadInput("--grid must be at least 1")
    if lam < 0:
        raise BadInput("--lam must be >= 0")
    if str(output) in ("", "-"):
        raise BadInput("-o/--output: a head is two files, NAME.json and NAME.safetensors; give NAME")
    records = formats.read_manifest(manifest)
    wanted = set(select_rows(records, parse_where(where)) if where else range(len(records)))
    if val_where:
        wanted |= set(select_rows(records, parse_where(val_where)))
    records = [r for i, r in enumerate(records) if i in wanted and r.get("label") is not None]
    if not records:
        raise BadInput(f"{manifest}: no labelled image to train on" + (" (after --where)" if where else ""))
    spec = ModelSpec.parse(model, pretrained)
    encoder = load_model(spec, options.device)
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    chosen = choose_layers(tower_layers(encoder.model.visual), layers)
    cache_dir = Path(cache) if cache is not None else Path(str(formats.head_paths(output)[0])[:-5] + ".features")
    reader = cache_features(records, cache_dir, encoder, chosen, batch=batch_images)
    info(f"tower features: {len(reader)} images × {reader.dim} values in {cache_dir}")
    unreadable = len(reader.errors())
    if unreadable and not len(reader):
        raise BadInput(f"{manifest}: none of {unreadable} images could be read (see {cache_dir}/errors.jsonl)")
    data = load_train_val(cache_dir, where=where, val_where=val_where, val_fraction=val_fraction,
                          seed=options.seed, model=spec.name, pretrained=spec.pretrained, kind="features")
    shapes = reader.info["shapes"]
    g = grid or token_grid(shapes)
    config = dict(input_dim=reader.dim, n_classes=len(data.classes), shapes=shapes, layers=chosen,
                  d_model=d_model, heads=heads, grid=g, lam=lam, aea=aea)
    return train_and_save(
        "ala", config, data, output, options,
        training={"manifest": str(Path(manifest).resolve()), "where": list(where), "val_where": list(val_where),
                  "val_fraction": val_fraction, "cache": str(cache_dir)},
        inputs=data.inputs("features"), description="train ala",
        extra={"image_size": encoder.image_size, "layers": chosen, "unreadable_images": unreadable},
        loss_fn=ala_loss, on_epoch=aea_hook)


# ----------------------------------------------------------------------------- explain --method ala

class AlaExplainer:
    """A trained ALA head with its tower: attention_map(x) -> α′ at the input's size, in [0, 1]."""

    def __init__(self, head: AlaHead, info: dict, where: str):
        self.head, self.info, self.where = head, info, where
        self.visual = None

    def attach(self, encoder) -> None:
        """Run on ``encoder``'s tower (the model the head was trained on)."""
        size = self.info.get("image_size")
        if size is not None and size != encoder.image_size:
            raise BadInput(f"{self.where}: trained at {size} px, the model's input is {encoder.image_size} px")
        self.visual = encoder.model.visual
        self.head.to(encoder.device)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def lattice(self) -> list[int]:
        g = int(self.head.config["grid"])
        return [g, g]

    def attention_map(self, x):
        from vlmtools.explain.saliency import unit_range, upsample

        with torch.no_grad():
            feats = tower_features(self.visual, x, self.head.config["layers"])
            alpha, _ = self.head.attention(feats)
        return unit_range(upsample(alpha[0], tuple(x.shape[-2:])).cpu().numpy())

    def logits(self, x):
        """The head's own class scores (B, K): the perception branch's logits, attention on."""
        with torch.no_grad():
            return self.head.classify(tower_features(self.visual, x, self.head.config["layers"])).float()

    def probs(self, x):
        """The head's class probabilities: the perception branch's softmax."""
        return torch.softmax(self.logits(x), dim=-1)


def load_ala_for_explain(path, model: str | None, pretrained: str | None, device: str = "auto"):
    """(AlaExplainer, model spec) for `explain visual --method ala --head HEAD`. A head of another kind
    or trained on another model than --model/--pretrained is BadInput (exit 2)."""
    from vlmtools.heads.base import load_head
    from vlmtools.models import ModelSpec, resolve_device

    head, info = load_head(path, resolve_device(device))
    where = f"head {path}"
    if info["kind"] != "ala":
        raise BadInput(f"{where}: is a {info['kind']} head, not an ala head (from `vlmtools train ala`)")
    recorded = info["model"]
    spec = ModelSpec(recorded["name"], recorded.get("pretrained"))
    if model is not None or pretrained is not None:
        spec = ModelSpec.parse(model or recorded["name"], pretrained if pretrained is not None
                               else (recorded.get("pretrained") if model in (None, recorded["name"]) else None))
        if spec.as_dict() != {"name": recorded["name"], "pretrained": recorded.get("pretrained")}:
            raise BadInput(f"{where}: trained on the tower of {ModelSpec(recorded['name'], recorded.get('pretrained'))}, "
                           f"not {spec}; an ALA head reads that tower's features only (leave out --model)")
    return AlaExplainer(head, info, where), spec
