"""`vlmtools classify`: clip (equal to open_clip's zero-shot classifier) and cbd (equal to a plain loop over
the paper's recipe), text stores, the text cache, background descriptors, and bad input."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vlmtools import classify as C
from vlmtools.cli.app import app
from vlmtools.prompts import descriptor_sentence, load_templates
from vlmtools.store import write_arrays

TINY = {"name": "vlmtools-tiny", "pretrained": "none"}
CLASSES = ["Cardinal", "Blue Jay", "House Sparrow", "Horned Puffin", "Snowy Owl", "Mallard"]
DESCRIPTORS = {
    "Cardinal": (["a bright red songbird", "has a pointed crest", "thick orange beak"], ["object"] * 3),
    "Blue Jay": (["blue and white plumage", "often seen at feeders", "black necklace"],
                 ["object", "background", "object"]),
    "House Sparrow": (["small brown bird", "used to living near people"], ["object", "background"]),
    "Horned Puffin": (["two black horns on the head", "bright orange legs and feet",
                       "habitat often includes rocky coasts and islands", "often seen in large colonies"],
                      ["object", "object", "background", "background"]),
    "Snowy Owl": (["white plumage with dark bars", "yellow eyes"], ["object", "object"]),
    "Mallard": (["green head", "may dabble in ponds", "a yellow bill"], ["object", "background", "object"]),
}
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_descriptors(path, table, order=None):
    with open(path, "w") as fh:
        for cls in order or table:
            descs, kinds = table[cls]
            fh.write(json.dumps({"class": cls, "descriptors": descs, "kinds": kinds}) + "\n")
    return path


def read_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Class list, descriptors and an image store of 36 random unit vectors with labels, splits, domains."""
    d = tmp_path_factory.mktemp("world")
    (d / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_descriptors(d / "desc.jsonl", DESCRIPTORS)
    rng = np.random.default_rng(1)
    n = 36
    meta = [{"id": f"im{i:02d}", "path": f"/nowhere/im{i:02d}.jpg", "label": CLASSES[i % len(CLASSES)],
             "split": "test" if i % 3 else "train", "domain": "photo" if i % 2 else "painting"} for i in range(n)]
    write_arrays(d / "images", rng.normal(size=(n, 32)), meta, kind="image", model=TINY)
    return d


def image_matrix(world):
    from vlmtools.store import open_store

    return open_store(world / "images").embeddings


# ----------------------------------------------------------------------------- clip

@pytest.mark.parametrize("templates", ["bare", "photo", "openai80"])
def test_clip_class_embeddings_equal_open_clip(tiny_encoder, templates):
    import open_clip

    tpl = load_templates(templates)
    ref = open_clip.build_zero_shot_classifier(tiny_encoder.model, tiny_encoder.tokenizer, CLASSES, tpl,
                                               device="cpu").T.numpy()
    clf = C.clip_classifier(CLASSES, tpl, tiny_encoder.spec, device="cpu")
    assert clf.class_emb.shape == ref.shape
    np.testing.assert_allclose(clf.class_emb, ref, atol=1e-5)


def test_cli_clip_scores_are_cosines_with_open_clip_classifier(world, tiny_encoder):
    import open_clip

    res = invoke("classify", world / "images", "--method", "clip", "--classes", world / "classes.txt",
                 "--templates", "photo", "-k", "3")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    weights = open_clip.build_zero_shot_classifier(tiny_encoder.model, tiny_encoder.tokenizer, CLASSES,
                                                   ["a photo of a {}."], device="cpu").numpy()
    scores = image_matrix(world) @ weights
    assert len(preds) == scores.shape[0]
    for rec, row in zip(preds, scores):
        best = np.argsort(-row)[:3]
        assert [t["class"] for t in rec["topk"]] == [CLASSES[i] for i in best]
        np.testing.assert_allclose([t["score"] for t in rec["topk"]], row[best], atol=1e-5)
        assert rec["pred"] == rec["topk"][0]["class"]
        assert "explanation" not in rec
        assert {"id", "path", "label", "split", "domain"} <= set(rec)


def test_clip_classes_default_to_store_labels(world):
    res = invoke("classify", world / "images", "-k", "10")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    assert {len(r["topk"]) for r in preds} == {len(CLASSES)}  # k is capped by the number of classes
    assert {t["class"] for t in preds[0]["topk"]} == set(CLASSES)


# ----------------------------------------------------------------------------- cbd

def test_descriptor_sentences_follow_the_paper_rule():
    records = {"Mallard": {"class": "Mallard", "descriptors": [
        "a yellow bill", "angular head", "has webbed feet", "often in ponds", "typically green",
        "may dabble", "can fly", "used to people", "green head"]}}
    dset = C.build_descriptor_set(["Mallard"], records)
    assert dset.texts == [
        "Mallard, which is a yellow bill", "Mallard, which is angular head", "Mallard, which has webbed feet",
        "Mallard, which often in ponds", "Mallard, which typically green", "Mallard, which may dabble",
        "Mallard, which can fly", "Mallard, which is used to people", "Mallard, which has green head"]
    assert C.build_descriptor_set(["Mallard"], records, wrap="none").texts == records["Mallard"]["descriptors"]


def reference_cbd(images, encoder, table, aggregate="mean", wrap="cbd"):
    """The paper's recipe written as a loop: per class, cosine with each descriptor sentence, aggregated."""
    reduce = {"mean": np.mean, "max": np.max, "sum": np.sum}[aggregate]
    per_class, sims = [], {}
    for cls in CLASSES:
        emb = encoder.encode_texts([descriptor_sentence(cls, d, wrap) for d in table[cls][0]])
        sims[cls] = images @ emb.T
        per_class.append(reduce(sims[cls], axis=1))
    return np.stack(per_class, axis=1), sims


@pytest.mark.parametrize("aggregate", ["mean", "max", "sum"])
def test_cli_cbd_equals_reference_loop(world, tiny_encoder, aggregate):
    res = invoke("classify", world / "images", "--descriptors", world / "desc.jsonl", "--aggregate", aggregate,
                 "--explain-true")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    images = image_matrix(world)
    scores, sims = reference_cbd(images, tiny_encoder, DESCRIPTORS, aggregate)
    for i, rec in enumerate(preds):
        best = np.argsort(-scores[i])[:5]
        assert [t["class"] for t in rec["topk"]] == [CLASSES[j] for j in best]
        np.testing.assert_allclose([t["score"] for t in rec["topk"]], scores[i, best], atol=1e-5)
        for key, cls in (("explanation", rec["pred"]), ("explanation_true", rec["label"])):
            descs, kinds = DESCRIPTORS[cls]
            order = np.argsort(-sims[cls][i], kind="stable")
            assert [e["descriptor"] for e in rec[key]] == [descs[j] for j in order]
            assert [e["kind"] for e in rec[key]] == [kinds[j] for j in order]
            np.testing.assert_allclose([e["score"] for e in rec[key]], sims[cls][i, order], atol=1e-5)


def test_vectorised_helpers_match_loops():
    rng = np.random.default_rng(0)
    offsets = [0, 3, 4, 9, 11]
    sims = rng.normal(size=(50, 11)).astype(np.float32)
    class_idx = rng.integers(0, 4, size=50)
    cols, vals, lengths = C.rank_descriptors(sims, offsets, class_idx)
    for i, c in enumerate(class_idx):
        own = sims[i, offsets[c]:offsets[c + 1]]
        assert lengths[i] == len(own)
        np.testing.assert_array_equal(vals[i, :lengths[i]], np.sort(own)[::-1])
        np.testing.assert_array_equal(cols[i, :lengths[i]] - offsets[c], np.argsort(-own, kind="stable"))
    scores = rng.normal(size=(50, 7))
    idx, top = C.top_k(scores, 4)
    np.testing.assert_array_equal(idx, np.argsort(-scores, axis=1)[:, :4])
    np.testing.assert_array_equal(top, -np.sort(-scores, axis=1)[:, :4])


def test_background_modes(world):
    out = {}
    for mode in ("include", "exclude", "only"):
        res = invoke("classify", world / "images", "-d", world / "desc.jsonl", "--background", mode, "-k", "6",
                     "--explain-true")
        assert res.exit_code == 0, res.output
        out[mode] = (read_lines(res.stdout), " ".join(res.stderr.split()))  # rich wraps long lines
    kinds = lambda preds: {e["kind"] for r in preds for e in r["explanation_true"]}  # noqa: E731
    assert kinds(out["include"][0]) == {"object", "background"}
    assert kinds(out["exclude"][0]) == {"object"}
    # Cardinal and Snowy Owl have no background descriptor: under "only" they are scored by their name
    assert kinds(out["only"][0]) == {"background", "name"}
    assert "scored by their name" in out["only"][1] and "'Cardinal'" in out["only"][1]
    owl = next(r for r in out["only"][0] if r["label"] == "Snowy Owl")
    [only] = owl["explanation_true"]
    assert only["descriptor"] == "Snowy Owl" and only["kind"] == "name"


def test_classes_without_kinds_count_as_objects(world, tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"class": c, "descriptors": d}) + "\n" for c, (d, _) in DESCRIPTORS.items()))
    res = invoke("classify", world / "images", "-d", plain, "--background", "exclude")
    assert res.exit_code == 0, res.output
    assert {e["kind"] for r in read_lines(res.stdout) for e in r["explanation"]} == {"object"}


def test_where_selects_rows(world):
    res = invoke("classify", world / "images", "-d", world / "desc.jsonl", "--where", "split=test",
                 "--where", "domain=photo")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    assert preds and all(r["split"] == "test" and r["domain"] == "photo" for r in preds)
    assert len(preds) == sum(1 for i in range(36) if i % 3 and i % 2)


def test_output_file_and_no_explain(world, tmp_path):
    out = tmp_path / "pred.jsonl"
    res = invoke("classify", world / "images", "-d", world / "desc.jsonl", "--no-explain", "-o", out)
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    preds = read_lines(out.read_text())
    assert len(preds) == 36 and all("explanation" not in r for r in preds)


# ----------------------------------------------------------------------------- text store and cache

def _forbid_model(monkeypatch):
    import vlmtools.models
    from vlmtools.errors import ModelUnavailable

    def refuse(*a, **k):
        raise ModelUnavailable("the model must not be needed here")

    monkeypatch.setattr(vlmtools.models, "load_model", refuse)


def test_text_store_from_embed_text_is_used_without_the_model(world, tmp_path, monkeypatch):
    store = tmp_path / "text"
    res = invoke("embed", "text", world / "desc.jsonl", "-o", store, "--model", "vlmtools-tiny", "--pretrained",
                 "none", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    direct = read_lines(invoke("classify", world / "images", "-d", world / "desc.jsonl").stdout)
    _forbid_model(monkeypatch)
    for extra in (["-d", world / "desc.jsonl"], []):  # descriptors from the file, or from the store's meta
        res = invoke("classify", world / "images", "--text-store", store, "--no-cache", *extra)
        assert res.exit_code == 0, res.output
        via_store = read_lines(res.stdout)
        assert [r["pred"] for r in via_store] == [r["pred"] for r in direct]
        np.testing.assert_allclose([r["topk"][0]["score"] for r in via_store],
                                   [r["topk"][0]["score"] for r in direct], atol=1e-5)


def test_text_store_embeddings_decide(world, tmp_path, monkeypatch):
    """A text store whose vectors point at chosen images: predictions must follow the store, not the model."""
    images = image_matrix(world)
    rows, emb = [], []
    for c, cls in enumerate(CLASSES):
        for j, d in enumerate(DESCRIPTORS[cls][0]):
            rows.append({"id": f"{cls}::{j}", "text": descriptor_sentence(cls, d), "class": cls, "descriptor": d,
                         "kind": DESCRIPTORS[cls][1][j], "wrap": "cbd"})
            emb.append(images[c])  # every descriptor of class c is image c's own vector
    write_arrays(tmp_path / "t", np.array(emb), rows, kind="text", model=TINY,
                 extra_info={"source": "descriptors", "wrap": "cbd"})
    _forbid_model(monkeypatch)
    res = invoke("classify", world / "images", "--text-store", tmp_path / "t", "--where", "split=train")
    assert res.exit_code == 0, res.output
    preds = {r["id"]: r["pred"] for r in read_lines(res.stdout)}
    for c, cls in enumerate(CLASSES):
        if f"im{c:02d}" in preds:
            assert preds[f"im{c:02d}"] == cls


def test_text_cache_serves_second_run(world, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    first = invoke("classify", world / "images", "-d", world / "desc.jsonl")
    assert first.exit_code == 0, first.output
    files = list((tmp_path / "cache" / "text").rglob("*"))
    assert any(f.suffix == ".npy" for f in files) and any(f.suffix == ".json" for f in files)
    assert not any(f.name.endswith(".tmp") for f in files)
    _forbid_model(monkeypatch)
    second = invoke("classify", world / "images", "-d", world / "desc.jsonl")
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    refused = invoke("classify", world / "images", "-d", world / "desc.jsonl", "--no-cache")
    assert refused.exit_code == 2 and "must not be needed" in refused.stderr


def test_text_cache_keys_on_model_and_text(tmp_path):
    from vlmtools.models import ModelSpec

    a = C.TextCache(ModelSpec.parse("vlmtools-tiny"), root=tmp_path)
    b = C.TextCache(ModelSpec.parse("vlmtools-tiny-coca"), root=tmp_path)
    assert a.dir != b.dir
    a.add(["one", "two"], np.eye(2, 4, dtype=np.float32))
    hit = a.lookup(["two", "three"])
    assert set(hit) == {"two"} and hit["two"].tolist() == [0, 1, 0, 0]
    assert b.lookup(["one", "two"]) == {}


def test_embedded_images_through_the_real_pipeline(image_dir, tmp_path):
    manifest = tmp_path / "m.jsonl"
    labels = ["Cardinal", "Mallard"]
    manifest.write_text("".join(json.dumps({"id": p.stem, "path": str(p), "label": labels[i % 2]}) + "\n"
                                for i, p in enumerate(sorted(image_dir.glob("img*.png")))))
    res = invoke("embed", "images", manifest, "-o", tmp_path / "store", "--model", "vlmtools-tiny",
                 "--pretrained", "none", "--workers", "0")
    assert res.exit_code == 0, res.output
    res = invoke("classify", tmp_path / "store", "--templates", "bare")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    assert len(preds) == 20 and {r["pred"] for r in preds} <= set(labels)
    assert "top-1" in res.stderr


# ----------------------------------------------------------------------------- labels, templates, models

def test_int_labels_from_a_manifest(image_dir, tmp_path):
    """Manifest labels 0/1 (ints) are the classes "0" and "1" through embed, classify and eval."""
    manifest = tmp_path / "m.jsonl"
    files = sorted(image_dir.glob("img*.png"))
    manifest.write_text("".join(json.dumps({"id": p.stem, "path": str(p), "label": i % 2 if i else None}) + "\n"
                                for i, p in enumerate(files)))
    res = invoke("embed", "images", manifest, "-o", tmp_path / "store", "--model", "vlmtools-tiny",
                 "--pretrained", "none", "--workers", "0")
    assert res.exit_code == 0, res.output
    out = tmp_path / "p.jsonl"
    res = invoke("classify", tmp_path / "store", "--templates", "bare", "-o", out)
    assert res.exit_code == 0, res.output
    preds = read_lines(out.read_text())
    assert len(preds) == len(files) and "label" not in preds[0]
    assert {r["label"] for r in preds[1:]} == {"0", "1"} and {r["pred"] for r in preds} <= {"0", "1"}
    labelled = [r for r in preds if "label" in r]
    res = invoke("eval", out, "-o", tmp_path / "r.json")
    assert res.exit_code == 2 and f"{out}:1" in res.stderr  # the unlabelled image: eval needs every label
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    res = invoke("eval", tmp_path / "l.jsonl")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["correct"] == sum(r["pred"] == r["label"] for r in labelled)


def test_raw_int_labels_in_an_older_store(tmp_path):
    """Stores written before manifests were normalized may hold int and null labels in their meta."""
    rng = np.random.default_rng(3)
    meta = [{"id": f"i{i}", "path": f"/x/{i}.jpg", "label": [7, 8, 9, None][i % 4]} for i in range(12)]
    write_arrays(tmp_path / "s", rng.normal(size=(12, 32)), meta, kind="image", model=TINY)
    res = invoke("classify", tmp_path / "s", "--templates", "bare", "-k", "3")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    assert {t["class"] for t in preds[0]["topk"]} == {"7", "8", "9"}
    assert [r.get("label") for r in preds] == [None if m["label"] is None else str(m["label"]) for m in meta]
    desc = write_descriptors(tmp_path / "d.jsonl", {c: ([f"trait {c}"], ["object"]) for c in ("7", "8", "9")})
    res = invoke("classify", tmp_path / "s", "-d", desc, "--explain-true")
    assert res.exit_code == 0, res.output
    preds = read_lines(res.stdout)
    assert all(r["explanation_true"][0]["descriptor"] == f"trait {r['label']}" for r in preds if "label" in r)
    assert all("explanation_true" not in r for r in preds if "label" not in r)


@pytest.mark.parametrize("line, shown", [
    ("a {} with {color}", "{color}"),
    ("a {} of a {", "Single '{'"),
    ("a {0} and {}", "{0}"),
    ("a {} {:>20}", "{:>20}"),
    ("{{}} and nothing", "found none"),
])
def test_template_with_other_fields_is_refused(world, tmp_path, line, shown):
    tpl = tmp_path / "t.txt"
    tpl.write_text("a photo of a {c}.\n\n" + line + "\n")
    out = tmp_path / "p.jsonl"
    res = invoke("classify", world / "images", "--templates", tpl, "-o", out)
    assert res.exit_code == 2, res.output
    msg = " ".join(res.stderr.split())
    assert f"{tpl}:3" in msg and shown in msg and "Traceback" not in res.output
    assert not out.exists()


def test_clip_texts_checks_templates():
    assert C.clip_texts(["Blue_Jay"], ["{}", "a {{literal}} {}."]) == ["Blue Jay", "a {literal} Blue Jay."]
    with pytest.raises(C.BadInput, match=r"template 'a \{\} with \{color\}'"):
        C.clip_texts(["Mallard"], ["a {} with {color}"])


def _store_of_other_weights(tmp_path, model):
    """An image store and a text store holding every prompt it needs, both recorded as ``model``: classify
    then needs no model, so any recorded weights (even ones not on this machine) can be named."""
    rng = np.random.default_rng(4)
    meta = [{"id": f"i{i}", "path": f"/x/{i}.jpg", "label": CLASSES[i % len(CLASSES)]} for i in range(12)]
    write_arrays(tmp_path / "img", rng.normal(size=(12, 32)), meta, kind="image", model=model)
    texts = C.clip_texts(CLASSES, ["a photo of a {}."])
    write_arrays(tmp_path / "txt", rng.normal(size=(len(texts), 32)), [{"id": t, "text": t} for t in texts],
                 kind="text", model=model)
    return tmp_path / "img", tmp_path / "txt"


def test_model_name_alone_means_the_stores_weights(tmp_path, monkeypatch):
    model = {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}  # not the default (openai) weights
    images, texts = _store_of_other_weights(tmp_path, model)
    _forbid_model(monkeypatch)
    base = ["classify", images, "--text-store", texts, "--no-cache"]
    plain = invoke(*base)
    named = invoke(*base, "--model", "ViT-B-32")
    assert plain.exit_code == named.exit_code == 0, named.output
    assert named.stdout == plain.stdout and len(read_lines(named.stdout)) == 12
    both = invoke(*base, "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k")
    assert both.exit_code == 0 and both.stdout == plain.stdout
    for wrong in (["--model", "ViT-B-32", "--pretrained", "openai"], ["--pretrained", "openai"],
                  ["--model", "ViT-B-16"]):
        res = invoke(*base, *wrong, "-o", tmp_path / "p.jsonl")
        msg = " ".join(res.stderr.split())
        assert res.exit_code == 2 and str(images) in msg and "laion2b_s34b_b79k" in msg, wrong
        assert not (tmp_path / "p.jsonl").exists()


def test_store_spec_is_models_spec_for_store(tmp_path):
    from vlmtools.errors import StoreMismatch
    from vlmtools.models import ModelSpec
    from vlmtools.search import query_spec
    from vlmtools.store import open_store

    images, _ = _store_of_other_weights(tmp_path, {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    reader = open_store(images)
    want = ModelSpec("ViT-B-32", "laion2b_s34b_b79k")
    for resolve in (C.store_spec, query_spec):
        assert resolve(reader) == resolve(reader, "ViT-B-32") == resolve(reader, None, "laion2b_s34b_b79k") == want
        with pytest.raises(StoreMismatch, match=f"{images}.*not ViT-B-32 \\(pretrained=openai\\)"):
            resolve(reader, "ViT-B-32", "openai")


def test_text_cache_key_covers_local_dir_contents(tmp_path):
    import os

    from vlmtools.models import ModelSpec

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text("{}")
    weights = model_dir / "open_clip_model.safetensors"
    weights.write_bytes(b"x" * 10)
    spec = ModelSpec.parse(f"local-dir:{model_dir}")
    first = C.TextCache(spec, root=tmp_path / "c")
    assert C.TextCache(spec, root=tmp_path / "c").dir == first.dir  # stable while nothing changes
    assert first.fingerprint["file:open_clip_model.safetensors"][0] == 10
    weights.write_bytes(b"y" * 11)  # new weights under the same name
    second = C.TextCache(spec, root=tmp_path / "c")
    assert second.dir != first.dir
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, rewritten later
    assert C.TextCache(spec, root=tmp_path / "c").dir not in (first.dir, second.dir)


def test_text_cache_lives_under_the_cache_dir(tmp_path, monkeypatch):
    from vlmtools.models import ModelSpec

    monkeypatch.delenv("VLMTOOLS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.TextCache(ModelSpec.parse("vlmtools-tiny")).dir.parent == tmp_path / "xdg" / "vlmtools" / "text"


# ----------------------------------------------------------------------------- bad input

def test_descriptor_class_not_in_class_list(world, tmp_path):
    extra = dict(DESCRIPTORS, Ostrich=(["long neck"], ["object"]))
    desc = write_descriptors(tmp_path / "d.jsonl", extra)
    out = tmp_path / "pred.jsonl"
    res = invoke("classify", world / "images", "-d", desc, "--classes", world / "classes.txt", "-o", out)
    assert res.exit_code == 2
    assert f"{desc}:7" in res.stderr and "'Ostrich'" in res.stderr
    assert not out.exists()


def test_listed_class_without_descriptors(world, tmp_path):
    table = {c: v for c, v in DESCRIPTORS.items() if c != "Mallard"}
    desc = write_descriptors(tmp_path / "d.jsonl", table)
    out = tmp_path / "pred.jsonl"
    res = invoke("classify", world / "images", "-d", desc, "--classes", world / "classes.txt", "-o", out)
    assert res.exit_code == 2 and "'Mallard'" in res.stderr and "--allow-empty" in res.stderr
    assert not out.exists()
    res = invoke("classify", world / "images", "-d", desc, "--classes", world / "classes.txt", "--allow-empty",
                 "--explain-true", "-o", out)
    assert res.exit_code == 0, res.output
    mallard = [r for r in read_lines(out.read_text()) if r["label"] == "Mallard"]
    assert mallard and all(r["explanation_true"][0]["kind"] == "name" for r in mallard)


@pytest.mark.parametrize("case", ["duplicate", "empty"])
def test_bad_descriptor_files(world, tmp_path, case):
    desc = write_descriptors(tmp_path / "d.jsonl", DESCRIPTORS)
    with open(desc, "a") as fh:
        if case == "duplicate":
            fh.write(json.dumps({"class": "Cardinal", "descriptors": ["red"]}) + "\n")
        else:
            fh.write(json.dumps({"class": "Ostrich", "descriptors": []}) + "\n")
    res = invoke("classify", world / "images", "-d", desc, "-o", tmp_path / "p.jsonl")
    assert res.exit_code == 2
    assert f"{desc}:7" in res.stderr and ("duplicate" in res.stderr if case == "duplicate" else "empty" in res.stderr)
    assert not (tmp_path / "p.jsonl").exists()


def test_duplicate_class_in_class_list(world, tmp_path):
    (tmp_path / "c.txt").write_text("Cardinal\nMallard\nCardinal\n")
    res = invoke("classify", world / "images", "--classes", tmp_path / "c.txt")
    assert res.exit_code == 2 and f"{tmp_path / 'c.txt'}:3" in res.stderr and res.stdout == ""


def test_store_from_another_model_is_refused(world, tmp_path):
    res = invoke("classify", world / "images", "--model", "vlmtools-tiny-coca", "-o", tmp_path / "p.jsonl")
    assert res.exit_code == 2 and "embedded with vlmtools-tiny" in res.stderr
    other = {"name": "vlmtools-tiny-coca", "pretrained": "none"}
    write_arrays(tmp_path / "t", np.ones((1, 32)), [{"id": "0", "text": "x"}], kind="text", model=other)
    res = invoke("classify", world / "images", "-d", world / "desc.jsonl", "--text-store", tmp_path / "t",
                 "-o", tmp_path / "p.jsonl")
    assert res.exit_code == 2 and "vlmtools-tiny-coca" in res.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_labels_that_match_no_class(world, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(c.upper() for c in CLASSES) + "\n")
    res = invoke("classify", world / "images", "--classes", tmp_path / "c.txt")
    assert res.exit_code == 2 and "no image label is one of the classes" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--method", "knn"], "--method"),
    (["--method", "cbd"], "--descriptors"),
    (["--templates", "photo", "-d", "DESC"], "--templates applies to --method clip"),
    (["--wrap", "none"], "--wrap applies to --method cbd"),
    (["--aggregate", "median", "-d", "DESC"], "--aggregate"),
    (["--where", "split"], "KEY=VALUE"),
    (["--where", "split=val"], "no image matches"),
    (["-k", "0"], "-k"),
])
def test_bad_options(world, args, message):
    args = [str(world / "desc.jsonl") if a == "DESC" else a for a in args]
    res = invoke("classify", world / "images", *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stdout == ""


def test_text_store_given_as_image_store(world, tmp_path):
    write_arrays(tmp_path / "t", np.ones((1, 32)), [{"id": "0", "text": "x"}], kind="text", model=TINY)
    res = invoke("classify", tmp_path / "t")
    assert res.exit_code == 2 and "is a text store" in res.stderr


# ----------------------------------------------------------------------------- the offline world

def test_offline_world_cbd_beats_made_up_names(tmp_path):
    """The offline world's classes have made-up names that vlmtools-micro never saw, but oracle descriptors
    in its vocabulary: clip on the names must be near chance and cbd far above it."""
    from vlmtools.models import packaged_weights

    if packaged_weights("vlmtools-micro") is None:
        pytest.skip("vlmtools/weights/vlmtools-micro.safetensors is not there yet (the micro CLIP is trained)")
    world, n_classes = tmp_path / "w", 10
    res = invoke("synth", "make", world, "--classes", n_classes, "--per-class", 12, "--domain", "both", "--seed", 0)
    assert res.exit_code == 0, res.output
    res = invoke("embed", "images", world / "manifest.jsonl", "-o", tmp_path / "s", "--model", "vlmtools-micro",
                 "--workers", "0")
    assert res.exit_code == 0, res.output
    acc = {}
    for method, extra in (("clip", ["--templates", "photo"]), ("cbd", ["-d", world / "descriptors.jsonl"])):
        out = tmp_path / f"{method}.jsonl"
        res = invoke("classify", tmp_path / "s", "--method", method, "--classes", world / "classes.txt", *extra,
                     "-o", out)
        assert res.exit_code == 0, res.output
        preds = read_lines(out.read_text())
        assert len(preds) == n_classes * 12
        acc[method] = np.mean([r["pred"] == r["label"] for r in preds])
    chance = 1 / n_classes
    assert acc["clip"] <= chance + 0.15, acc  # made-up names carry no information
    assert acc["cbd"] >= acc["clip"] + 0.3, acc


# ----------------------------------------------------------------------------- no torch from stores

def _classify_process(args, out, env=None):
    """`vlmtools classify ARGS -o OUT` in a fresh interpreter: (its predictions, the heavy packages it imported)."""
    from tests.conftest import run_cli_modules

    proc, loaded = run_cli_modules("classify", *args, "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    return read_lines(out.read_text()), loaded


def test_classify_from_stores_imports_no_torch(world, tmp_path):
    """Every embedding from stores (a descriptor text store, a prompt text store, or the text cache): the
    process imports neither torch nor open_clip, and its predictions are the numpy restatement's and the
    same command's run in a process where torch is loaded."""
    import torch  # noqa: F401  (this process: the in-process runs below resolve the device through torch)

    from vlmtools.models import ModelSpec, gpu_driver_present

    images = image_matrix(world)
    rng = np.random.default_rng(7)
    rows = [{"id": f"{c}:{j}", "text": descriptor_sentence(c, d), "class": c, "descriptor": d, "kind": k, "wrap": "cbd"}
            for c in CLASSES for j, (d, k) in enumerate(zip(*DESCRIPTORS[c]))]
    desc_emb = rng.normal(size=(len(rows), images.shape[1]))
    write_arrays(tmp_path / "desc", desc_emb, rows, kind="text", model=TINY,
                 extra_info={"source": "descriptors", "wrap": "cbd"})
    prompts = C.clip_texts(CLASSES, ["a photo of a {}."])
    prompt_emb = rng.normal(size=(len(prompts), images.shape[1]))
    write_arrays(tmp_path / "prompts", prompt_emb, [{"id": str(i), "text": t} for i, t in enumerate(prompts)],
                 kind="text", model=TINY)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cache = tmp_path / "cache"  # what a run that encoded the descriptors on the CPU (amp = fp32) left
    C.TextCache(ModelSpec.parse("vlmtools-tiny", "none"), compute="fp32",
                root=cache / "text").add([r["text"] for r in rows], unit(desc_emb))
    sims = images @ unit(desc_emb).T
    ends = np.cumsum([len(DESCRIPTORS[c][0]) for c in CLASSES])
    cbd_ref = [CLASSES[i] for i in np.stack([s.mean(1) for s in np.split(sims, ends[:-1], axis=1)], 1).argmax(1)]
    clip_ref = [CLASSES[i] for i in (images @ unit(prompt_emb).T).argmax(1)]
    device = ["--device", "cpu"] if gpu_driver_present() else []  # amp on a GPU machine asks torch
    cases = [(["--text-store", tmp_path / "desc"], cbd_ref, {}),
             (["--method", "clip", "--text-store", tmp_path / "prompts"], clip_ref, {}),
             (["-d", world / "desc.jsonl", *device], cbd_ref, {"VLMTOOLS_CACHE_DIR": str(cache)})]
    for n, (args, ref, env) in enumerate(cases):
        preds, loaded = _classify_process([world / "images", *args], tmp_path / f"p{n}.jsonl", env)
        assert loaded == [], (args, loaded)
        assert [r["pred"] for r in preds] == ref
        in_process = CliRunner(env=env).invoke(app, ["classify", str(world / "images"), *map(str, args)])
        assert in_process.exit_code == 0, in_process.output
        assert read_lines(in_process.stdout) == preds


def _record_line(meta, topk, expl, expl_true, precision, run):
    """An independent restatement of a predictions line: the record built key by key, json.dumps'd."""
    import math

    def finite(v):
        return v if not isinstance(v, float) or math.isfinite(v) else None

    rec = {k: v for k, v in meta.items()
           if k in ("id", "path", "label") or k not in ("pred", "topk", "explanation", "explanation_true",
                                                        "method", "model", "store", "precision")}
    rec["pred"] = topk[0][0]
    rec["topk"] = [{"class": c, "score": finite(s)} for c, s in topk]
    for key, triples in (("explanation", expl), ("explanation_true", expl_true)):
        if triples is not None:
            rec[key] = [{"descriptor": d, "kind": k, "score": finite(s)} for d, k, s in triples]
    rec["precision"] = precision
    rec.update(run)
    rec = {k: finite(v) if not isinstance(v, dict) else {a: finite(b) for a, b in v.items()} for k, v in rec.items()}
    return json.dumps(rec, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("meta, topk, expl, expl_true, fast", [
    ({"id": "1", "path": "/a.jpg", "label": "Laysan albatross", "split": "test"},
     [("Laysan albatross", 0.25), ("Sooty albatross", 0.125)], None, None, True),
    ({"id": "é/\"q\"", "label": "Ürün \\ \u2028", "domain": "painting", "mask": None, "x": [1, 2.5]},
     [("Ürün \\ \u2028", 1e-7), ("b\ttab", -0.5)],
     [("has a \"long\" beak", "object", 0.3), ("lives by the sea", "background", -1e-5)],
     [("a", "object", 2.0)], True),
    ({}, [("c", 0.5)], [], None, True),  # an empty manifest row, an empty explanation
    ({"id": "2", "pred": "stale", "topk": [], "method": "old", "precision": {"image": "fp16"}, "store": "s"},
     [("c", 0.5)], None, None, False),  # keys a prediction replaces
    ({"id": "2", "pred": "stale"}, [("c", 0.5)], None, None, False),
    ({"id": "3", "score": float("nan")}, [("c", 0.5)], None, None, False),
    ({"id": "4"}, [("c", float("nan")), ("d", float("inf"))], None, None, False),
    ({"id": "5"}, [("c", 1)], None, [("d", "object", float("-inf"))], False),  # an int score, -inf
])
def test_prediction_lines_equal_the_records_json(meta, topk, expl, expl_true, fast):
    from vlmtools.formats import PredictionLines

    precision = {"image": "fp16", "text": None}
    run = {"method": "cbd", "model": "ViT-B-32 (pretrained=openai)", "store": "/s/é"}
    lines = PredictionLines(precision, run)
    want = _record_line(meta, topk, expl, expl_true, precision, run)
    assert lines.line(meta, topk, expl, expl_true) == want
    assert lines.line(meta, topk, expl, expl_true) == want  # again, from the cached encodings
    # the common rows take the fast form (no record built), the rest the record's encoding
    assert lines._fast(meta, topk, expl, expl_true) == (want if fast else None)


def test_prediction_lines_redact_registered_secrets():
    from vlmtools.formats import PredictionLines
    from vlmtools.redact import add_secret, clear_secrets

    secret = "sk-test-0123456789abcdef"
    lines = PredictionLines({"image": None, "text": None}, {"method": "clip", "model": "m", "store": "s"})
    add_secret(secret)
    try:
        line = lines.line({"id": "1", "path": f"/x/{secret}.jpg"}, [(f"c {secret}", 0.5)])
    finally:
        clear_secrets()
    assert secret not in line and "[redacted]" in line and json.loads(line)["pred"] == "c [redacted]"
