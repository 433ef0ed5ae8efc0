"""Study 001's adapter: one FC layer on image features, trained on real image embeddings mixed with text
embeddings used as images (raw, or translated by a t2i head).

Training slots. Each class c keeps as many training samples as it has training images, n_c:
- ``balance="class"`` (default): k_c = round(R * n_c) images of class c (half up; at least 1 when R > 0),
  chosen by a permutation seeded with the seed, so a lower ratio keeps a subset of a higher one's images;
  the other n_c - k_c slots are filled with class c's text samples (a seeded permutation, cycled when
  the class has fewer texts than slots). A class that needs text and has none is BadInput.
- ``balance="global"`` (the earlier protocol study 001 criticises): K = round(R * N) images chosen at
  random over the whole training set (so classes are kept unevenly, some not at all at low R) and
  N - K text samples drawn at random from all text samples.
Image only (``with_text=False``) trains on the kept images alone.

Text samples: a text store from the same model as the image store. Rows with "class" (`embed text` of
descriptor JSONL, e.g. `describe --style structured|sentences`: one sample per sentence) or "label" give
their class; rows with "image_id" (captions) take the label of that training image (captions of images
outside the training selection are not used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vlmtools.console import info, warn
from vlmtools.errors import BadInput

BALANCES = ("class", "global")
SWEEP_DEFAULT = tuple(round(1 - i / 10, 1) for i in range(11))  # 1.0, 0.9, ..., 0.0


def round_half_up(x: float) -> int:
    return int(x + 0.5)


@dataclass
class TextSamples:
    x: "object"          # (T, d) float32 (raw or translated)
    y: "object"          # (T,) class index
    source: str          # "class" | "captions"
    translated: bool


def read_text_samples(text_store, data, *, t2i=None, device: str = "auto") -> TextSamples:
    """Text samples of the training classes from ``text_store`` (see the module docstring)."""
    import numpy as np

    from vlmtools.heads.data import open_store_for

    spec = data.spec
    texts, _ = open_store_for(text_store, "text", spec.name, spec.pretrained)
    if texts.dim != data.reader.dim:
        raise BadInput(f"{text_store}: {texts.dim}-d embeddings, but image store {data.reader.path} has "
                       f"{data.reader.dim}-d")
    index = {c: i for i, c in enumerate(data.classes)}
    train_label = {str(r["id"]): r["label"] for r in data.train.meta}
    rows, ys, source = [], [], None
    unknown = 0
    for t, rec in enumerate(texts.meta):
        if rec.get("class") is not None or rec.get("label") is not None:
            cls, kind = str(rec.get("class", rec.get("label"))), "class"
        elif rec.get("image_id") is not None:
            cls, kind = train_label.get(str(rec["image_id"])), "captions"
            if cls is None:
                continue  # a caption of an image we do not train on
        else:
            raise BadInput(f"{text_store}: row {rec.get('id')!r} has no \"class\", \"label\" or \"image_id\"; "
                           f"text samples need a class (embed descriptor JSONL or captions with image_id)")
        source = source or kind
        if cls not in index:
            unknown += 1
            continue
        rows.append(t)
        ys.append(index[cls])
    if not rows:
        raise BadInput(f"{text_store}: no text sample belongs to a training class of {data.reader.path}")
    if unknown:
        warn(f"{unknown} text samples of {text_store} are of classes with no training images; left out")
    x = texts.embeddings[np.asarray(rows, dtype=np.int64)]
    translated = t2i is not None
    if translated:
        from vlmtools.heads.t2i import translate

        strings = [texts.meta[t].get("text") for t in rows]
        x = translate(t2i, strings, x, spec, device)
    return TextSamples(np.ascontiguousarray(x, dtype=np.float32), np.asarray(ys, dtype=np.int64), source,
                       translated)


def check_ratio(ratio: float, option: str = "--image-ratio") -> float:
    if not 0 <= ratio <= 1:
        raise BadInput(f"{option} {ratio}: expected a number in [0, 1]")
    return ratio


def mix(train, texts: TextSamples | None, ratio: float, *, balance: str = "class", seed: int = 0,
        classes: Sequence[str] = ()):
    """(x, y, images kept, text samples) of the training slots at image ratio ``ratio``."""
    import numpy as np

    check_ratio(ratio)
    if balance not in BALANCES:
        raise BadInput(f"--balance {balance!r}: expected one of {', '.join(BALANCES)}")
    rng = np.random.default_rng(seed)
    n_classes = len(train.classes)
    if balance == "class":
        img_idx, txt_idx = [], []
        txt_rng = np.random.default_rng([seed, 1])
        for c in range(n_classes):
            own = rng.permutation(np.flatnonzero(train.y == c))
            k = round_half_up(ratio * len(own))
            if ratio > 0:
                k = max(k, 1)
            img_idx.append(own[:k])
            need = len(own) - k
            if texts is not None and need:
                pool = np.flatnonzero(texts.y == c)
                if not len(pool):
                    raise BadInput(f"class {train.classes[c]!r} has no text samples, but image ratio {ratio} "
                                   f"needs {need} of them")
                txt_idx.append(np.resize(txt_rng.permutation(pool), need))
        img = np.concatenate(img_idx) if img_idx else np.zeros(0, np.int64)
        txt = np.concatenate(txt_idx) if txt_idx else np.zeros(0, np.int64)
    else:
        n = len(train.y)
        img = rng.permutation(n)[:round_half_up(ratio * n)]
        txt = np.zeros(0, np.int64)
        if texts is not None and n - len(img):
            txt = np.resize(np.random.default_rng([seed, 1]).permutation(len(texts.y)), n - len(img))
    x = train.x[np.sort(img)]
    y = train.y[np.sort(img)]
    if texts is not None and len(txt):
        x = np.concatenate([x, texts.x[txt]])
        y = np.concatenate([y, texts.y[txt]])
    return np.ascontiguousarray(x), y, int(len(img)), int(len(txt))


def _eval_rows(data, test_where: Sequence[str]):
    """Labelled rows to report accuracy on: --test-where rows (with a training class), else val."""
    from vlmtools.heads.data import labelled_rows, to_labelled

    if not test_where:
        return None
    rows, meta = labelled_rows(data.reader, test_where)
    test = to_labelled(data.reader, rows, meta, data.classes, "test")
    if not len(test):
        raise BadInput(f"{data.reader.path}: no row matching --test-where {' '.join(test_where)} has a "
                       f"training class")
    return test


def _accuracy(head, rows) -> float:
    from vlmtools.heads.loop import accuracy, to_tensors

    return accuracy(head, *to_tensors((rows.x, rows.y), next(head.parameters()).device))


def train_adapter(image_store, output, *, text_store, options, image_ratio: float = 1.0,
                  balance: str = "class", t2i=None, image_only: bool = False, where: Sequence[str] = (),
                  val_where: Sequence[str] = (), val_fraction: float | None = None,
                  test_where: Sequence[str] = (), model: str | None = None, pretrained: str | None = None) -> dict:
    """`vlmtools train adapter` (one head): returns the summary."""
    from vlmtools.heads.base import check_head_output, train_and_save
    from vlmtools.heads.data import load_train_val
    from vlmtools.heads.linear import probe_val_fraction

    check_ratio(image_ratio)
    options.check()
    check_head_output(output)
    val_fraction = probe_val_fraction(val_fraction, options)
    data = load_train_val(image_store, where=where, val_where=val_where, val_fraction=val_fraction,
                          seed=options.seed, model=model, pretrained=pretrained)
    texts = None if image_only else read_text_samples(text_store, data, t2i=t2i, device=options.device)
    x, y, n_img, n_txt = mix(data.train, texts, image_ratio, balance=balance, seed=options.seed)
    if not len(y):
        raise BadInput(f"--image-ratio {image_ratio} with no text samples leaves nothing to train on")
    test = _eval_rows(data, test_where)
    inputs = data.inputs()
    if texts is not None:
        from vlmtools.heads.data import digest

        inputs["text_store"] = {"path": str(text_store), "sha": digest(texts.x, texts.y), "rows": len(texts.y)}
    summary = train_and_save(
        "adapter", dict(input_dim=data.reader.dim, n_classes=len(data.classes)), data, output, options,
        training={"image_ratio": image_ratio, "balance": balance, "t2i": str(t2i) if t2i else None,
                  "image_only": image_only, "where": list(where), "val_where": list(val_where),
                  "val_fraction": val_fraction, "test_where": list(test_where)},
        inputs=inputs, train_arrays=(x, y),
        val_arrays=(data.val.x, data.val.y) if data.val is not None else None,
        extra={"images": n_img, "texts": n_txt, "text_source": texts.source if texts else None},
        extra_fn=(lambda head: {"test": {"acc": round(_accuracy(head, test), 6), "rows": len(test)}})
        if test is not None else None,
        description=f"train adapter ({n_img} images + {n_txt} texts)")
    return summary


def parse_ratios(text: str) -> list[float]:
    """"1.0,0.9,...,0.0" -> [1.0, 0.9, ..., 0.0] (each checked to be in [0, 1]; duplicates refused)."""
    try:
        ratios = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise BadInput(f"--sweep {text!r}: expected comma-separated ratios, e.g. 1.0,0.9,0.5,0.0") from None
    if not ratios:
        raise BadInput(f"--sweep {text!r}: no ratio given")
    for r in ratios:
        check_ratio(r, "--sweep ratio")
    if len(set(ratios)) != len(ratios):
        raise BadInput(f"--sweep {text!r}: a ratio is listed twice")
    return ratios


def sweep_adapter(image_store, *, text_store, options, ratios: Sequence[float] = SWEEP_DEFAULT,
                  balance: str = "class", t2i=None, where: Sequence[str] = (), val_where: Sequence[str] = (),
                  val_fraction: float | None = None, test_where: Sequence[str] = (), out_dir=None,
                  table="-", json_lines: bool = False, plots=None, model: str | None = None,
                  pretrained: str | None = None) -> list[dict]:
    """Study 001's table: for each image ratio, an image-only adapter and an image+text one, their
    accuracy on the --test-where rows (else the val rows). Rows go to ``table`` (TSV with percentages, or
    NDJSON with fractions), a rich table to stderr, a PNG to ``plots``; heads to ``out_dir`` if given."""
    import time
    from pathlib import Path

    from vlmtools import formats
    from vlmtools.heads.base import save_trained, train_head
    from vlmtools.heads.data import load_train_val

    options.check()
    if balance not in BALANCES:
        raise BadInput(f"--balance {balance!r}: expected one of {', '.join(BALANCES)}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BadInput(f"{out_dir}: is a file; with --sweep, -o names a directory for the heads")
    if test_where:  # else the val rows are what the table reports: keep the loop's default share
        from vlmtools.heads.linear import probe_val_fraction

        val_fraction = probe_val_fraction(val_fraction, options)
    data = load_train_val(image_store, where=where, val_where=val_where, val_fraction=val_fraction,
                          seed=options.seed, model=model, pretrained=pretrained)
    texts = read_text_samples(text_store, data, t2i=t2i, device=options.device)
    evaluated = _eval_rows(data, test_where) or data.val
    if evaluated is None:
        raise BadInput("--sweep reports accuracy on --test-where rows or on val rows; give --test-where, "
                       "--val-where or a --val-fraction above 0")
    eval_name = "test" if test_where else "val"
    for r in ratios:  # every input problem before the first head is trained
        if r < 1:
            mix(data.train, texts, r, balance=balance, seed=options.seed)
    val = (data.val.x, data.val.y) if data.val is not None else None
    cfg = dict(input_dim=data.reader.dim, n_classes=len(data.classes))
    rows = []
    t0 = time.perf_counter()
    for r in ratios:
        row = {"image_ratio": r, "text_ratio": round(1 - r, 6), "image_only": None, "image_text": None,
               "images": None, "texts": None, "eval_rows": len(evaluated), "eval": eval_name,
               "balance": balance}
        for with_text in (False, True):
            if (not with_text and r == 0) or (with_text and r == 1):
                continue  # nothing to train on / the same as image only
            x, y, n_img, n_txt = mix(data.train, texts if with_text else None, r, balance=balance,
                                     seed=options.seed)
            name = f"{'mix' if with_text else 'image'}-{round(100 * r):03d}"
            head, result = train_head("adapter", cfg, (x, y), val, options, description=f"sweep {name}")
            acc = round(_accuracy(head, evaluated), 6)
            row["image_text" if with_text else "image_only"] = acc
            row["images"] = n_img
            if with_text:
                row["texts"] = n_txt
            if out_dir is not None:
                save_trained(Path(out_dir) / name, "adapter", head, result, classes=data.classes, spec=data.spec,
                             options=options, inputs=data.inputs(),
                             training={"image_ratio": r, "balance": balance, "image_only": not with_text,
                                       "t2i": str(t2i) if t2i else None, "where": list(where),
                                       "test_where": list(test_where)},
                             extra={"images": n_img, "texts": n_txt, eval_name: {"acc": acc}})
        rows.append(row)
    seconds = time.perf_counter() - t0
    with formats.open_output(table) as fh:
        if json_lines:
            for row in rows:
                fh.write(formats.dumps_line(row))
        else:
            fh.write("image_ratio\ttext_ratio\timage_only_%\timage_text_%\timages\ttexts\n")
            for row in rows:
                fh.write("\t".join([f"{row['image_ratio']:g}", f"{row['text_ratio']:g}", _pct(row["image_only"]),
                                    _pct(row["image_text"]), str(row["images"]), str(row["texts"] or 0)]) + "\n")
    report_sweep(rows, eval_name, texts, seconds)
    if plots is not None:
        path = Path(plots) / "adapter_sweep.png"
        plot_sweep(path, rows, eval_name, balance)
        info(f"wrote {path}")
    return rows


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def report_sweep(rows: Sequence[dict], eval_name: str, texts: TextSamples, seconds: float) -> None:
    from rich.table import Table

    kind = ("t2i-translated " if texts.translated else "") + ("captions" if texts.source == "captions"
                                                              else "class texts")
    table = Table(title=f"adapter accuracy on {eval_name} rows ({rows[0]['eval_rows']}), "
                        f"balance {rows[0]['balance']}, text = {kind}", title_justify="left")
    for col in ("ratio (image, text)", "image only", "image + text"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(f"({round(100 * row['image_ratio'])}, {round(100 * row['text_ratio'])})",
                      _pct(row["image_only"]) or "-", _pct(row["image_text"]) or "-")
    info(f"{sum((r['image_only'] is not None) + (r['image_text'] is not None) for r in rows)} heads in "
         f"{seconds:.1f} s")
    info(table)


def plot_sweep(path, rows: Sequence[dict], eval_name: str, balance: str) -> None:
    from pathlib import Path

    from matplotlib.figure import Figure

    from vlmtools.evaluate import _save

    from vlmtools.heads.curves import accuracy_axis, wilson

    n = rows[0]["eval_rows"]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    bounds = []
    for key, label, style, shift in (("image_only", "image only", "o-", -0.6), ("image_text", "image + text",
                                                                                "s--", 0.6)):
        pts = sorted((100 * r["image_ratio"], r[key]) for r in rows if r[key] is not None)
        if pts:
            lo, hi = zip(*(wilson(acc, n) for _, acc in pts))
            ys = [100 * acc for _, acc in pts]
            # 95% intervals drawn (points a little apart so the two series' bars do not hide each other)
            ax.errorbar([x + shift for x, _ in pts], ys, yerr=[[y - 100 * a for y, a in zip(ys, lo)],
                                                               [100 * b - y for y, b in zip(ys, hi)]],
                        fmt=style, capsize=3, label=label)
            bounds += [100 * v for v in lo + hi]
    ax.set_ylim(*accuracy_axis(bounds))
    ax.set_xlabel("image ratio % (the rest: text as images)")
    ax.set_ylabel(f"{eval_name} accuracy % (n = {n})")
    ax.set_title(f"adapter: accuracy vs image ratio (balance {balance})\n{eval_name} rows: n = {n}; bars: 95% "
                 f"interval (Wilson); one image = {100 / n:.2g} points", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, Path(path), kind="train")
