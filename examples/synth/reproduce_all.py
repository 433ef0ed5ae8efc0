#!/usr/bin/env python
"""Every study's table on the cub-like offline world, over several world seeds, with paired tests.

    python examples/synth/reproduce_all.py [OUT] [--quick] [--seeds N] [--threads T]
    (examples/synth/reproduce_all.sh wraps it)

For each seed s a world is drawn (`synth make --preset cub-like --domain both --seed s`: photos and
paintings of the same classes) and the studies run on it with the photo-only micro CLIPs:
  000  zero-shot on test photos (vlmtools-micro-photo): class names / CBD with vague descriptors (the stand-in
       for Menon's off-domain prompt) / object descriptors (the domain exemplar's) / + habitat (background)
  001  `train adapter --sweep` on train photos: image ratio x {class-balanced, global} x {image only,
       + descriptor text raw, + text through a `train t2i` head trained on the world's image captions}
  003  maps of a test photo per class of the first 20 classes (vlmtools-micro-vit): ALA (its own
       prediction), and Grad-CAM, rollout, RISE of the CBD classifier; `eval explanations` (mIoU beside the
       lattice ceiling; insertion, deletion, ID with 50 steps); grounding: Grad-CAM and RISE maps per
       descriptor sentence, `eval explanations --descriptors` (does a descriptor's map land on its region)
  004  CLIP names / CBD zero-shot, probe, LADS, LARE trained on train photos, tested on test photos
       (in domain) and test paintings (out of domain); the few-shot curve (probe vs LARE)
Every step is a real `vlmtools` command (written to OUT/pipeline.sh), run in this process to spare a
torch import per step; a step whose output exists is skipped, so a rerun resumes. Tables (mean ± std
over the seeds that have finished the study; McNemar exact p pooled over the seeds' images, or a paired
bootstrap for per-image map scores) go to OUT/tables/*.tsv and, aligned, to OUT/tables.txt and stdout;
--tables-only makes them from what has finished, --dry-run only lists the steps. OUT/timings.json has
each study's time. The CPU-time choices (maps of 20 classes, 50 insertion/deletion steps, RISE's
per-descriptor maps on 10 images) are in Config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RESNET = "vlmtools-micro-photo"
VIT = "vlmtools-micro-vit"
STUDIES = ("000", "001", "003", "004")


@dataclass
class Config:
    seeds: int = 5
    classes: int | None = None       # None: the preset's
    per_class: int | None = None
    maps_per_class: int = 1
    map_classes: int | None = 20     # maps of the test photos of the first N classes (None: all): CPU time
    rise_masks: int = 500
    eval_steps: int | None = 50      # insertion/deletion steps (None: RISE's ceil(H·W/224) pixels per step)
    grounding_masks: int = 100       # RISE masks of the per-descriptor maps (grounding)
    grounding_rise: int | None = 10  # RISE's per-descriptor maps for the first N map images only (CPU time)
    sweep: str = "1.0,0.9,0.5,0.2,0.1,0.0"
    shots: str = "1,2,4,8,16"
    epochs: int = 100
    ala_epochs: int = 30
    samples: int = 10                # LARE's K


QUICK = Config(seeds=2, classes=8, per_class=16, maps_per_class=1, map_classes=None, rise_masks=100, eval_steps=16,
               grounding_masks=50, grounding_rise=None, sweep="1.0,0.5,0.1,0.0", shots="1,4", epochs=30, ala_epochs=4, samples=4)


@dataclass
class Step:
    study: str
    argv: list[str]
    done: str                          # path (relative to OUT) whose existence means the step is done
    stdout: str | None = None          # file that receives the command's stdout
    python: object = None              # a Python callable instead of a vlmtools command
    extra: dict = field(default_factory=dict)

    def shell(self) -> str:
        if self.python is not None:
            return f"# (python) {self.argv[0]}"
        line = "vlmtools " + " ".join(shlex.quote(a) for a in self.argv)
        return line + (f" > {shlex.quote(self.stdout)}" if self.stdout else "")


# ----------------------------------------------------------------------------- the steps of one seed

def seed_steps(s: int, cfg: Config) -> list[Step]:
    d = f"s{s}"
    W, S, P, H, M = f"{d}/world", f"{d}/store", f"{d}/pred", f"{d}/heads", f"{d}/maps"
    size = (["--classes", str(cfg.classes)] if cfg.classes else []) + \
           (["--per-class", str(cfg.per_class)] if cfg.per_class else [])
    photo_test = ["--where", "split=test", "--where", "domain=photo"]
    photo_train = ["--where", "split=train", "--where", "domain=photo"]
    seed = ["--seed", str(s)]
    steps = [
        Step("world", ["synth", "make", W, "--preset", "cub-like", "--domain", "both", "--seed", str(s), *size],
             f"{W}/world.json", stdout=f"{d}/world.summary.json"),
        Step("world", ["embed", "images", f"{W}/manifest.jsonl", "-o", f"{S}/img-r", "-m", RESNET], f"{S}/img-r/info.json"),
        Step("world", ["embed", "text", f"{W}/descriptors.jsonl", "-o", f"{S}/desc-r", "-m", RESNET],
             f"{S}/desc-r/info.json"),
    ]
    # 000: names / CBD (vague) / domain exemplar (object lines) / background (+ habitat line)
    for name, args in (("names", ["--method", "clip", "--classes", f"{W}/classes.txt", "--templates", "photo"]),
                       ("cbd", ["--method", "cbd", "-d", f"{W}/descriptors-vague.jsonl", "--no-explain"]),
                       ("exemplar", ["--method", "cbd", "-d", f"{W}/descriptors.jsonl", "--background", "exclude",
                                     "--no-explain"]),
                       ("background", ["--method", "cbd", "-d", f"{W}/descriptors.jsonl", "--no-explain"])):
        steps.append(Step("000", ["classify", f"{S}/img-r", *args, *photo_test, "-o", f"{P}/000-{name}.jsonl"],
                          f"{P}/000-{name}.jsonl"))
    # 001: adapter sweeps
    steps.append(Step("001", ["embed", "text", f"{W}/image_captions.jsonl", "-o", f"{S}/cap-r", "-m", RESNET],
                      f"{S}/cap-r/info.json"))
    steps.append(Step("001", ["train", "t2i", f"{S}/cap-r", "--images", f"{S}/img-r", "-o", f"{H}/t2i", *photo_train,
                              *seed], f"{H}/t2i.json"))
    for balance in ("class", "global"):
        for text in ("raw", "t2i"):
            name = f"001-{balance}-{text}"
            steps.append(Step("001", ["train", "adapter", f"{S}/img-r", "--text", f"{S}/desc-r", "--balance", balance,
                                      *(["--t2i", f"{H}/t2i"] if text == "t2i" else []), "--sweep", cfg.sweep,
                                      *photo_train, "--test-where", "split=test", "--test-where", "domain=photo",
                                      "--epochs", str(cfg.epochs), *seed, "--json", "-o", f"{H}/{name}"],
                              f"{P}/{name}.jsonl", stdout=f"{P}/{name}.jsonl"))
    low = f"{round(100 * min(float(r) for r in cfg.sweep.split(',') if float(r) > 0)):03d}"
    for name, head in ((f"001-class-image-{low}", f"{H}/001-class-raw/image-{low}"),
                       (f"001-global-image-{low}", f"{H}/001-global-raw/image-{low}"),
                       ("001-class-image-050", f"{H}/001-class-raw/image-050"),
                       ("001-class-mix-raw-050", f"{H}/001-class-raw/mix-050"),
                       ("001-class-mix-t2i-050", f"{H}/001-class-t2i/mix-050")):
        steps.append(Step("001", ["classify", f"{S}/img-r", "--head", head, *photo_test, "-o", f"{P}/{name}.jsonl"],
                          f"{P}/{name}.jsonl"))
    # 003: maps with the ViT
    steps.append(Step("003", ["embed", "images", f"{W}/manifest.jsonl", "-o", f"{S}/img-v", "-m", VIT],
                      f"{S}/img-v/info.json"))
    steps.append(Step("003", ["classify", f"{S}/img-v", "--method", "cbd", "-d", f"{W}/descriptors.jsonl",
                              "--no-explain", *photo_test, "-o", f"{P}/003-cbd-all.jsonl"], f"{P}/003-cbd-all.jsonl"))
    steps.append(Step("003", ["subset", f"{P}/003-cbd-all.jsonl", f"{P}/003-cbd.jsonl", f"{W}/003-manifest.jsonl",
                              str(cfg.maps_per_class), str(cfg.map_classes or 0)], f"{W}/003-manifest.jsonl",
                      python=subset_maps))
    steps.append(Step("003", ["train", "ala", f"{W}/manifest.jsonl", "-m", VIT, *photo_train, "--epochs",
                              str(cfg.ala_epochs), *seed, "--cache", f"{S}/ala-cache", "-o", f"{H}/ala"], f"{H}/ala.json"))
    steps.append(Step("003", ["explain", "visual", f"{W}/003-manifest.jsonl", "--method", "ala", "--head", f"{H}/ala",
                              "--no-overlays", "-o", f"{M}/ala"], f"{M}/ala/info.json"))
    for method, args in (("gradcam", []), ("rollout", []),
                         ("rise", ["--masks", str(cfg.rise_masks), "--seed", str(s)])):
        steps.append(Step("003", ["explain", "visual", f"{P}/003-cbd.jsonl", "--method", method, "--cbd",
                                  f"{W}/descriptors.jsonl", "-m", VIT, *args, "--no-overlays", "-o", f"{M}/{method}"],
                          f"{M}/{method}/info.json"))
    coarse = ["--steps", str(cfg.eval_steps)] if cfg.eval_steps else []
    steps.append(Step("003", ["eval", "explanations", f"{M}/ala", f"{M}/gradcam", f"{M}/rollout", f"{M}/rise",
                              "--manifest", f"{W}/manifest.jsonl", *coarse, "-o", f"{P}/003-maps.jsonl"],
                      f"{P}/003-maps.jsonl"))
    # grounding: a map per descriptor sentence (Grad-CAM, RISE), scored against the region the sentence names
    rise = ["--masks", str(cfg.grounding_masks), "--seed", str(s)] + \
        (["--limit", str(cfg.grounding_rise)] if cfg.grounding_rise else [])
    for method, args in (("gradcam", []), ("rise", rise)):
        steps.append(Step("003", ["explain", "visual", f"{P}/003-cbd.jsonl", "--method", method, "--cbd",
                                  f"{W}/descriptors.jsonl", "--descriptors", f"{W}/descriptors.jsonl", "-m", VIT,
                                  *args, "--no-overlays", "-o", f"{M}/{method}-desc"], f"{M}/{method}-desc/info.json"))
    steps.append(Step("003", ["eval", "explanations", f"{M}/gradcam-desc", f"{M}/rise-desc", "--descriptors",
                              "--manifest", f"{W}/manifest.jsonl", "-o", f"{P}/003-grounding.jsonl"],
                      f"{P}/003-grounding.jsonl"))
    # 004: in / out of domain
    test = ["--where", "split=test"]
    steps.append(Step("004", ["classify", f"{S}/img-r", "--method", "clip", "--classes", f"{W}/classes.txt", *test,
                              "-o", f"{P}/004-clip.jsonl"], f"{P}/004-clip.jsonl"))
    steps.append(Step("004", ["classify", f"{S}/img-r", "--method", "cbd", "-d", f"{W}/descriptors.jsonl",
                              "--no-explain", *test, "-o", f"{P}/004-cbd.jsonl"], f"{P}/004-cbd.jsonl"))
    fit = [*photo_train, "--val-fraction", "0", "--patience", "0", "--epochs", str(cfg.epochs), *seed]
    heads = {"probe": ["train", "probe", f"{S}/img-r", "-o", f"{H}/probe", *fit],
             "lads": ["train", "lads", f"{S}/img-r", "-o", f"{H}/lads", *fit, "--source", "a photo of a {}.",
                      "--target", "a painting of a {}."],
             "lare": ["train", "lare", f"{S}/img-r", "-o", f"{H}/lare", *fit, "--samples", str(cfg.samples)]}
    for shots in cfg.shots.split(","):
        for method, k in (("probe", 0), ("lare", cfg.samples)):
            heads[f"fewshot-{method}-{shots}"] = ["train", "lare", f"{S}/img-r", "-o", f"{H}/fewshot-{method}-{shots}",
                                                  *fit, "--samples", str(k), "--shots", shots]
    for name, argv in heads.items():
        steps.append(Step("004", argv, f"{H}/{name}.json"))
        steps.append(Step("004", ["classify", f"{S}/img-r", "--head", f"{H}/{name}", *test,
                                  "-o", f"{P}/004-{name}.jsonl"], f"{P}/004-{name}.jsonl"))
    return steps


def subset_maps(out: Path, predictions: str, kept: str, manifest: str, per_class: str, classes: str = "0") -> None:
    """The first ``per_class`` test photos of each class (of the first ``classes`` classes of the world's
    class list; 0: all): their CBD predictions (for Grad-CAM, rollout, RISE) and their manifest rows (for
    ALA, which explains its own prediction)."""
    rows = [json.loads(line) for line in (out / predictions).read_text().splitlines() if line.strip()]
    world = Path(manifest).parent
    names = [c for c in (out / world / "classes.txt").read_text(encoding="utf-8").splitlines() if c]
    wanted = set(names[:int(classes)] if int(classes) else names)
    count: dict[str, int] = {}
    keep = []
    for r in rows:
        if r["label"] in wanted and count.get(r["label"], 0) < int(per_class):
            count[r["label"]] = count.get(r["label"], 0) + 1
            keep.append(r)
    ids = {r["id"] for r in keep}
    manifest_rows = [json.loads(line) for line in (out / world / "manifest.jsonl").read_text().splitlines()]
    _write_lines(out / kept, keep)
    _write_lines(out / manifest, [m for m in manifest_rows if m["id"] in ids])  # paths stay relative to the world


def _write_lines(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running

def run_steps(out: Path, steps: list[Step], log) -> dict:
    from vlmtools.cli.app import app

    timings: dict[str, float] = {}
    for n, step in enumerate(steps, 1):
        if (out / step.done).exists():
            continue
        log(f"[{n}/{len(steps)}] {step.shell()}")
        start = time.perf_counter()
        if step.python is not None:
            step.python(out, *step.argv[1:])
        else:
            _run_vlmtools(app, out, step)
        seconds = time.perf_counter() - start
        timings[step.study] = timings.get(step.study, 0.0) + seconds
        log(f"    {seconds:.1f} s")
    return timings


def _run_vlmtools(app, out: Path, step: Step) -> None:
    cwd = os.getcwd()
    os.chdir(out)
    try:
        with contextlib.ExitStack() as stack:
            tmp = None
            if step.stdout:
                tmp = Path(step.stdout + ".tmp")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                fh = stack.enter_context(open(tmp, "w"))
                stack.enter_context(contextlib.redirect_stdout(fh))
            code = app(step.argv, standalone_mode=False, prog_name="vlmtools")
        if code not in (None, 0):
            raise SystemExit(f"step failed (exit {code}): {step.shell()}")
        if tmp is not None:
            os.replace(tmp, step.stdout)
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- statistics

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def correct(path: Path, k: int = 1, where: dict | None = None) -> dict[str, bool]:
    """id -> whether the true label is in the top k, for the rows matching ``where``."""
    out = {}
    for r in read_jsonl(path):
        if where and any(r.get(key) != value for key, value in where.items()):
            continue
        top = [t["class"] for t in r.get("topk", [])][:k] if k > 1 else [r["pred"]]
        out[r["id"]] = r["label"] in top
    return out


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mcnemar_pooled(a: list[dict[str, bool]], b: list[dict[str, bool]]) -> tuple[int, int, float]:
    """(only A right, only B right, exact two-sided p) over the images of every seed (paired by seed, id)."""
    from vlmtools.evaluate import mcnemar

    only_a = only_b = 0
    for ra, rb in zip(a, b):
        for key in ra.keys() & rb.keys():
            only_a += ra[key] and not rb[key]
            only_b += rb[key] and not ra[key]
    return only_a, only_b, float(mcnemar(only_a, only_b)["p_exact"])


def paired_bootstrap(diffs: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float, float, float]:
    """Mean paired difference, its 95% percentile interval, and the two-sided bootstrap p of "no difference"."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (n, len(diffs)))].mean(axis=1)
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return float(diffs.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), float(p)


def pct(mean_sd) -> str:
    m, s = mean_sd
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def pval(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


# ----------------------------------------------------------------------------- the tables

# the file whose existence means a seed has finished a study (its last step's output)
FINISHED = {"000": "000-background.jsonl", "001": "001-class-mix-t2i-050.jsonl", "003": "003-grounding.jsonl",
            "004": "004-lare.jsonl"}
PHOTO, PAINTING = {"domain": "photo"}, {"domain": "painting"}


def tables(out: Path, seeds: list[int], cfg: Config, studies=STUDIES) -> tuple[dict, dict]:
    """({table name: rows}, {study: the seeds it is over}): each study's tables over the seeds that have
    finished it (a run cut short still gives the tables of what finished)."""
    result, over = {}, {}
    makers = {"000": table_000, "001": table_001, "003": table_003, "004": table_004}
    for study in studies:
        done = [s for s in seeds if (out / f"s{s}" / "pred" / FINISHED[study]).exists()]
        if done:
            over[study] = done
            result.update(makers[study]([out / f"s{s}" / "pred" for s in done], done, cfg))
    return result, over


def table_000(P: list[Path], seeds: list[int], cfg: Config) -> dict:
    result = {}
    rows = [["row", "top-1 %", "top-5 %", "vs row above: only above / only this / McNemar p"]]
    names = [("names", "CLIP (class names)"), ("cbd", "CBD (vague descriptors)"),
             ("exemplar", "domain exemplar (object descriptors)"), ("background", "+ background (habitat line)")]
    prev = None
    for key, label in names:
        runs = [correct(p / f"000-{key}.jsonl") for p in P]
        top5 = [correct(p / f"000-{key}.jsonl", 5) for p in P]
        test = ""
        if prev is not None:
            a, b, p = mcnemar_pooled(prev, runs)
            test = f"{a} / {b} / {pval(p)}"
        rows.append([label, pct(mean_std(np.mean(list(r.values())) for r in runs)),
                     pct(mean_std(np.mean(list(r.values())) for r in top5)), test])
        prev = runs
    result["000"] = rows
    return result


def table_001(P: list[Path], seeds: list[int], cfg: Config) -> dict:
    result = {}
    sweeps = {}
    for balance in ("class", "global"):
        for text in ("raw", "t2i"):
            per_seed = [read_jsonl(p / f"001-{balance}-{text}.jsonl") for p in P]
            sweeps[(balance, text)] = per_seed
    ratios = [r["image_ratio"] for r in sweeps[("class", "raw")][0]]
    head = ["image %", "image only, class-balanced", "image only, global", "+ text, class-balanced",
            "+ text, global", "+ text via t2i, class-balanced", "+ text via t2i, global"]
    rows = [head]

    def cell(balance, text, i, key):
        vals = [seed_rows[i].get(key) for seed_rows in sweeps[(balance, text)]]
        return "–" if any(v is None for v in vals) else pct(mean_std(vals))

    for i, ratio in enumerate(ratios):
        rows.append([f"{100 * ratio:g}", cell("class", "raw", i, "image_only"), cell("global", "raw", i, "image_only"),
                     cell("class", "raw", i, "image_text"), cell("global", "raw", i, "image_text"),
                     cell("class", "t2i", i, "image_text"), cell("global", "t2i", i, "image_text")])
    low = f"{round(100 * min(float(r) for r in cfg.sweep.split(',') if float(r) > 0)):03d}"
    tests = []
    for a_name, b_name, what in ((f"001-global-image-{low}", f"001-class-image-{low}",
                                  f"image only at {int(low)}%: global vs class-balanced"),
                                 ("001-class-image-050", "001-class-mix-raw-050", "50%, class-balanced: image only vs + text"),
                                 ("001-class-mix-raw-050", "001-class-mix-t2i-050", "50% + text: raw vs via t2i")):
        a, b, p = mcnemar_pooled([correct(q / f"{a_name}.jsonl") for q in P], [correct(q / f"{b_name}.jsonl") for q in P])
        tests.append([what, f"only first right {a}, only second {b}, McNemar p = {pval(p)}"])
    result["001"] = rows
    result["001-tests"] = [["paired test (test photos, all seeds)", "result"]] + tests
    return result


def table_003(P: list[Path], seeds: list[int], cfg: Config) -> dict:
    result = {}
    maps = [read_jsonl(p / "003-maps.jsonl") for p in P]
    methods = []
    for rows_ in maps:
        for r in rows_:
            if r["method"] not in methods:
                methods.append(r["method"])
    keys = [("iou", "mIoU ↑"), ("iou_ceiling", "lattice ceiling"), ("insertion", "Ins ↑"), ("deletion", "Del ↓"),
            ("id_score", "ID ↑")]
    rows = [["method"] + [k[1] for k in keys] + ["maps"]]
    per_image: dict[str, dict] = {}
    for m in methods:
        line = [m]
        for key, _ in keys:
            seed_means = [np.mean([r[key] for r in rows_ if r["method"] == m and key in r]) for rows_ in maps
                          if any(r["method"] == m and key in r for r in rows_)]
            line.append("–" if not seed_means else f"{np.mean(seed_means):.3f} ± "
                        f"{(np.std(seed_means, ddof=1) if len(seed_means) > 1 else 0):.3f}")
        line.append(str(sum(r["method"] == m for rows_ in maps for r in rows_)))
        rows.append(line)
        per_image[m] = {(s, r["id"]): r for s, rows_ in zip(seeds, maps) for r in rows_ if r["method"] == m}
    tests = []
    for a, b in (("ala", "rise"), ("ala", "gradcam"), ("ala", "rollout"), ("rollout", "rise"), ("rise", "gradcam")):
        if a in per_image and b in per_image:
            common = sorted(per_image[a].keys() & per_image[b].keys())
            for key, label in (("iou", "mIoU"), ("id_score", "ID")):
                d = np.array([per_image[a][c].get(key, np.nan) - per_image[b][c].get(key, np.nan) for c in common])
                d = d[np.isfinite(d)]
                if len(d):
                    mean, lo, hi, p = paired_bootstrap(d)
                    shown = f"= {pval(p)}" if p > 0 else "< 1e-4"  # 10,000 resamples resolve no smaller p
                    tests.append([f"{a} − {b}, {label}", f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] over {len(d)} images, "
                                  f"bootstrap p {shown}"])
    result["003"] = rows
    result["003-tests"] = [["paired test (per image, all seeds)", "result"]] + tests
    result["003-grounding"] = table_grounding([read_jsonl(p / "003-grounding.jsonl") for p in P])
    return result


def table_grounding(per_seed: list[list[dict]]) -> list[list[str]]:
    """Per method and region kind: how often a descriptor's map peaks on the region it names (hit), the
    region's share of the image (a random peak's hit rate), the map's mass inside it (energy); mean ± std
    over seeds."""
    methods = []
    for rows_ in per_seed:
        for r in rows_:
            if r["method"] not in methods:
                methods.append(r["method"])
    rows = [["method", "descriptors", "hit ↑", "chance", "energy ↑", "maps"]]
    for m in methods:
        for kind in ("object", "background"):
            cells = []
            for key in ("hit", "chance", "energy"):
                seed_means = [np.mean([float(r[key]) for r in rows_ if r["method"] == m and r["kind"] == kind])
                              for rows_ in per_seed if any(r["method"] == m and r["kind"] == kind for r in rows_)]
                cells.append("–" if not seed_means else f"{np.mean(seed_means):.3f} ± "
                             f"{(np.std(seed_means, ddof=1) if len(seed_means) > 1 else 0):.3f}")
            n = sum(r["method"] == m and r["kind"] == kind for rows_ in per_seed for r in rows_)
            if n:
                rows.append([m, kind, *cells, str(n)])
    return rows


def table_004(P: list[Path], seeds: list[int], cfg: Config) -> dict:
    result, photo = {}, PHOTO
    rows = [["method", "in domain (photo) %", "out of domain (painting) %", "drop"]]
    by = {}
    for key, label in (("clip", "CLIP zero-shot (names)"), ("cbd", "CBD zero-shot (descriptors)"),
                       ("probe", "probe"), ("lads", "LADS"), ("lare", "LARE")):
        ins = [correct(p / f"004-{key}.jsonl", where=photo) for p in P]
        outs = [correct(p / f"004-{key}.jsonl", where=PAINTING) for p in P]
        by[key] = (ins, outs)
        a_in = [np.mean(list(r.values())) for r in ins]
        a_out = [np.mean(list(r.values())) for r in outs]
        rows.append([label, pct(mean_std(a_in)), pct(mean_std(a_out)),
                     f"{100 * (np.mean(a_in) - np.mean(a_out)):.2f}"])
    tests = []
    for a, b in (("probe", "lare"), ("probe", "lads"), ("cbd", "probe")):
        for d, idx in (("in domain", 0), ("out of domain", 1)):
            x, y, p = mcnemar_pooled(by[a][idx], by[b][idx])
            tests.append([f"{a} vs {b}, {d}", f"only {a} right {x}, only {b} {y}, McNemar p = {pval(p)}"])
    result["004"] = rows
    result["004-tests"] = [["paired test (test images, all seeds)", "result"]] + tests
    rows = [["shots", "probe in %", "LARE in %", "probe out %", "LARE out %"]]
    for shots in cfg.shots.split(","):
        line = [shots]
        for where in (photo, PAINTING):
            for method in ("probe", "lare"):
                accs = [np.mean(list(correct(p / f"004-fewshot-{method}-{shots}.jsonl", where=where).values()))
                        for p in P]
                line.append(pct(mean_std(accs)))
        rows.append([line[0], line[1], line[2], line[3], line[4]])
    result["004-fewshot"] = rows
    return result


def aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="reproduce-synth")
    ap.add_argument("--quick", action="store_true", help="2 seeds, a small world, fewer maps and epochs (CI smoke)")
    ap.add_argument("--seeds", type=int, default=None, help="world seeds 0..N-1 [5; --quick: 2]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    ap.add_argument("--studies", default=",".join(STUDIES), help="comma list of studies to run")
    ap.add_argument("--tables-only", action="store_true", help="run nothing: the tables of what has finished")
    ap.add_argument("--dry-run", action="store_true", help="run nothing: write OUT/pipeline.sh and list the steps")
    args = ap.parse_args()
    cfg = QUICK if args.quick else Config()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    studies = args.studies.split(",")
    bad = [s for s in studies if s not in STUDIES]
    if bad or args.seeds is not None and args.seeds < 1:
        ap.error(f"--studies: {bad[0]!r} is not one of {','.join(STUDIES)}" if bad else "--seeds must be at least 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from vlmtools.console import info, set_quiet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seeds))
    steps = [st for s in seeds for st in seed_steps(s, cfg) if st.study in ["world", *studies]]
    (out / "pipeline.sh").write_text("#!/bin/sh\n# The steps reproduce_all ran, from this directory.\nset -e\n"
                                     + "".join(st.shell() + "\n" for st in steps))
    if args.dry_run:
        print("".join(st.shell() + "\n" for st in steps), end="")
        return
    start = time.perf_counter()
    timings = {}
    if not args.tables_only:
        set_quiet(True)
        try:
            timings = run_steps(out, steps, lambda m: print(m, file=sys.stderr, flush=True))
        finally:
            set_quiet(False)
    result, over = tables(out, seeds, cfg, studies)
    (out / "tables").mkdir(exist_ok=True)
    text = []
    for name, rows in result.items():
        (out / "tables" / f"{name}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
        n = len(over[name.split("-")[0]])
        text.append(f"== {name} ({n} seed{'s' if n > 1 else ''})\n{aligned(rows)}\n")
    missing = [s for s in studies if s not in over]
    if missing:
        text.append(f"(no seed has finished stud{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)} yet)\n")
    total = time.perf_counter() - start
    (out / "tables.txt").write_text("\n".join(text))
    previous = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    for k, v in timings.items():
        previous[k] = round(previous.get(k, 0.0) + v, 1)
    if not args.tables_only:
        previous["last_run_seconds"] = round(total, 1)
    previous["config"] = {**cfg.__dict__, "quick": args.quick}
    (out / "timings.json").write_text(json.dumps(previous, indent=2) + "\n")
    print("\n".join(text))
    info(f"{len(seeds)} seeds in {total / 60:.1f} min; tables in {out}/tables/ and {out}/tables.txt")


if __name__ == "__main__":
    main()
