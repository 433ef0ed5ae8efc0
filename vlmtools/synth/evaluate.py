"""How well a CLIP-style model knows the offline world: zero-shot attributes, class names, descriptors.

All functions take an ``Encoder`` (vlmtools.models) and in-memory uint8 images, so they work for the micro
CLIP and for any other open_clip model alike.
"""

from __future__ import annotations

import numpy as np

from vlmtools.prompts import descriptor_sentence
from vlmtools.synth.world import PATTERN_ADJ, VOCAB, make_classes, oracle_descriptors, sample_class_images

EVAL_ATTRIBUTES = ("colour", "shape", "pattern", "size", "habitat", "domain")


def images_to_tensor(images: np.ndarray, model):
    """uint8 (N,H,W,3) at the model's input size -> a normalized float tensor, as its preprocess would."""
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def encode_images(encoder, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 images at the encoder's input size -> L2-normalized float32 features (N, dim)."""
    size = encoder.image_size
    if images.shape[1:3] != (size, size):
        # other models: go through their own preprocess (resize, crop), image by image
        import torch
        from PIL import Image

        batches = [torch.stack([encoder.preprocess(Image.fromarray(im)) for im in images[i:i + batch_size]])
                   for i in range(0, len(images), batch_size)]
    else:
        batches = [images_to_tensor(images[i:i + batch_size], encoder.model)
                   for i in range(0, len(images), batch_size)]
    return np.concatenate([encoder.encode_image_tensor(b).numpy() for b in batches]).astype(np.float32)


def attribute_prompts(attribute: str, value: str) -> list[str]:
    """Zero-shot prompts for one attribute value, averaged into one text embedding."""
    if attribute == "colour":
        return [f"a photo of a {value} object.", f"a {value} thing.", f"something with {value} colouring."]
    if attribute == "shape":
        return [f"a photo of a {value}.", f"a {value}.", f"an object with the shape of a {value}."]
    if attribute == "pattern":
        adj = PATTERN_ADJ[value]
        return [f"a photo of a {adj} object.", f"a {adj} thing."]
    if attribute == "size":
        return [f"a photo of a {value} object.", f"a {value} thing."]
    if attribute == "habitat":
        return [f"a photo of an object on {value}.", f"something on {value}.", f"{value} in the background"]
    if attribute == "domain":
        return [f"a {value} of an object.", f"a {value} of a thing."]
    raise ValueError(attribute)


def _mean_text_embeddings(encoder, groups: list[list[str]]) -> np.ndarray:
    flat = [t for g in groups for t in g]
    emb = encoder.encode_texts(flat)
    out, start = [], 0
    for g in groups:
        v = emb[start:start + len(g)].mean(axis=0)
        out.append(v / np.linalg.norm(v))
        start += len(g)
    return np.stack(out)


def attribute_accuracy(encoder, image_features: np.ndarray, attributes: list[dict],
                       which: tuple[str, ...] = EVAL_ATTRIBUTES) -> dict[str, float]:
    """Zero-shot accuracy per attribute: pick the value whose prompts best match each image."""
    out = {}
    for attribute in which:
        values = list(VOCAB[attribute])
        text = _mean_text_embeddings(encoder, [attribute_prompts(attribute, v) for v in values])
        pred = (image_features @ text.T).argmax(axis=1)
        truth = np.array([values.index(a[attribute]) for a in attributes])
        out[attribute] = float((pred == truth).mean())
    return out


def class_name_accuracy(encoder, image_features: np.ndarray, labels: list[str], class_names: list[str],
                        template: str = "a photo of a {}.") -> float:
    """Plain CLIP zero-shot with the class name only."""
    text = encoder.encode_texts([template.format(c) for c in class_names])
    pred = (image_features @ text.T).argmax(axis=1)
    truth = np.array([class_names.index(label) for label in labels])
    return float((pred == truth).mean())


def descriptor_accuracy(encoder, image_features: np.ndarray, labels: list[str],
                        descriptors: dict[str, list[str]], wrap: str = "cbd") -> float:
    """CBD-style: a class's score is the mean cosine similarity over its descriptor sentences."""
    class_names = list(descriptors)
    sentences = [[descriptor_sentence(c, d, wrap) for d in descriptors[c]] for c in class_names]
    flat = encoder.encode_texts([s for group in sentences for s in group])
    scores, start = [], 0
    for group in sentences:
        scores.append((image_features @ flat[start:start + len(group)].T).mean(axis=1))
        start += len(group)
    pred = np.stack(scores, axis=1).argmax(axis=1)
    truth = np.array([class_names.index(label) for label in labels])
    return float((pred == truth).mean())


def evaluate_world(encoder, classes: int = 20, per_class: int = 30, seed: int = 1000,
                   domain: str = "photo", image_size: int = 64) -> dict:
    """All figures on a freshly generated (held-out) world: attributes, class names, oracle descriptors."""
    defs = make_classes(classes, seed)
    rng = np.random.default_rng([seed, 4])
    images, _, attrs, labels = sample_class_images(rng, defs, per_class, domain, image_size)
    feats = encode_images(encoder, images)
    names = [c["name"] for c in defs]
    descriptors = {c["name"]: oracle_descriptors(c)[0] for c in defs}
    which = EVAL_ATTRIBUTES if domain == "both" else tuple(a for a in EVAL_ATTRIBUTES if a != "domain")
    result = {
        "world": {"classes": classes, "per_class": per_class, "seed": seed, "domain": domain},
        "attributes": attribute_accuracy(encoder, feats, attrs, which),
        "attribute_chance": {a: round(1 / len(VOCAB[a]), 4) for a in which},
        "class_name": class_name_accuracy(encoder, feats, labels, names),
        "descriptors": descriptor_accuracy(encoder, feats, labels, descriptors),
        "chance": round(1 / classes, 4),
    }
    return result


def linear_probe(train_features: np.ndarray, train_labels: list[str], weight_decay: float = 1e-3,
                 iterations: int = 200):
    """A multinomial logistic regression on L2-normalised features (L-BFGS, L2 penalty): what the
    world's figures call "a probe". Returns predict(features) -> labels."""
    import torch

    classes = sorted(set(train_labels))
    x = torch.from_numpy(np.ascontiguousarray(train_features, dtype=np.float32))
    y = torch.tensor([classes.index(label) for label in train_labels])
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    scale = 10.0  # unit vectors: logits need room
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scale * x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(features: np.ndarray) -> list[str]:
        with torch.no_grad():
            logits = scale * torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)) @ w + b
        return [classes[i] for i in logits.argmax(dim=1).tolist()]

    return predict


def probe_shift(encoder, classes: int = 20, per_class: int = 40, seed: int = 1000, image_size: int = 64,
                **world_options) -> dict:
    """Top-1 of a linear probe trained on photos of a held-out world, on held-out photos (in domain) and
    on paintings of the same classes (out of domain): how far the encoder's features shift with the domain."""
    defs = make_classes(classes, seed, **world_options)
    rng = np.random.default_rng([seed, 6])
    out = {"world": {"classes": classes, "per_class": per_class, "seed": seed, **world_options}}
    feats, labels, styles = {}, {}, {}
    for part, domain in (("train", "photo"), ("photo", "photo"), ("painting", "painting")):
        images, _, attrs, labels[part] = sample_class_images(rng, defs, per_class, domain, image_size)
        feats[part] = encode_images(encoder, images)
        styles[part] = np.array([a["style"] for a in attrs])
    predict = linear_probe(feats["train"], labels["train"])
    for part in ("photo", "painting"):
        right = np.array([p == t for p, t in zip(predict(feats[part]), labels[part])])
        out[part] = float(right.mean())
        if part == "painting":
            out["painting_by_style"] = {s: float(right[styles[part] == s].mean()) for s in sorted(set(styles[part]))}
    out["drop"] = round(out["photo"] - out["painting"], 4)
    return out


def world_figures(encoder, world_dir, descriptors: str = "descriptors.jsonl") -> dict:
    """Top-1 on a world directory's test split, per domain it holds: zero-shot by class name, CBD with
    its descriptors, and a linear probe trained on its train-split photos. What a preset is tuned by."""
    from pathlib import Path

    from PIL import Image

    from vlmtools.formats import read_descriptors, read_manifest

    root = Path(world_dir)
    records = read_manifest(root / "manifest.jsonl")
    images = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in records])
    feats = encode_images(encoder, images)
    labels = [r["label"] for r in records]
    names = [line for line in (root / "classes.txt").read_text(encoding="utf-8").splitlines() if line]
    desc = {c: rec["descriptors"] for c, rec in read_descriptors(root / descriptors).items()}
    train = [i for i, r in enumerate(records) if r["split"] == "train" and r.get("domain", "photo") == "photo"]
    predict = linear_probe(feats[train], [labels[i] for i in train])
    out = {}
    for domain in sorted({r.get("domain", "photo") for r in records}):
        test = [i for i, r in enumerate(records) if r["split"] == "test" and r.get("domain", "photo") == domain]
        f, y = feats[test], [labels[i] for i in test]
        out[domain] = {"n": len(test), "names": class_name_accuracy(encoder, f, y, names),
                       "descriptors": descriptor_accuracy(encoder, f, y, desc),
                       "probe": float(np.mean([p == t for p, t in zip(predict(f), y)]))}
    return out
