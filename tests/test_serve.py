"""`vlmtools serve`: a real HTTP server on 127.0.0.1, queried with real HTTP requests (urllib)."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from vlmtools.search import Searcher
from vlmtools.serve import MAX_QUERIES, Service, make_server
from vlmtools.store import write_arrays

TEXTS = ["a small red bird", "a large grey seabird", "a yellow songbird", "a brown owl", "a green parrot"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_encoder):
    path = tmp_path_factory.mktemp("serve") / "texts"
    meta = [{"id": f"t{i}", "text": t, "split": "a" if i % 2 else "b"} for i, t in enumerate(TEXTS)]
    write_arrays(path, tiny_encoder.encode_texts(TEXTS), meta, kind="text", model=tiny_encoder.spec.as_dict())
    return path


@pytest.fixture(scope="module")
def base_url(store):
    server = make_server(Service(Searcher(store), max_k=50), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_info_and_text_search(base_url, store):
    status, info = call(base_url + "/")
    assert status == 200 and info["rows"] == len(TEXTS) and info["format"] == "vlmtools.serve/1"
    status, out = call(base_url + "/search", {"text": TEXTS[2], "k": 2})
    assert status == 200 and [h["rank"] for h in out["results"]] == [1, 2]
    assert out["results"][0]["id"] == "t2" and out["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_several_queries_ids_where_embedding_and_image(base_url, tiny_encoder):
    status, out = call(base_url + "/search", {"text": [TEXTS[0], TEXTS[3]], "id": "t1", "k": 1})
    assert status == 200 and [(h["query"], h["id"]) for h in out["results"]] == \
        [(TEXTS[0], "t0"), (TEXTS[3], "t3"), ("t1", "t1")]
    status, out = call(base_url + "/search", {"id": "t0", "k": 5, "where": {"split": "a"}})
    assert status == 200 and {h["id"] for h in out["results"]} == {"t1", "t3"}
    vector = tiny_encoder.encode_texts([TEXTS[4]])[0].tolist()
    status, out = call(base_url + "/knn-service", {"embedding_input": vector, "num_images": 1})
    assert status == 200 and out[0]["id"] == "t4" and out[0]["similarity"] == out[0]["score"]
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(buf, format="PNG")
    status, out = call(base_url + "/search", {"image_base64": base64.b64encode(buf.getvalue()).decode(), "k": 3})
    assert status == 200 and len(out["results"]) == 3


@pytest.mark.parametrize("body, message", [
    ({}, "no query"),
    ({"text": "x", "k": 0}, "k: expected"),
    ({"text": "x", "k": 51}, "k: expected"),
    ({"text": ["x"] * (MAX_QUERIES + 1)}, "at most"),
    ({"id": "missing"}, "--id missing"),
    ({"text": "x", "colour": 1}, "unknown request field"),
    ({"image_base64": "bm90IGFuIGltYWdl"}, "not a readable image"),
    ({"embedding": [1.0, 2.0]}, "numbers per query"),
    ({"id": "t0", "where": {"split": "zzz"}}, "no row"),
])
def test_bad_requests_are_400_and_the_server_goes_on(base_url, body, message):
    status, out = call(base_url + "/search", body)
    assert status == 400 and message in out["error"]
    assert call(base_url + "/search", {"id": "t0", "k": 1})[0] == 200


def test_not_json_unknown_endpoint_and_too_large(base_url):
    assert call(base_url + "/search", raw=b"{not json")[0] == 400
    assert call(base_url + "/nope")[0] == 404
    assert call(base_url + "/", {"text": "x"})[0] == 405
    request = urllib.request.Request(base_url + "/search", data=b"{}", method="POST",
                                     headers={"Content-Length": str(100 << 20)})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413


@pytest.mark.slow
def test_cli_serve_answers_then_stops_on_interrupt(store):
    """The command itself: one model load, a real request, ^C ends it with status 0."""
    env = {**os.environ, "VLMTOOLS_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmtools", "serve", str(store), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited early"
        url = line.split("on ", 1)[1].split()[0].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        status, out = call(url + "/search", {"text": TEXTS[1], "k": 1})
        assert status == 200 and out["results"][0]["id"] == "t1"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in err and proc.stdout is not None
