"""The training curve of a head as a PNG (`vlmtools train ... --plots DIR`): loss and val metric per epoch,
read back from the head file, where loop.fit recorded them, with the kept epoch marked."""

from __future__ import annotations

from pathlib import Path


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy p measured on n images (95% by default): honest at 0 and 1."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_axis(values, min_span: float = 10.0) -> tuple[float, float]:
    """A percent axis that holds ``values`` (the intervals' ends) and spans at least ``min_span`` points,
    within [0, 100]: a difference of one image on a few hundred then looks like what it is, not a cliff."""
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    pad = max(0.0, min_span - (high - low)) / 2
    low, high = low - pad - 1, high + pad + 1
    if high > 101:  # a point at 100 keeps a little room above it
        low, high = low - (high - 101), 101.0
    if low < 0:
        low, high = 0.0, min(101.0, high - low)
    return low, high


def curve_title(info: dict, name: str) -> str:
    model = info.get("model") or {}
    model_name = "/".join(str(v) for v in (model.get("name"), model.get("pretrained")) if v)
    metrics = info.get("metrics") or {}
    rows = [f"{metrics[part]['rows']} {part}" for part in ("train", "val") if isinstance(metrics.get(part), dict)
            and "rows" in metrics[part]]
    return (f"{info.get('kind', 'head')} head {name}: training curve\n"
            f"{model_name}{'; ' if model_name and rows else ''}{', '.join(rows)} rows\n{_stop(info)}")


def _stop(info: dict) -> str:
    training = info.get("training") or {}
    return stop_sentence(info.get("curve") or [], info.get("best_epoch"), bool(info.get("stopped_early")),
                         planned=training.get("epochs"), patience=training.get("patience"))


def stop_sentence(curve: list[dict], best_epoch, stopped_early: bool, *, planned=None, patience=None) -> str:
    """How training ended, in words: how many epochs ran, why it stopped, which epoch's weights were kept."""
    epochs = len(curve)
    val_key = next((k for k in (curve[0] if curve else {}) if k.startswith("val_")), None)
    if val_key is None:
        return f"{epochs} epochs, no val rows: kept the last"
    best = max(e[val_key] for e in curve)
    reached = next(e["epoch"] for e in curve if e[val_key] == best)
    metric = val_key.replace("_", " ")
    kept = f"kept epoch {best_epoch}" + (f", which tied it" if best_epoch != reached else "")
    if stopped_early:
        return (f"stopped after epoch {epochs} of {planned or '?'}: {metric} did not pass {best:.4f} (epoch "
                f"{reached}) for {patience or '?'} epochs; {kept}")
    return f"{epochs} epochs; best {metric} {best:.4f} at epoch {reached}; {kept}"


def curve_figure(info: dict, name: str):
    from matplotlib.figure import Figure

    curve = info.get("curve") or []
    epochs = [e["epoch"] for e in curve]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(epochs, [e.get("loss") for e in curve], "-", color="#4c72b0", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    val_keys = [k for k in (curve[0] if curve else {}) if k.startswith("val_")]
    if val_keys:
        right = ax.twinx()
        for key, style in zip(val_keys, ("s--", "^:", "d-.")):
            right.plot(epochs, [e.get(key) for e in curve], style, color="#dd8452", markersize=3,
                       label=key.replace("_", " "))
        right.set_ylabel(" / ".join(k.replace("_", " ") for k in val_keys))
        handles += right.get_lines()
    best = info.get("best_epoch")
    if best is not None:
        handles.append(ax.axvline(best, color="#55a868", linestyle=":", label=f"kept epoch {best}"))
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="best", fontsize=8)
    ax.set_title(curve_title(info, name), fontsize=9)
    return fig


def write_curve(head_json, plots_dir) -> Path:
    """DIR/NAME.curve.png for the head NAME.json; returns the path."""
    from vlmtools import formats
    from vlmtools.evaluate import _save

    head_json = Path(head_json)
    info = formats.read_json(head_json)
    name = head_json.name.removesuffix(".json")
    out = Path(plots_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.curve.png"
    _save(curve_figure(info, name), path, kind="train")
    return path
