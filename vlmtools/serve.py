"""`vlmtools serve STORE`: a small HTTP JSON API over one store, on localhost by default.

One process loads the store, its index and its model once and answers many queries: the shape of
clip-retrieval's back end, without its front end. Endpoints:

  GET  /                 {"format": "vlmtools.serve/1", "store", "rows", "dim", "kind", "model", "index"}
  POST /search           {"text": T | [T...], "id": ID | [ID...], "image_base64": B64 | [...],
                          "embedding": [floats] | [[floats]...], "k": 10, "where": {"KEY": "VALUE"}}
                         -> {"results": [hit, ...]}: the hits of `vlmtools search` (rank, score, the row's
                         metadata, and "query" when there are several queries)
  POST /knn-service      clip-retrieval's request names (text, image, embedding_input, num_images)
                         -> a list of hits with "similarity"
  GET  /indices-list     [the store's name]

Requests are bounded (body size, queries per request, k); errors are {"error": message} with 400 for
bad input, 404, 405, 413, and 500 for internal errors (the server goes on).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlmtools.errors import BadInput
from vlmtools.formats import SERVE_FORMAT

MAX_BODY = 8 << 20  # bytes per request
MAX_QUERIES = 64  # queries per request
TIMEOUT = 30.0  # seconds a client may take to send its request


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _decode_image(data, i: int):
    import base64
    import binascii
    import io

    from vlmtools.images import load_rgb

    if not isinstance(data, str):
        raise BadInput(f"image_base64[{i}]: expected a base64 string")
    try:
        return load_rgb(io.BytesIO(base64.b64decode(data.split(",", 1)[-1], validate=True)))
    except (binascii.Error, OSError, ValueError) as exc:  # bad base64, unreadable or truncated image
        raise BadInput(f"image_base64[{i}]: not a readable image ({type(exc).__name__})") from None


class Service:
    """The request logic, apart from HTTP: a Searcher and the bounds."""

    def __init__(self, searcher, max_k: int = 1000):
        self.searcher = searcher
        self.max_k = max_k
        self._lock = threading.Lock()  # one query batch at a time through the model and the index

    def summary(self) -> dict:
        reader = self.searcher.reader
        return {"format": SERVE_FORMAT, "store": str(reader.path), "rows": len(reader), "dim": reader.dim,
                "kind": reader.info.get("kind"), "model": reader.info.get("model"),
                "index": self.searcher.method}

    def search(self, request) -> list[dict]:
        import numpy as np

        if not isinstance(request, dict):
            raise BadInput("the request body must be a JSON object")
        unknown = set(request) - {"text", "id", "image_base64", "embedding", "k", "where"}
        if unknown:
            raise BadInput(f"unknown request field(s): {', '.join(sorted(unknown))}")
        texts = _as_list(request.get("text"))
        ids = [str(i) for i in _as_list(request.get("id"))]
        images = _as_list(request.get("image_base64"))
        embedding = request.get("embedding")
        if embedding is not None and embedding and not isinstance(embedding[0], list):
            embedding = [embedding]
        embedding = embedding or []
        if not all(isinstance(t, str) for t in texts):
            raise BadInput("text: expected a string or a list of strings")
        count = len(texts) + len(ids) + len(images) + len(embedding)
        if count == 0:
            raise BadInput("no query: give text, id, image_base64 or embedding")
        if count > MAX_QUERIES:
            raise BadInput(f"{count} queries in one request; at most {MAX_QUERIES}")
        k = request.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise BadInput(f"k: expected an integer from 1 to {self.max_k}")
        where = request.get("where") or {}
        if not isinstance(where, dict) or not all(isinstance(v, (str, int, float)) for v in where.values()):
            raise BadInput('where: expected an object {"KEY": "VALUE", ...}')
        where = [f"{key}={value}" for key, value in where.items()]
        pil = [_decode_image(data, i) for i, data in enumerate(images)]
        with self._lock:
            vectors, names = self.searcher.vectors(texts, pil, ids)
            if embedding:
                try:
                    extra = np.asarray(embedding, dtype=np.float32)
                except (ValueError, TypeError):
                    raise BadInput("embedding: expected a list of numbers (or of lists of numbers)") from None
                if extra.ndim != 2 or extra.shape[1] != self.searcher.reader.dim:
                    raise BadInput(f"embedding: expected {self.searcher.reader.dim} numbers per query")
                vectors = np.concatenate([vectors, extra])
                names = names + [f"embedding {i + 1}" for i in range(len(extra))]
            return self.searcher.search(vectors, names, k, where)

    def knn_service(self, request) -> list[dict]:
        """clip-retrieval's back-end request names mapped onto search; hits carry "similarity"."""
        if not isinstance(request, dict):
            raise BadInput("the request body must be a JSON object")
        mapped = {"text": request.get("text"), "image_base64": request.get("image"),
                  "embedding": request.get("embedding_input"), "k": request.get("num_images", 10)}
        hits = self.search({key: value for key, value in mapped.items() if value is not None})
        return [{"similarity": h["score"], **h} for h in hits]


def _handler(service: Service):
    from vlmtools.console import debug, error

    class Handler(BaseHTTPRequestHandler):
        server_version = "vlmtools-serve"
        timeout = TIMEOUT

        def _send(self, status: int, obj) -> None:
            body = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's names)
            if self.path in ("/", "/info"):
                self._send(200, service.summary())
            elif self.path == "/indices-list":
                self._send(200, [Path(str(service.searcher.reader.path)).name])
            else:
                self._send(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):  # noqa: N802
            routes = {"/search": lambda r: {"results": service.search(r)}, "/knn-service": service.knn_service}
            if self.path not in routes:
                self._send(404 if self.path not in ("/", "/info", "/indices-list") else 405,
                           {"error": f"no such endpoint: POST {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self._send(413, {"error": f"the request body must be 0 to {MAX_BODY} bytes"})
                return
            try:
                request = json.loads(self.rfile.read(length).decode("utf-8") or "{}")
                self._send(200, routes[self.path](request))
            except (ValueError, BadInput) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                self._send(400, {"error": str(exc)})
            except Exception as exc:  # a bug: say so, keep serving
                error(f"internal error on {self.path}: {type(exc).__name__}: {exc}")
                self._send(500, {"error": f"internal error: {type(exc).__name__}"})

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            debug(f"{self.address_string()} {format % args}")

    return Handler


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound server (not yet serving); ``server.server_address`` has the actual port."""
    server = ThreadingHTTPServer((host, port), _handler(service))
    server.daemon_threads = True
    return server


def serve(store, *, host: str = "127.0.0.1", port: int = 1234, max_k: int = 1000, model: str | None = None,
          pretrained: str | None = None, device: str = "auto", exact: bool = False, precision: str = "amp") -> None:
    """`vlmtools serve`: load the store, its index and its model once, then answer until ^C."""
    from vlmtools.console import info
    from vlmtools.search import Searcher

    searcher = Searcher(store, model, pretrained, device, exact=exact, precision=precision)
    searcher.encoder()  # load the model now: the first query is as fast as the others, errors show at once
    service = Service(searcher, max_k=max_k)
    try:
        server = make_server(service, host, port)
    except OSError as exc:
        raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound_host, bound_port = server.server_address[:2]
    summary = service.summary()
    info(f"serving {summary['store']} ({summary['rows']} rows, {summary['index']}) on "
         f"http://{bound_host}:{bound_port}/ (POST /search, GET /); ^C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        info("stopped")
    finally:
        server.server_close()
