#!/usr/bin/env python3
"""Fake datasets in the exact layouts the reproduction scripts read, and a fake LLM server: a dry run
of examples/cub/reproduce_*.sh without CUB, COCO, weights or network (CI's smoke test uses them).

    python3 examples/cub/fake_data.py OUT [--per-class 3] [--coco-images 40]
    python3 examples/cub/fake_data.py --serve-llm        # prints its base URL, serves until killed

OUT gets:
  CUB_200_2011/   images/<class>/<Name>_<k>_<id>.jpg, images.txt, image_class_labels.txt,
                  train_test_split.txt (per class: the last image test, the others train), classes.txt
                  (CUB's 200 real class names, examples/cub/cub_classes.txt), bounding_boxes.txt
  segmentations/  <class>/<image name>.png, one 8-bit mask per image (CUB's segmentation archive)
  CUB-200-Painting/ <class>/<k>.jpg (class folders named as CUB's)
  text_c10/       <class>/<image name>.txt, 10 captions per image (Reed et al.'s cvpr2016_cub)
  coco/           train2017/<%012d>.jpg and annotations/captions_train2017.json, 5 captions per image
  descriptors_cub.json  Menon & Vondrick's descriptor format, CBD's class names (the last class empty)

Every image is a small generated JPEG: a coloured ellipse (the "bird", its colour and size depend on the
class) on a noisy background; its mask and box are the ellipse's. The numbers the scripts print on this
data say nothing about the studies: it checks the plumbing only.

The LLM server answers POST /v1/chat/completions and /v1/completions (OpenAI's shapes) on 127.0.0.1 with
"- " bullets for the class its prompt names last, then "Field: value" lines (for --style structured).
Standard library, numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLOURS = ["black", "white", "grey", "brown", "red", "orange", "yellow", "green", "blue", "purple"]
RGB = {"black": (20, 20, 20), "white": (235, 235, 235), "grey": (128, 128, 128), "brown": (120, 72, 30),
       "red": (200, 30, 30), "orange": (240, 140, 20), "yellow": (235, 215, 40), "green": (40, 160, 60),
       "blue": (40, 80, 200), "purple": (130, 50, 160)}


def cub_classes() -> list[str]:
    """CUB-200-2011's classes.txt names, '001.Black_footed_Albatross' ... '200.Common_Yellowthroat'."""
    lines = (HERE / "cub_classes.txt").read_text(encoding="utf-8").split("\n")
    return [line.split(" ", 1)[1] for line in lines if line.strip()]


def plain_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (what a prompt may say)."""
    return raw.split(".", 1)[1].replace("_", " ")


def cbd_name(raw: str) -> str:
    """'034.Gray_crowned_Rosy_Finch' -> 'Gray-crowned-Rosy Finch': the names `vlmtools data cub` writes and
    Menon's descriptor file is keyed by (all words but the last hyphenated when there are more than two)."""
    words = plain_name(raw).split(" ")
    return "-".join(words[:-1]) + " " + words[-1] if len(words) > 2 else " ".join(words)


def traits(name: str) -> tuple[str, str]:
    """A class's (colour, size) word, fixed by its name."""
    h = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return COLOURS[h % len(COLOURS)], ("small", "medium-sized", "large")[(h // 10) % 3]


def _draw(rng, colour: str, size: str, side: int = 48, painting: bool = False):
    """(RGB uint8 image, bool mask, (x, y, w, h) box)."""
    import numpy as np

    base = rng.integers(60, 200, 3)
    img = np.clip(base + rng.normal(0, 25, (side, side, 3)), 0, 255)
    radius = {"small": 0.18, "medium-sized": 0.26, "large": 0.34}[size] * side
    cy, cx = rng.uniform(0.4, 0.6, 2) * side
    ry, rx = radius * rng.uniform(0.7, 1.0), radius * rng.uniform(1.0, 1.3)
    yy, xx = np.mgrid[:side, :side]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img[mask] = np.clip(np.array(RGB[colour]) + rng.normal(0, 12, (mask.sum(), 3)), 0, 255)
    if painting:  # flat colours, coarse strokes: a different "domain"
        img = (img // 64) * 64 + 32
    ys, xs = mask.nonzero()
    box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
    return img.astype(np.uint8), mask, box


def _save_jpeg(array, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=90)


def make_cub(out: Path, per_class: int = 3, seed: int = 0) -> Path:
    """CUB_200_2011/ and segmentations/ under ``out``; returns the CUB_200_2011 directory."""
    import numpy as np
    from PIL import Image

    if per_class < 2:
        raise ValueError("per_class: at least 2 (one train and one test image per class)")
    rng = np.random.default_rng(seed)
    root, seg = out / "CUB_200_2011", out / "segmentations"
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for class_id, raw in enumerate(cub_classes(), 1):
        colour, size = traits(raw)
        stem = "_".join(w.capitalize() for w in raw.split(".", 1)[1].split("_"))
        for k in range(per_class):
            image_id += 1
            rel = f"{raw}/{stem}_{k + 1:04d}_{image_id}.jpg"
            img, mask, box = _draw(rng, colour, size)
            _save_jpeg(img, root / "images" / rel)
            (seg / raw).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(seg / Path(rel).with_suffix(".png"))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {0 if k == per_class - 1 else 1}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes),
                        ("classes.txt", [f"{i} {c}" for i, c in enumerate(cub_classes(), 1)])):
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_paintings(out: Path, per_class: int = 1, seed: int = 1) -> Path:
    """CUB-200-Painting/<class>/<k>.jpg."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root = out / "CUB-200-Painting"
    for raw in cub_classes():
        colour, size = traits(raw)
        for k in range(per_class):
            _save_jpeg(_draw(rng, colour, size, painting=True)[0], root / raw / f"{k + 1:04d}.jpg")
    return root


def make_reed(out: Path, cub_root: Path) -> Path:
    """text_c10/<class>/<image name>.txt: ten captions per CUB image."""
    root = out / "text_c10"
    for line in (cub_root / "images.txt").read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        rel = line.split(" ", 1)[1]
        colour, size = traits(rel.split("/", 1)[0])
        path = root / Path(rel).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        caps = [f"this {size} bird is mostly {colour} with a short beak.",
                f"a {colour} bird with {size} wings and a pointed bill.",
                f"the bird has a {colour} body and a {size} tail.",
                f"this bird is {colour} all over.",
                f"a {size} {colour} bird perched on a branch.",
                f"the {colour} bird has small dark eyes.",
                f"this is a {size} bird with {colour} feathers.",
                f"a bird with a {colour} crown and {colour} back.",
                f"the bird is {size} and {colour} with thin legs.",
                f"{colour} plumage covers this {size} bird."]
        path.write_text("\n".join(caps) + "\n", encoding="utf-8")
    return root


def make_coco(out: Path, n_images: int = 40, seed: int = 2) -> Path:
    """coco/train2017/*.jpg and coco/annotations/captions_train2017.json (5 captions per image)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root = out / "coco"
    images, annotations = [], []
    for i in range(n_images):
        image_id = 1000 + 7 * i
        colour, size = COLOURS[i % len(COLOURS)], ("small", "medium-sized", "large")[i % 3]
        name = f"{image_id:012d}.jpg"
        _save_jpeg(_draw(rng, colour, size)[0], root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 48, "height": 48})
        for k, text in enumerate([f"A {colour} object in a field.", f"a {size} {colour} thing outdoors",
                                  f"There is a {colour} shape in the middle.", f"A photo of something {colour}.",
                                  f"A {size} round {colour} item."]):
            annotations.append({"id": 10 * image_id + k, "image_id": image_id, "caption": text})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann = {"info": {"description": "fake COCO 2017 captions"}, "images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(ann), encoding="utf-8")
    return root


def make_descriptors(out: Path) -> Path:
    """descriptors_cub.json in Menon & Vondrick's format ({class: [descriptors]}, CBD's class names); the
    last class's list is empty, as a class can be in theirs."""
    classes = cub_classes()
    desc = {cbd_name(raw): [line[2:] for line in answer(cbd_name(raw)).split("\n") if line.startswith("- ")]
            for raw in classes}
    desc[cbd_name(classes[-1])] = []
    path = out / "descriptors_cub.json"
    path.write_text(json.dumps(desc, indent=1), encoding="utf-8")
    return path


def make_all(out: Path, per_class: int = 3, coco_images: int = 40) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cub = make_cub(out, per_class)
    return {"cub": cub, "segmentations": out / "segmentations", "paintings": make_paintings(out),
            "reed": make_reed(out, cub), "coco": make_coco(out, coco_images),
            "descriptors": make_descriptors(out)}


# ----------------------------------------------------------------------------- the fake LLM

def answer(prompt: str) -> str:
    """Bullets and structured fields for the CUB class the prompt names last (or a generic bird)."""
    hits = []
    for raw in cub_classes():
        for form in (plain_name(raw), cbd_name(raw)):
            at = prompt.lower().rfind(form.lower())
            if at >= 0:
                hits.append((at, len(form), raw))
    raw = max(hits)[2] if hits else "000.Bird"  # the last named; the longest name where two end there
    colour, size = traits(raw)
    bullets = [f"{size} bird", f"mostly {colour} plumage", f"{colour} wings", "short pointed beak",
               "dark round eyes", "often seen near water"]
    fields = {"Size": size, "Shape": "compact body", "Coloration": f"mostly {colour}",
              "Pattern": "plain", "Head": f"{colour} crown", "Beak or mouth": "short and pointed",
              "Eyes": "dark", "Wings or limbs": f"{colour} wings", "Legs and feet": "thin legs",
              "Tail": "short tail"}
    return "\n".join(f"- {b}" for b in bullets) + "\n\n" + "\n".join(f"{k}: {v}" for k, v in fields.items())


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            return self._send(400, {"error": {"message": "not JSON", "type": "invalid_request_error"}})
        path = self.path.rstrip("/")
        if path.endswith("/chat/completions"):
            prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
            text = answer(prompt)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            obj = "chat.completion"
        elif path.endswith("/completions"):
            prompt = body.get("prompt", "")
            text = answer(prompt if isinstance(prompt, str) else "\n".join(prompt))
            if text.startswith("- "):
                text = text[2:]  # a completion continues the prompt's trailing "-"
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        else:
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        self.server.requests += 1
        self._send(200, {"id": "fake-1", "object": obj, "created": 0, "model": body.get("model", "fake"),
                         "choices": [choice],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


class FakeLLM:
    """The server on 127.0.0.1 in a thread: ``with FakeLLM() as llm: ... llm.base_url``."""

    def __init__(self, port: int = 0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.requests = 0
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return self.httpd.requests

    def __enter__(self) -> "FakeLLM":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="directory to write the fake datasets into")
    ap.add_argument("--per-class", type=int, default=3, help="CUB images per class (last one test) [3]")
    ap.add_argument("--coco-images", type=int, default=40, help="COCO train images (5 captions each) [40]")
    ap.add_argument("--serve-llm", action="store_true", help="serve the fake LLM until killed")
    ap.add_argument("--port", type=int, default=0, help="the LLM server's port (0: any free one)")
    args = ap.parse_args(argv)
    if args.serve_llm:
        with FakeLLM(args.port) as llm:
            print(llm.base_url, flush=True)
            try:
                llm.thread.join()
            except KeyboardInterrupt:
                pass
        return 0
    if not args.out:
        ap.error("give OUT (or --serve-llm)")
    for name, path in make_all(Path(args.out), args.per_class, args.coco_images).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
