"""`vlmtools serve STORE`: a small HTTP JSON API over one store, on localhost by default.

One process loads the store, its index and its model once and answers many queries: the shape of
clip-retrieval's back end, without its front end. Endpoints:

  GET  /                 {"format": "vlmtools.serve/1", "store", "rows", "dim", "kind", "model", "index"}
  POST /search           {"text": T | [T...], "id": ID | [ID...], "image_base64": B64 | [...],
                          "embedding": [floats] | [[floats]...], "k": 10, "where": {"KEY": "VALUE"}}
                         -> {"results": [hit, ...]}: the hits of `vlmtools search` (rank, score, the row's
                         metadata, and "query" when there are several queries)
  POST /knn-service      clip-retrieval's request names (text, image, embedding_input, num_images)
                         -> a list of hits with "similarity", "id", "url" (the row's image through
                         GET /image/ID) and "caption" (the row's caption, text or label), as its front end reads
  GET  /image/ID         the image file of the row with that id (only files the store's rows name)
  GET  /indices-list     [the store's name]

Built on the standard library's http.server, hardened here rather than moved to uvicorn + Starlette:
the API is three small routes; what http.server leaves to its user (bounded bodies, a deadline on
receiving a request, strict JSON, quiet disconnects, a graceful stop) takes a few dozen lines, and
uvicorn would not have removed the main one (it has no deadline on receiving a request body either), while
it would add an extra to install. Requests are bounded: body size, a deadline to receive the whole request
(408), strict JSON (duplicate keys, deep nesting: 400), queries per request, k. Errors are
{"error": message} with 400 for bad input, 404, 405, 408, 411, 413; 500 only for a bug (the server goes on).
SIGTERM and ^C stop accepting, let requests in flight finish, and exit 0.
"""

from __future__ import annotations

import math
import mimetypes
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

from vlmtools.errors import BadInput
from vlmtools.formats import SERVE_FORMAT, JsonProblem, dumps, parse_json

MAX_BODY = 8 << 20  # bytes per request
MAX_QUERIES = 64  # queries per request
REQUEST_DEADLINE = 10.0  # seconds a client may take to send its whole request (headers and body)
LOOPBACK = ("localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _embeddings(value, dim: int):
    """``embedding`` of a request as a (Q, dim) float32 array of unit rows; BadInput for anything else:
    strings, booleans, NaN/inf, ragged or empty lists, zero vectors."""
    import numpy as np

    rows = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
    for row in rows:
        if not isinstance(row, list) or not all(_is_number(v) for v in row):
            raise BadInput("embedding: expected a list of numbers (or of lists of numbers)")
        if len(row) != dim:
            raise BadInput(f"embedding: expected {dim} numbers per query, got {len(row)}")
        if not all(math.isfinite(v) for v in row):
            raise BadInput("embedding: NaN or infinite values")
    out = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if not np.isfinite(norms).all() or (norms == 0).any():
        raise BadInput("embedding: a zero (or too large) vector has no direction")
    return (out / norms).astype(np.float32)  # cosine scores, as for the store's normalized rows


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
        if not isinstance(request, dict):
            raise BadInput("the request body must be a JSON object")
        unknown = set(request) - {"text", "id", "image_base64", "embedding", "k", "where"}
        if unknown:
            raise BadInput(f"unknown request field(s): {', '.join(sorted(unknown))}")
        texts = _as_list(request.get("text"))
        ids = _as_list(request.get("id"))
        images = _as_list(request.get("image_base64"))
        embedding = request.get("embedding")
        if not all(isinstance(t, str) for t in texts):
            raise BadInput("text: expected a string or a list of strings")
        if not all(isinstance(i, str) or _is_number(i) for i in ids):
            raise BadInput("id: expected a row id (a string or a number) or a list of them")
        ids = [str(i) for i in ids]
        n_embeddings = 0
        if embedding is not None and embedding != []:
            if not isinstance(embedding, list):
                raise BadInput("embedding: expected a list of numbers (or of lists of numbers)")
            n_embeddings = len(embedding) if isinstance(embedding[0], list) else 1
        count = len(texts) + len(ids) + len(images) + n_embeddings
        if count == 0:
            raise BadInput("no query: give text, id, image_base64 or embedding")
        if count > MAX_QUERIES:
            raise BadInput(f"{count} queries in one request; at most {MAX_QUERIES}")
        extra = _embeddings(embedding, self.searcher.reader.dim) if n_embeddings else None
        k = request.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise BadInput(f"k: expected an integer from 1 to {self.max_k}")
        where = request.get("where") or {}
        if not isinstance(where, dict) or not all(isinstance(v, str) or _is_number(v) for v in where.values()):
            raise BadInput('where: expected an object {"KEY": "VALUE", ...}')
        where = [f"{key}={value}" for key, value in where.items()]
        pil = [_decode_image(data, i) for i, data in enumerate(images)]
        with self._lock:
            vectors, names = self.searcher.vectors(texts, pil, ids)
            if extra is not None:
                import numpy as np

                vectors = np.concatenate([vectors, extra])
                names = names + [f"embedding {i + 1}" for i in range(len(extra))]
            return self.searcher.search(vectors, names, k, where)

    def knn_service(self, request, base_url: str = "") -> list[dict]:
        """clip-retrieval's back-end request names mapped onto search; hits carry "similarity", and "url"
        and "caption" as its front end reads them (``base_url``: how the client reaches this server)."""
        if not isinstance(request, dict):
            raise BadInput("the request body must be a JSON object")
        mapped = {"text": request.get("text"), "image_base64": request.get("image"),
                  "embedding": request.get("embedding_input"), "k": request.get("num_images", 10)}
        hits = self.search({key: value for key, value in mapped.items() if value is not None})
        out = []
        for h in hits:
            hit = {"similarity": h["score"], **h}
            if h.get("path") and h.get("id") is not None:
                hit.setdefault("url", f"{base_url}/image/{quote(str(h['id']), safe='')}")
            caption = next((h[k] for k in ("caption", "text", "label") if isinstance(h.get(k), str)), None)
            if caption is not None:
                hit.setdefault("caption", caption)
            out.append(hit)
        return out

    def image(self, row_id: str) -> tuple[bytes, str]:
        """(bytes, content type) of the image file of the row ``row_id``: only files the store names."""
        reader = self.searcher.reader
        try:
            row = self.searcher.row_of(row_id)
        except BadInput:
            raise LookupError(f"no row of {reader.path.name} has id {row_id!r}") from None
        path = reader.meta[row].get("path")
        if not isinstance(path, str) or not path:
            raise LookupError(f"row {row_id!r} names no image file")
        from vlmtools.wds import member_source, read_source, split_member_path

        member = split_member_path(path)
        try:
            data = read_source(member_source(*member)) if member else Path(path).read_bytes()
        except (OSError, KeyError, ValueError):
            raise LookupError(f"the image of row {row_id!r} cannot be read") from None
        name = member[1] if member else path
        return data, mimetypes.guess_type(name)[0] or "application/octet-stream"


class RequestTimeout(Exception):
    """The client did not send its whole request within the deadline."""


def _handler(service: Service, deadline: float):
    from vlmtools.console import debug, error

    class Handler(BaseHTTPRequestHandler):
        server_version = "vlmtools-serve"
        protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive connections to hold
        timeout = deadline  # per read while the request line and headers arrive

        def setup(self):
            super().setup()
            self._started = time.monotonic()
            # the per-read timeout restarts with every byte: a client trickling its headers is cut off
            # at the deadline by closing the reading side of its connection
            self._watchdog = threading.Timer(deadline, self._cut_off)
            self._watchdog.daemon = True
            self._watchdog.start()
            debug(f"{self.address_string()}: connection open")

        def _cut_off(self) -> None:
            try:
                self.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # reads the headers
            self._watchdog.cancel()  # the headers are in; the body has its own deadline (_read_body)
            return parsed

        def finish(self):
            self._watchdog.cancel()
            try:
                super().finish()
            except (ConnectionError, socket.timeout):
                pass

        def _send(self, status: int, obj, content_type: str = "application/json; charset=utf-8") -> None:
            body = obj if isinstance(obj, bytes) else (dumps(obj) + "\n").encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (ConnectionError, socket.timeout):  # the client went away: nothing to tell it
                debug(f"{self.address_string()}: connection closed before the answer was sent")
                self.close_connection = True

        def do_GET(self):  # noqa: N802 (http.server's names)
            path = self.path.split("?", 1)[0]
            if path in ("/", "/info"):
                self._send(200, service.summary())
            elif path == "/indices-list":
                self._send(200, [Path(str(service.searcher.reader.path)).name])
            elif path.startswith("/image/"):
                try:
                    data, kind = service.image(unquote(path[len("/image/"):]))
                except LookupError as exc:
                    self._send(404, {"error": str(exc)})
                    return
                self._send(200, data, kind)
            else:
                self._send(404, {"error": f"no such endpoint: GET {path}"})

        def _read_body(self) -> bytes:
            """The request body, whole, within the deadline of this request; errors as (status, message)."""
            if self.headers.get("Transfer-Encoding"):
                raise _Refusal(411, "send the body with a Content-Length (chunked bodies are not read)")
            given = self.headers.get_all("Content-Length") or []
            if len(given) > 1:
                raise _Refusal(400, "more than one Content-Length header")
            text = (given[0] if given else "0").strip()
            if not text.isdigit():
                raise _Refusal(400, f"Content-Length {text[:40]!r} is not a number of bytes")
            length = int(text)
            if length > MAX_BODY:
                raise _Refusal(413, f"the request body must be 0 to {MAX_BODY} bytes")
            chunks, got = [], 0
            while got < length:
                left = self._started + deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout
                self.connection.settimeout(left)
                try:
                    chunk = self.rfile.read1(length - got)
                except socket.timeout:
                    raise RequestTimeout from None
                if not chunk:
                    raise _Refusal(400, f"the body ended after {got} of the {length} bytes Content-Length promised")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        def do_POST(self):  # noqa: N802
            base = f"http://{self.headers.get('Host') or '%s:%d' % self.server.server_address[:2]}"
            routes = {"/search": lambda r: {"results": service.search(r)},
                      "/knn-service": lambda r: service.knn_service(r, base)}
            path = self.path.split("?", 1)[0]
            if path not in routes:
                self._send(404 if path not in ("/", "/info", "/indices-list") else 405,
                           {"error": f"no such endpoint: POST {path}"})
                return
            try:
                body = self._read_body()
                try:
                    request = parse_json(body.decode("utf-8") or "{}")
                except UnicodeDecodeError:
                    raise _Refusal(400, "the request body is not UTF-8 text") from None
                except (JsonProblem, ValueError) as exc:  # JSONDecodeError is a ValueError
                    raise _Refusal(400, f"the request body is not valid JSON ({exc})") from None
                self._send(200, routes[path](request))
            except RequestTimeout:
                self._send(408, {"error": f"the request did not arrive whole within {deadline:g} s"})
                self.close_connection = True
            except _Refusal as exc:
                self._send(exc.status, {"error": exc.message})
                self.close_connection = True
            except BadInput as exc:
                self._send(400, {"error": str(exc)})
            except (ConnectionError, socket.timeout):
                debug(f"{self.address_string()}: connection closed while reading the request")
                self.close_connection = True
            except Exception as exc:  # a bug: say so, keep serving
                error(f"internal error on {path}: {type(exc).__name__}: {exc}")
                self._send(500, {"error": f"internal error: {type(exc).__name__}"})

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            debug(f"{self.address_string()} {format % args}")

    return Handler


class _Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Server(ThreadingHTTPServer):
    """Request threads are joined on close (block_on_close), so a stop lets the requests in flight
    finish; clients that hang up are logged quietly, not with a traceback."""

    daemon_threads = False
    block_on_close = True

    def handle_error(self, request, client_address):
        import sys

        from vlmtools.console import debug, error

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            debug(f"{client_address[0]}: {type(exc).__name__} ({exc})")
        else:
            error(f"internal error serving {client_address[0]}: {type(exc).__name__}: {exc}")


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0,
                request_deadline: float = REQUEST_DEADLINE) -> Server:
    """A bound server (not yet serving); ``server.server_address`` has the actual port."""
    return Server((host, port), _handler(service, request_deadline))


def serve(store, *, host: str = "127.0.0.1", port: int = 1234, max_k: int = 1000, model: str | None = None,
          pretrained: str | None = None, device: str = "auto", exact: bool = False, precision: str = "amp",
          request_deadline: float = REQUEST_DEADLINE) -> None:
    """`vlmtools serve`: load the store, its index and its model once, then answer until ^C or SIGTERM."""
    import signal

    from vlmtools.console import debug, info, warn
    from vlmtools.search import Searcher

    if not request_deadline > 0:
        raise BadInput(f"--request-timeout {request_deadline}: expected a positive number of seconds")
    searcher = Searcher(store, model, pretrained, device, exact=exact, precision=precision)
    searcher.encoder()  # load the model now: the first query is as fast as the others, errors show at once
    service = Service(searcher, max_k=max_k)
    try:
        server = make_server(service, host, port, request_deadline)
    except (OSError, OverflowError) as exc:
        raise BadInput(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    if not is_loopback(host):
        warn(f"--host {host}: anyone who can reach this address can query the store and read its rows' "
             f"metadata and images; there is no authentication (keep it on 127.0.0.1 or put a proxy with "
             f"authentication in front)")
    stopping = threading.Event()

    def stop(signum, frame):  # shutdown() waits for serve_forever to return: call it from another thread
        if not stopping.is_set():
            stopping.set()
            debug("SIGTERM: shutting down once the requests in flight are answered")
            threading.Thread(target=server.shutdown, daemon=True).start()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (a library caller): ^C and shutdown() stop it
        previous = None
    bound_host, bound_port = server.server_address[:2]
    summary = service.summary()
    info(f"serving {summary['store']} ({summary['rows']} rows, {summary['index']}) on "
         f"http://{bound_host}:{bound_port}/ (POST /search, GET /); ^C stops")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM while finishing changes nothing
        server.server_close()  # joins the requests in flight
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    info("stopped")
