"""`vlmtools classify STORE --head HEAD`: a trained classifier head's predictions, in the predictions
contract of zero-shot classify (formats.prediction_record), so `eval` and `eval compare` read them
unchanged. Scores in "topk" are the head's softmax probabilities."""

from __future__ import annotations

import time
from typing import Sequence

from vlmtools import formats
from vlmtools.console import info, warn
from vlmtools.errors import BadInput, StoreMismatch
from vlmtools.provenance import rows_note, seen_by_head

CHUNK = 8192


def head_scores(head, x, device: str = "cpu", chunk: int = CHUNK):
    """(N, d) embeddings -> (N, C) softmax probabilities, float32 numpy."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32)).to(device)
            out.append(torch.softmax(head(xb).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, head.n_classes), np.float32)


def check_model(info: dict, recorded: dict, head_path, what: str) -> None:
    """Refuse embeddings (``recorded``: a store's info["model"]) of another model than the head's."""
    from vlmtools.models import ModelSpec

    m = info["model"]
    try:
        ModelSpec(m["name"], m.get("pretrained")).check_matches(recorded, what)
    except StoreMismatch as exc:
        raise StoreMismatch(f"{exc} (head {head_path} was trained on that model's embeddings)") from None


def check_store_fits_head(reader, info: dict, head_path) -> None:
    """A store embedded with another model (or of another width) than the head's is refused."""
    check_model(info, reader.info["model"], head_path, f"store {reader.path}")
    if reader.dim != info["input_dim"]:
        raise BadInput(f"{reader.path}: {reader.dim}-d embeddings, but head {head_path} takes "
                       f"{info['input_dim']}-d inputs")


def head_run(hinfo: dict, head_path, image_store) -> dict:
    """The run keys of every prediction (formats.RUN_KEYS but precision): method = the head's kind and
    name ("probe:probe-s0"), its model as zero-shot classify writes it, the image store as given."""
    from pathlib import Path

    from vlmtools.models import ModelSpec

    m = hinfo["model"]
    return {"method": f"{hinfo['kind']}:{Path(str(head_path)).name.removesuffix('.json')}",
            "model": str(ModelSpec(m["name"], m.get("pretrained"))), "store": str(image_store)}


def classify_with_head(image_store, head_path, output="-", *, k: int = 5, where: Sequence[str] = (),
                       device: str = "auto") -> dict:
    import numpy as np

    from vlmtools.classify import DIGITS, check_labels, selected_images, top_k
    from vlmtools.heads.base import load_head
    from vlmtools.models import resolve_device
    from vlmtools.store import open_store

    t0 = time.perf_counter()
    if k < 1:
        raise BadInput("-k must be at least 1")
    device = resolve_device(device)
    head, hinfo = load_head(head_path, device)
    classes = hinfo.get("classes")
    if classes is None:
        raise BadInput(f"{head_path}: a {hinfo['kind']} head does not classify (it has no classes)")
    images = open_store(image_store, kind="image")
    check_store_fits_head(images, hinfo, head_path)
    meta, rows = selected_images(images, where, image_store)
    check_labels(meta, classes, image_store)
    emb = images.row_view(rows)  # read chunk by chunk from the memory-mapped shards: bounded memory
    run = head_run(hinfo, head_path, image_store)
    precision = {"image": images.info.get("compute"), "text": None}  # a head scores image embeddings only
    seen, said = seen_by_head(hinfo, image_store, meta)
    if seen:
        warn(f"{seen} of the {len(meta)} rows scored are rows head {head_path} was trained or validated on "
             f"({said}): their top-1 is no test accuracy; score held-out rows with --where (e.g. split=test)")
    correct = labelled = 0
    with formats.open_output(output) as fh:
        for start in range(0, len(meta), CHUNK):
            scores = head_scores(head, emb[start:start + CHUNK], device)
            idx, vals = top_k(scores, k)
            idx, vals = idx.tolist(), vals.astype(np.float64).round(DIGITS).tolist()
            for n, rec in enumerate(meta[start:start + CHUNK]):
                topk = [(classes[i], v) for i, v in zip(idx[n], vals[n])]
                record = formats.prediction_record(rec, topk[0][0], topk, precision=precision)
                record.update(run)
                if rec.get("label") is not None:
                    labelled += 1
                    correct += record["pred"] == rec["label"]
                fh.write(formats.dumps_line(record))
    summary = {"images": len(meta), "classes": len(classes), "method": run["method"],
               "head": str(head_path), "model": hinfo["model"], "labelled": labelled, "seen_in_training": seen,
               "top1": correct / labelled if labelled else None, "seconds": round(time.perf_counter() - t0, 3)}
    acc = f"; top-1 {100 * summary['top1']:.2f}% on {labelled} labelled" if labelled else ""
    info(f"classified {rows_note(meta, where)} with {hinfo['kind']} head {head_path} ({len(classes)} classes) "
         f"in {summary['seconds']:.2f} s{acc}")
    return summary
