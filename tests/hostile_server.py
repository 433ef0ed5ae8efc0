"""A scripted, hostile OpenAI-compatible server on 127.0.0.1 for the fault suite and benchmarks/hostile.py.

Plain sockets, so that a test controls every byte and every delay: ``script(request) -> [(bytes, delay)]``
is sent piece by piece, each piece after its delay. ``request`` is {"method", "path", "headers" (lower-case
names), "body" (parsed JSON or None)}. Each connection is served in its own daemon thread; ``close()``
stops accepting and drops the open connections.
"""

from __future__ import annotations

import json
import socket
import threading
import time


def http_response(body: bytes | str, status: int = 200, content_type: str = "application/json",
                  extra_headers: dict | None = None) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 500: "Internal Server Error"}.get(status, "X")
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close",
               **(extra_headers or {})}
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def chat_body(text: str, finish_reason: str = "stop", **extra) -> str:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish_reason}], **extra})


class HostileServer:
    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            self._open.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> dict | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        try:
            body = json.loads(rest) if rest else None
        except ValueError:
            body = None
        return {"method": method, "path": path, "headers": headers, "body": body}

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = self._read_request(conn)
            if request is None:
                return
            self.requests.append(request)
            for piece, delay in self.script(request):
                if delay:
                    if self._stop.wait(delay):
                        return
                conn.sendall(piece)
        except OSError:
            pass  # the client hung up (a deadline, a test that is done)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for conn in self._open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)


def trickle(data: bytes, every: float):
    """``data`` one byte at a time, ``every`` seconds apart."""
    return [(data[i:i + 1], every if i else 0) for i in range(len(data))]


def wait_for(predicate, timeout: float = 30.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


ECHO_PLACES = ("finish_reason", "content", "extra-field", "error-message", "header-echo")


def echo_auth(where: str):
    """A script that echoes the request's Authorization header back in one place of its answer."""
    def script(request):
        auth = request["headers"].get("authorization", "")
        if where == "finish_reason":
            return [(http_response(chat_body("- wings", finish_reason=auth)), 0)]
        if where == "content":
            return [(http_response(chat_body(f"- wings\n- {auth}")), 0)]
        if where == "extra-field":
            return [(http_response(chat_body("- wings", system_fingerprint=auth)), 0)]
        if where == "header-echo":
            return [(http_response(json.dumps({"error": {"message": "no"}}), 401, extra_headers={"X-Echo": auth}), 0)]
        return [(http_response(json.dumps({"error": {"message": f"bad key {auth}"}}), 400), 0)]
    return script
