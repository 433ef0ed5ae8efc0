"""A hostile pass over the command line, the kinds of bad input and fault of issue 22, tried as a user with
bad luck or bad intent would: every case runs the real `vlmtools` executable in a subprocess and is judged
good, weak or bad.

  bad   a silent wrong result or a leak: exit 0 on damaged input, a secret or an escape sequence that
        reaches a file or the terminal, a path followed outside its directory, NaN written as JSON, a
        wait far past a deadline, memory eaten without bound
  weak  refused, but not as documented: another exit code than 2 for bad input (3 = a crash, 1), a
        traceback, a half-written output left behind, a 500, a message that does not name the problem
  good  refused (or handled) as documented: the right exit code, a one-line error, nothing half-written

    python benchmarks/hostile.py --vlmtools .venv/bin/vlmtools --out hostile-after.jsonl
    python benchmarks/hostile.py --vlmtools /path/to/old/.venv/bin/vlmtools --out hostile-before.jsonl

Prints the counts by class and verdict (and writes one JSON line per case). Each case builds its own
input in a scratch directory from one small world (synth make, tiny random-weight model, a probe head, an
index). Commands that could eat memory without bound run under `ulimit -v`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tests.hostile_server import (ECHO_PLACES, HostileServer, chat_body, echo_auth, http_response,  # noqa: E402
                                  trickle)

TINY = ["--model", "vlmtools-tiny", "--pretrained", "none", "--device", "cpu"]
KEY = "sk-hostile-KEY-0123456789abcdef"
MEM_LIMIT_KB = 4 * 1024 * 1024  # ulimit -v for commands that read what they are told to (torch needs ~3 GiB)
RESULTS: list[dict] = []


class Run:
    def __init__(self, proc: subprocess.CompletedProcess | None, seconds: float, timed_out: bool = False):
        self.rc = None if proc is None else proc.returncode
        self.out = "" if proc is None else proc.stdout
        self.err = "" if proc is None else proc.stderr
        self.seconds, self.timed_out = seconds, timed_out

    @property
    def one_line(self) -> bool:
        lines = [x for x in self.err.strip().splitlines() if x.startswith("error:")]
        return len(lines) == 1 and "Traceback" not in self.err


class Harness:
    def __init__(self, vlmtools: str, root: Path):
        self.vlmtools, self.root = vlmtools, root
        self.env = {**os.environ, "VLMTOOLS_PROGRESS": "0", "OPENAI_API_KEY": KEY,
                    "VLMTOOLS_CACHE_DIR": str(root / "cache")}
        self.env.pop("OPENAI_BASE_URL", None)
        self.n = 0

    def run(self, *args, timeout: float = 180, limit_memory: bool = False, env: dict | None = None) -> Run:
        cmd = [self.vlmtools, *map(str, args)]
        if limit_memory:
            cmd = ["bash", "-c", f"ulimit -v {MEM_LIMIT_KB}; exec \"$@\"", "bash", *cmd]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**self.env, **(env or {})}, errors="replace")
        except subprocess.TimeoutExpired:
            return Run(None, time.monotonic() - started, timed_out=True)
        return Run(proc, time.monotonic() - started)

    def scratch(self) -> Path:
        self.n += 1
        d = self.root / f"case{self.n:03d}"
        d.mkdir()
        return d


def record(cls: str, name: str, verdict: str, note: str) -> None:
    RESULTS.append({"class": cls, "case": name, "verdict": verdict, "note": note[:300]})
    print(f"{verdict:5s} {cls:28s} {name:40s} {note[:110]}", flush=True)


def judge_refusal(run: Run, *, outputs=(), code: int = 2, bad_if_zero: bool = True,
                  several: bool = False) -> tuple[str, str]:
    """The usual rule for bad input: ``code`` with one line and nothing written is good; exit 0 is bad
    (a silent result) unless ``bad_if_zero`` is false; any other refusal is weak. ``several``: a command
    that lists every problem it finds (store check), one line each."""
    left = [str(o) for o in outputs if Path(o).exists()]
    first = next((x for x in run.err.splitlines() if x.startswith("error:")), run.err.strip()[:150])
    if run.timed_out:
        return "bad", f"no answer within the time limit ({run.seconds:.0f} s)"
    if run.rc == 0:
        return ("bad" if bad_if_zero else "weak"), f"exit 0: {run.err.strip()[-150:]}"
    lines_ok = run.one_line or (several and "Traceback" not in run.err and first.startswith("error:"))
    if run.rc == code and lines_ok and not left:
        return "good", f"exit {run.rc}: {first}"
    why = [f"exit {run.rc}"] + (["traceback"] if "Traceback" in run.err else []) + \
        ([f"left {', '.join(left)}"] if left else [])
    return "weak", f"{'; '.join(why)}: {first}"


# ----------------------------------------------------------------------------- the world

def build_world(h: Harness) -> Path:
    w = h.root / "world"
    steps = [
        ("synth", "make", w / "synth", "--classes", "4", "--per-class", "6"),
        ("embed", "images", w / "synth" / "manifest.jsonl", "-o", w / "store", "--workers", "0", "--shard-size",
         "8", *TINY),
        ("train", "probe", w / "store", "-o", w / "head", "--epochs", "3", "--val-fraction", "0"),
        ("index", w / "store"),
    ]
    for args in steps:
        r = h.run(*args)
        if r.rc != 0:
            raise SystemExit(f"world: {args[:2]} failed: {r.err}")
    return w


def copy_store(w: Path, d: Path) -> Path:
    shutil.copytree(w / "store", d / "store")
    return d / "store"


def copy_head(w: Path, d: Path) -> Path:
    for suffix in (".json", ".safetensors"):
        shutil.copy(w / f"head{suffix}", d / f"head{suffix}")
    return d / "head"


# ----------------------------------------------------------------------------- security

def describe(h: Harness, d: Path, url: str, *extra) -> Run:
    (d / "classes.txt").write_text("Puffin\n")
    return h.run("describe", d / "classes.txt", "-o", d / "out.jsonl", "--base-url", url, "--max-retries", "0",
                 *extra, timeout=300)


def written(d: Path, root: Path) -> str:
    files = list(d.rglob("*")) + list((root / "cache").rglob("*"))
    return "".join(p.read_text(errors="replace") for p in files if p.is_file())


def security(h: Harness, w: Path) -> None:
    cls = "security"
    for where in ECHO_PLACES:
        d = h.scratch()
        server = HostileServer(echo_auth(where))
        shutil.rmtree(h.root / "cache", ignore_errors=True)
        run = describe(h, d, server.url, "--keep-raw")
        server.close()
        shown = written(d, h.root) + run.err + run.out
        leaked = [f for f in (KEY, base64.b64encode(KEY.encode()).decode()) if f in shown]
        record(cls, f"describe key echoed: {where}", "bad" if leaked else "good",
               f"leaked {len(leaked)} form(s) (exit {run.rc})" if leaked else f"no form of the key anywhere (exit {run.rc})")

    d = h.scratch()
    server = HostileServer(lambda r: [(http_response(json.dumps(
        {"error": {"message": "auth was " + r["headers"].get("authorization", "none")}}), 400), 0)])
    run = describe(h, d, server.url.replace("http://", "http://alice:pa55word-xyz@"))
    server.close()
    sent = server.requests[0]["headers"].get("authorization", "") if server.requests else ""
    b64 = base64.b64encode(b"alice:pa55word-xyz").decode()
    shown = written(d, h.root) + run.err + run.out
    verdict = "bad" if (b64 in shown or "pa55word-xyz" in shown) else "good"
    record(cls, "base-url userinfo: credentials shown", verdict, f"Authorization sent: {sent[:30]!r}")
    record(cls, "base-url userinfo: sent as Basic", "weak" if sent.startswith("Basic") else "good",
           f"Authorization sent: {sent[:12]!r}...")

    for name, message in (("ANSI colour + title", "boom \x1b[31mRED\x1b]0;pwned\x07"),
                          ("C1 CSI clear screen", "boom \x9b2J")):
        d = h.scratch()
        server = HostileServer(lambda r, m=message: [(http_response(json.dumps({"error": {"message": m}}), 500), 0)])
        run = describe(h, d, server.url)
        server.close()
        raw = [c for c in ("\x1b", "\x07", "\x9b") if c in run.err]
        record(cls, f"terminal: {name} in a server error", "bad" if raw else "good",
               f"raw control characters on stderr: {raw!r}" if raw else "shown escaped")

    for name, path in (("../", "../secret.npy"), ("absolute", "{d}/secret.npy"), ("symlink out", "link.npy")):
        d = h.scratch()
        argv = maps_dir(w, d, rows=[{"id": "00000", "class": "x", "map": path.format(d=d)}])
        np.save(d / "secret.npy", np.random.default_rng(1).random((64, 64)).astype(np.float16))
        if path == "link.npy":
            (d / "maps" / "link.npy").symlink_to(d / "secret.npy")
        run = h.run(*argv)
        verdict, note = judge_refusal(run, outputs=[d / "out.jsonl"])
        record(cls, f"eval explanations map path {name}", verdict, note)


# ----------------------------------------------------------------------------- maps directories

def maps_dir(w: Path, d: Path, rows=None, arrays=None, causal=False) -> list:
    manifest = [json.loads(x) for x in (w / "synth" / "manifest.jsonl").read_text().splitlines()][:2]
    for rec in manifest:
        rec["path"] = str((w / "synth" / rec["path"]).resolve()) if not os.path.isabs(rec["path"]) else rec["path"]
        rec["mask"] = str((w / "synth" / rec["mask"]).resolve()) if not os.path.isabs(rec["mask"]) else rec["mask"]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    m = d / "maps"
    m.mkdir()
    classes = [x for x in (w / "synth" / "classes.txt").read_text().splitlines() if x]
    (m / "info.json").write_text(json.dumps({"format": "vlmtools.maps/1", "method": "rise", "model": {
        "name": "vlmtools-tiny", "pretrained": "none"}, "classes": classes, "templates": ["a photo of a {}."],
        "settings": {}}))
    arrays = arrays or {}
    for rec in manifest:
        np.save(m / f"{rec['id']}.npy", arrays.get(rec["id"], np.random.default_rng(0).random((64, 64))).astype(np.float16))
    rows = rows if rows is not None else [{"id": r["id"], "class": r["label"], "map": f"{r['id']}.npy"}
                                          for r in manifest]
    (m / "maps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["eval", "explanations", m, "--manifest", d / "m.jsonl", "--causal" if causal else "--no-causal",
            "-o", d / "out.jsonl", "--device", "cpu"]


# ----------------------------------------------------------------------------- silent wrong results

def silent(h: Harness, w: Path) -> None:
    cls = "silent wrong / lost work"
    d = h.scratch()
    server = HostileServer(lambda r: trickle(http_response(chat_body("- wings")), 1.0))
    run = describe(h, d, server.url, "--timeout", "3")
    server.close()
    record(cls, "describe: server trickles 1 byte/s, --timeout 3", "bad" if run.seconds > 30 else "good",
           f"{run.seconds:.0f} s, exit {run.rc}")

    d = h.scratch()
    copy_head(w, d)
    (d / "head.json").unlink()
    (d / "head.json").symlink_to("/dev/zero")
    run = h.run("classify", w / "store", "--head", d / "head", "-o", d / "p.jsonl", limit_memory=True, timeout=120)
    verdict, note = judge_refusal(run, outputs=[d / "p.jsonl"])
    if "MemoryError" in run.err or run.timed_out:
        verdict, note = "bad", f"read until memory ran out (limit {MEM_LIMIT_KB >> 20} GiB): exit {run.rc}"
    record(cls, "head JSON is /dev/zero", verdict, note)

    d = h.scratch()
    head = copy_head(w, d)
    nan_weights(d)
    run = h.run("classify", w / "store", "--head", head, "-o", d / "p.jsonl")
    if run.rc == 0:
        text = (d / "p.jsonl").read_text() if (d / "p.jsonl").exists() else ""
        verdict, note = "bad", "exit 0" + (", NaN written into JSON" if "NaN" in text else "")
    else:
        verdict, note = judge_refusal(run, outputs=[d / "p.jsonl"])
    record(cls, "head with NaN weights", verdict, note)

    for option, value in (("--weight-decay", "inf"), ("--lr", "1e30"), ("--lr", "nan"), ("--weight-decay", "1e9")):
        d = h.scratch()
        run = h.run("train", "probe", w / "store", "-o", d / "head", "--epochs", "2", option, value)
        nan = (d / "head.safetensors").exists() and not finite_head(d / "head.safetensors")
        verdict, note = judge_refusal(run, outputs=[d / "head.json"])
        if run.rc == 0:
            verdict, note = "bad", "exit 0" + (" with NaN weights" if nan else "")
        record(cls, f"train {option} {value}", verdict, note)

    d = h.scratch()
    head = copy_head(w, d)
    other = h.run("train", "probe", w / "store", "-o", d / "other", "--epochs", "3", "--seed", "9")
    shutil.copy(d / "other.safetensors", d / "head.safetensors")  # what kill -9 between the renames leaves
    run = h.run("classify", w / "store", "--head", head, "-o", d / "p.jsonl")
    verdict, note = judge_refusal(run, outputs=[d / "p.jsonl"])
    record(cls, "head: new weights beside an old JSON", verdict, note if other.rc == 0 else "setup failed")

    d = h.scratch()
    rows = [json.loads(x) for x in (w / "synth" / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        r["path"] = str((w / "synth" / r["path"]).resolve())
        r["id"] = "other-" + r["id"]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    h.run("embed", "images", d / "m.jsonl", "-o", d / "other", "--workers", "0", "--shard-size", "8", *TINY)
    for name in ("index.faiss", "index.json"):
        shutil.copy(w / "store" / name, d / "other" / name)
    run = h.run("search", d / "other", "--id", rows[0]["id"], "-k", "1")
    hit = json.loads(run.out.splitlines()[0])["id"] if run.rc == 0 and run.out.strip() else None
    used = "stale" not in run.err
    verdict = "bad" if used and hit != rows[0]["id"] else ("weak" if used else "good")
    record(cls, "index copied from another store of the same shape", verdict,
           f"exit {run.rc}, top hit {hit!r} for {rows[0]['id']!r}; {'index used' if used else 'index refused'}")

    for name, kwargs in (("all-NaN map", {"arrays": {"00000": np.full((64, 64), np.nan)}}),
                         ("map with inf", {"arrays": {"00001": np.where(np.eye(64) > 0, np.inf, 0.5)}}),
                         ("repeated id", {"rows": "repeat"})):
        d = h.scratch()
        if kwargs.get("rows") == "repeat":
            argv = maps_dir(w, d, rows=[{"id": "00000", "class": "x", "map": "00000.npy"},
                                        {"id": "00000", "class": "x", "map": "00001.npy"}])
        else:
            argv = maps_dir(w, d, **kwargs)
        run = h.run(*argv)
        verdict, note = judge_refusal(run, outputs=[d / "out.jsonl"])
        record(cls, f"eval explanations: {name}", verdict, note)


def nan_weights(d: Path, change=None, digest=True) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = {k: (change(v) if change else v * float("nan")) for k, v in load_file(d / "head.safetensors").items()}
    save_file(state, d / "head.safetensors")
    info = json.loads((d / "head.json").read_text())
    if digest and "weights_sha256" in info:  # a writer that recorded what it wrote
        import hashlib

        info["weights_sha256"] = hashlib.sha256((d / "head.safetensors").read_bytes()).hexdigest()
        (d / "head.json").write_text(json.dumps(info))
    del torch


def finite_head(path: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(v).all()) for v in load_file(path).values())


# ----------------------------------------------------------------------------- weak classes

def weak_heads_and_training(h: Harness, w: Path) -> None:
    cls = "configs and training sets"

    def edit(d, change):
        info = json.loads((d / "head.json").read_text())
        change(info)
        (d / "head.json").write_text(json.dumps(info))

    def huge(info):
        n = len(info["classes"])
        info["config"]["n_classes"] = 10 ** 12
        info["tensors"] = {k: [10 ** 12, *v[1:]] if v and v[0] == n else v for k, v in info["tensors"].items()}

    for name, change in (("n_classes -1", lambda i: i["config"].update(n_classes=-1)), ("n_classes 10^12", huge),
                         ("input_dim 0", lambda i: i["config"].update(input_dim=0))):
        d = h.scratch()
        head = copy_head(w, d)
        edit(d, change)
        run = h.run("classify", w / "store", "--head", head, "-o", d / "p.jsonl", limit_memory=True)
        record(cls, f"head config {name}", *judge_refusal(run, outputs=[d / "p.jsonl"]))
    d = h.scratch()
    head = copy_head(w, d)
    import torch

    nan_weights(d, change=lambda v: v.to(torch.int32))
    run = h.run("classify", w / "store", "--head", head, "-o", d / "p.jsonl")
    record(cls, "head with integer tensors", *judge_refusal(run, outputs=[d / "p.jsonl"]))

    classes = [x for x in (w / "synth" / "classes.txt").read_text().splitlines() if x]
    d = h.scratch()
    run = h.run("train", "probe", w / "store", "-o", d / "head", "--where", f"label={classes[0]}")
    record(cls, "train on one class", *judge_refusal(run, outputs=[d / "head.json"]))
    d = h.scratch()
    rows = [json.loads(x) for x in (w / "synth" / "manifest.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["path"] = str((w / "synth" / r["path"]).resolve())
        if i % 3 == 0:
            r["label"] = ""
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    h.run("embed", "images", d / "m.jsonl", "-o", d / "s", "--workers", "0", *TINY)
    run = h.run("train", "probe", d / "s", "-o", d / "head")
    record(cls, "train with empty-string labels", *judge_refusal(run, outputs=[d / "head.json"]))
    d = h.scratch()
    for i, r in enumerate(rows[:8]):
        r["label"] = classes[i % 2]
        if i % 4:
            (d / f"{i}.png").write_bytes(b"not an image")
            r["path"] = str(d / f"{i}.png")
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    run = h.run("train", "ala", d / "m.jsonl", "-o", d / "ala", "--epochs", "1", "--val-fraction", "0", *TINY[:4])
    verdict = "good" if run.rc in (1, 2) and "Traceback" not in run.err else ("bad" if run.rc == 0 else "weak")
    record(cls, "train ala, 6 of 8 images unreadable", verdict, f"exit {run.rc}: {run.err.strip().splitlines()[-1][:120]}")


def store_check(h: Harness, w: Path) -> None:
    cls = "store check"

    def edit_info(key, value):
        def f(s):
            info = json.loads((s / "info.json").read_text())
            info[key] = value
            (s / "info.json").write_text(json.dumps(info))
        return f

    def rows(change):
        def f(s):
            a = np.load(s / "emb-00001.npy").copy()
            change(a)
            np.save(s / "emb-00001.npy", a)
        return f

    def swap(s):
        a, b = s / "meta-00000.jsonl", s / "meta-00001.jsonl"
        ta = a.read_text()
        a.write_text(b.read_text())
        b.write_text(ta)

    damages = [
        ("edited dtype", edit_info("dtype", "float32")), ("edited kind", edit_info("kind", "text")),
        ("edited model", edit_info("model", {"name": "vlmtools-micro", "pretrained": "vlmtools"})),
        ("extra bytes after an NPY", lambda s: open(s / "emb-00001.npy", "ab").write(b"\0" * 16)),
        ("stray .npy", lambda s: shutil.copy(s / "emb-00001.npy", s / "emb-00001-old.npy")),
        ("non-unit rows", rows(lambda a: a.__setitem__(slice(0, 2), a[0:2] * 50))),
        ("all-zero row", rows(lambda a: a.__setitem__(3, 0))),
        ("swapped meta files", swap),
        ("truncated index.faiss", lambda s: (s / "index.faiss").write_bytes((s / "index.faiss").read_bytes()[:200])),
    ]
    for name, damage in damages:
        d = h.scratch()
        s = copy_store(w, d)
        damage(s)
        run = h.run("store", "check", s)
        record(cls, f"store check: {name}", *judge_refusal(run, several=True))
    d = h.scratch()
    s = copy_store(w, d)
    for f in ("emb-00001.npy", "meta-00001.jsonl"):
        (s / f).unlink()
    run = h.run("store", "info", s, "--json")
    try:
        summary = json.loads(run.out)
        ok = summary["rows"] > 0 and summary["missing_shards"] == [1]
        note = f"rows {summary['rows']}, missing_shards {summary['missing_shards']}"
    except (ValueError, KeyError):
        ok, note = False, f"exit {run.rc}"
    record(cls, "store info: a shard deleted", "good" if ok else "weak", note)


def exit_codes(h: Harness, w: Path) -> None:
    cls = "exit codes"
    d = h.scratch()
    run = h.run(*maps_dir(w, d, rows=[{"id": "00000", "class": "x", "map": "gone.npy"}]))
    record(cls, "eval explanations: missing map file", *judge_refusal(run, outputs=[d / "out.jsonl"]))
    d = h.scratch()
    argv = maps_dir(w, d, causal=True)
    rows = [json.loads(x) for x in (d / "m.jsonl").read_text().splitlines()]
    rows[0]["path"] = str(d / "gone.png")
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = h.run(*argv)
    record(cls, "eval explanations: missing image file", *judge_refusal(run, outputs=[d / "out.jsonl"]))
    d = h.scratch()
    s = copy_store(w, d)
    (s / "meta-00001.jsonl").unlink()
    (s / "meta-00001.jsonl").mkdir()
    run = h.run("search", s, "--id", "00000", "-k", "1")
    record(cls, "store meta path is a directory", *judge_refusal(run))
    d = h.scratch()
    (d / "run").mkdir()
    (d / "run" / "deep.json").write_text("[" * 100000 + "]" * 100000)
    run = h.run("report", d / "run", "-o", d / "r.html")
    verdict = "good" if run.rc in (0, 2) and "Traceback" not in run.err else "weak"
    record(cls, "report: deeply nested JSON in the run directory", verdict, f"exit {run.rc}: {run.err.strip()[-120:]}")


def explain_visual(h: Harness, w: Path) -> None:
    cls = "explain visual"
    d = h.scratch()
    (d / "m.jsonl").write_text(json.dumps({"id": "x", "path": str(d / "gone.png"), "label": "a"}) + "\n")
    run = h.run("explain", "visual", d / "m.jsonl", "-o", d / "maps", "--no-overlays", *TINY[:4])
    left = (d / "maps").exists()
    record(cls, "nothing readable: exit 2 leaves files", "weak" if left or run.rc != 2 else "good",
           f"exit {run.rc}; maps dir {'left' if left else 'absent'}")
    d = h.scratch()
    (d / "desc.jsonl").write_text('{"class": "a", "descriptors": ["wings"]}\n')
    run = h.run("explain", "visual", w / "synth" / "manifest.jsonl", "-o", d / "maps", "--descriptors",
                d / "desc.jsonl", "--class", "zzz", "--limit", "2", *TINY[:4])
    record(cls, "a --class without descriptors", *judge_refusal(run, outputs=[d / "maps"]))
    d = h.scratch()
    pred = [json.loads(x) for x in (w / "synth" / "manifest.jsonl").read_text().splitlines()][:2]
    for p in pred:
        p["path"] = str((w / "synth" / p["path"]).resolve())
        p.update(pred=p["label"], topk=[{"class": p["label"], "score": 0.3}], model="ViT-B-32 (pretrained=openai)")
    (d / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pred))
    run = h.run("explain", "visual", d / "p.jsonl", "-o", d / "maps", "--no-overlays", *TINY[:4])
    said = "ViT-B-32" in run.err
    record(cls, "predictions of another model", "good" if said else "weak",
           f"exit {run.rc}; {'warned' if said else 'no word'}")


def describe_sizes(h: Harness) -> None:
    cls = "describe answers"
    cases = [("200,000 descriptors", chat_body("".join(f"- feature {i}\n" for i in range(200_000)))),
             ("5,000 descriptors", chat_body("".join(f"- f{i}\n" for i in range(5000)))),
             ("a 70 MB line", chat_body("- " + "x" * (70 << 20))),
             ("nested 100,000 deep", '{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}")]
    for name, body in cases:
        d = h.scratch()
        # one server, sane for the rerun: the same URL, so a refused answer kept in the cache would be
        # replayed instead of asked again
        answers = [body, chat_body("- wings")]
        server = HostileServer(lambda r: [(http_response(answers[0]), 0)])
        run = describe(h, d, server.url)
        big = (d / "out.jsonl").exists() and (d / "out.jsonl").stat().st_size > 1 << 20
        answers.pop(0)
        rerun = describe(h, d, server.url)
        server.close()
        if big or rerun.rc != 0:
            verdict = "bad"
        elif run.rc == 1 and "Traceback" not in run.err and "unexpected" not in run.err:
            verdict = "good"
        else:
            verdict = "weak"
        record(cls, f"describe: {name}", verdict, f"exit {run.rc}, wrote {'a huge line' if big else 'nothing'}; "
               f"rerun exit {rerun.rc}; {run.err.strip().splitlines()[0][:90] if run.err.strip() else ''}")


# ----------------------------------------------------------------------------- serve

class Serve:
    def __init__(self, h: Harness, store: Path, *args):
        self.proc = subprocess.Popen([h.vlmtools, "serve", str(store), "--port", "0", "--device", "cpu", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=h.env)
        self.err = ""
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit(f"serve did not start: {self.err}")
            self.err += line
            if "serving " in line:
                self.port = int(line.split(" on ", 1)[1].split()[0].rstrip("/").rsplit(":", 1)[1])
                break

    def rest(self) -> str:
        return self.err + self.proc.stderr.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def raw(port: int, data: bytes, then: bytes = b"", pause: float = 0.0, limit: float = 60) -> tuple:
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
            sock.sendall(data)
            if pause:
                time.sleep(pause)
            if then:
                sock.sendall(then)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except socket.timeout:
        return None, time.monotonic() - started
    except OSError:
        return "closed", time.monotonic() - started
    status = int(answer.split()[1]) if answer else None
    return status, time.monotonic() - started


def post(body: bytes, length: str | None = None) -> bytes:
    length = str(len(body)) if length is None else length
    return f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + body


def serve(h: Harness, w: Path) -> None:
    cls = "serve"
    dim = 32
    server = Serve(h, w / "store")
    try:
        cases = [
            ("embedding NaN", post(("{\"embedding\": [NaN" + ", 0.1" * (dim - 1) + "]}").encode())),
            ("embedding strings", post(json.dumps({"embedding": ["a"] * dim}).encode())),
            ("embedding ragged", post(json.dumps({"embedding": [[0.1] * dim, [1]]}).encode())),
            ("embedding object", post(json.dumps({"embedding": {"a": 1}}).encode())),
            ("body nested 100,000 deep", post(b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}")),
            ("duplicate keys", post(b'{"text": "a bird", "text": "a cat"}')),
            ("Content-Length not a number", post(b"{}", length="abc")),
            ("id an object", post(json.dumps({"id": {"x": 1}}).encode())),
        ]
        for name, data in cases:
            status, seconds = raw(server.port, data)
            verdict = "good" if status == 400 and seconds < 15 else (  # bad input, whatever part of the request
                "bad" if status is None or seconds >= 15 or status == 200 else "weak")
            record(cls, f"serve: {name}", verdict, f"HTTP {status} in {seconds:.1f} s")
        status, seconds = raw(server.port, post(b'{"id": "00000"}', length="500"), limit=60)
        verdict = "good" if status in (400, 408) and seconds < 15 else ("weak" if status else "bad")
        record(cls, "serve: Content-Length longer than the body", verdict, f"HTTP {status} after {seconds:.1f} s")
        for _ in range(3):  # clients that hang up
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(post(json.dumps({"text": "a bird", "k": 20}).encode()))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(2)
        status, _ = raw(server.port, post(b'{"id": "00000", "k": 1}'))
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        err = server.rest()
        server.close()
    noisy = "Traceback" in err or "Exception" in err
    record(cls, "serve: closed client connections logged quietly", "weak" if noisy else "good",
           "tracebacks on stderr" if noisy else f"quiet; next request HTTP {status}")

    results = []
    for trial in range(5):
        s = Serve(h, w / "store")
        body = json.dumps({"text": "a bird", "k": 1}).encode()
        try:
            with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
                sock.sendall(f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                             + body[:5])
                time.sleep(1.0)  # the harness, not a test: give the server time to take the connection
                s.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                sock.sendall(body[5:])
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            status = int(answer.split()[1]) if answer else None
        except OSError:
            status = None
        try:
            rc = s.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = "hung"
        s.close()
        results.append((status, rc))
    good = sum(1 for st, rc in results if st == 200 and rc == 0)
    record(cls, "serve: SIGTERM with a request in flight (5 trials)", "good" if good == 5 else "weak",
           f"{good}/5 answered and exited 0: {results}")
    s = Serve(h, w / "store", "--host", "0.0.0.0")
    warned = "authentication" in s.err
    s.proc.send_signal(signal.SIGTERM)
    s.close()
    record(cls, "serve: --host 0.0.0.0 warns", "good" if warned else "weak", "warned" if warned else "no warning")


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vlmtools", default=str(Path(sys.executable).with_name("vlmtools")))
    parser.add_argument("--out", default="hostile.jsonl")
    parser.add_argument("--only", nargs="*", help="classes to run (security, silent, heads, store, exit, explain, "
                                                  "describe, serve)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlmtools-hostile."))
    h = Harness(args.vlmtools, root)
    started = time.monotonic()
    try:
        w = build_world(h)
        groups = {"security": lambda: security(h, w), "silent": lambda: silent(h, w),
                  "heads": lambda: weak_heads_and_training(h, w), "store": lambda: store_check(h, w),
                  "exit": lambda: exit_codes(h, w), "explain": lambda: explain_visual(h, w),
                  "describe": lambda: describe_sizes(h), "serve": lambda: serve(h, w)}
        for name, group in groups.items():
            if not args.only or name in args.only:
                group()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    with open(args.out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in RESULTS)
    print(f"\n{args.vlmtools}: {len(RESULTS)} cases in {time.monotonic() - started:.0f} s")
    classes = list(dict.fromkeys(r["class"] for r in RESULTS))
    print(f"{'class':28s} good weak  bad")
    for c in classes + ["all"]:
        rs = [r for r in RESULTS if c in ("all", r["class"])]
        print(f"{c:28s} {sum(r['verdict'] == 'good' for r in rs):4d} {sum(r['verdict'] == 'weak' for r in rs):4d} "
              f"{sum(r['verdict'] == 'bad' for r in rs):4d}")


if __name__ == "__main__":
    main()
