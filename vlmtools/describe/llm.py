"""A thin wrapper over the openai client: one request in, one answer (text) out. ``api="chat"`` (the
default) sends the prompt as a user message to /v1/chat/completions; ``api="completions"`` sends it as is
to /v1/completions, as Menon & Vondrick did (instruct models, local servers that only offer completions).

Retries with backoff on 408/409/429/5xx, connection errors and timeouts are the openai client's own
(`max_retries`; it honours the server's retry-after / retry-after-ms headers). ``timeout`` is a total
deadline per attempt: the HTTP client's own timeouts bound each read, so a server trickling a byte a
second would hold an attempt for ever; DeadlineTransport closes the connection when the deadline passes.
A request that still fails raises LLMError with a one-line reason.

The API key comes only from OPENAI_API_KEY. Credentials written into the base URL (``http://user:pass@``)
are not sent (the HTTP client would turn them into an ``Authorization: Basic`` header that a server may
echo); the key and those credentials are registered with vlmtools.redact, so that no file vlmtools writes
and no message it prints holds them, in any field and in their encoded forms.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from vlmtools import redact as _redact
from vlmtools.describe.cache import ResponseCache
from vlmtools.errors import BadInput, ModelUnavailable, VlmError

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 4
# Local servers (llama.cpp, vLLM, Ollama) usually ignore the key, but the openai client insists on one.
LOCAL_PLACEHOLDER_KEY = "sk-local-no-key"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
DEFAULT_BASE_URL = "https://api.openai.com/v1"
APIS = ("chat", "completions")
MAX_RESPONSE_BYTES = 16 << 20  # one HTTP answer; a chat answer of even 32k tokens is far smaller
MAX_ANSWER_CHARS = 1 << 20     # characters in one answer (100 tokens is ~400; a long answer ~100k)


class LLMError(VlmError):
    """One request failed for good (after the client's retries); the run goes on with other classes."""


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    cached: bool


def is_local(base_url: str | None) -> bool:
    host = urlparse(base_url or "").hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.") or host.endswith(".localhost")


def resolve_api_key(base_url: str | None) -> str:
    """OPENAI_API_KEY; when unset and the server is on this machine, a placeholder; otherwise BadInput."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if is_local(base_url):
        return LOCAL_PLACEHOLDER_KEY
    where = base_url or "the OpenAI API"
    raise BadInput(f"OPENAI_API_KEY is not set; it is needed for {where} "
                   "(a server on localhost/127.0.0.1 via --base-url works without one)")


def redact(text: str, *secrets: str | None) -> str:
    """Replace each secret, and its encoded forms, wherever it appears (short secrets are left alone: too
    likely to be words), then every secret registered with vlmtools.redact."""
    for secret in secrets:
        if secret and len(secret) >= _redact.MIN_SECRET:
            for form in sorted(_redact.encoded_forms(secret), key=len, reverse=True):
                text = text.replace(form, _redact.REDACTED)
    return _redact.scrub(text)


def url_secrets(url: str | None) -> list[str]:
    """The credentials inside a URL (``https://user:pass@host/``), longest first."""
    parts = urlparse(url or "")
    found = [v for v in (parts.password, parts.username) if v]
    if parts.username and parts.password:
        found.insert(0, f"{parts.username}:{parts.password}")
    return found


def public_url(url: str) -> str:
    """The URL without credentials: what may be printed, cached or written."""
    return _without_userinfo(url, "[redacted]@")


def _without_userinfo(url: str, replacement: str = "") -> str:
    parts = urlparse(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]  # host[:port] as written (IPv6 brackets kept)
    return parts._replace(netloc=replacement + netloc).geturl()


class AnswerTooLarge(Exception):
    """The server sent more than MAX_RESPONSE_BYTES; not retried."""


def _httpx():
    """The httpx module the installed openai client is built on (httpx, or its successor httpx2)."""
    import openai

    base = next(c for c in openai.DefaultHttpxClient.__mro__[1:] if c.__name__ == "Client")
    return sys.modules[base.__module__.split(".")[0]]


def deadline_http_client(seconds: float):
    """An HTTP client for the openai client whose every attempt ends after ``seconds`` in all, however
    slowly the server sends (a per-read timeout restarts with every byte), and that refuses answers over
    MAX_RESPONSE_BYTES."""
    httpx = _httpx()

    class DeadlineTransport(httpx.BaseTransport):
        def __init__(self):
            # No keep-alive: each attempt opens its own connection, whose socket the deadline can close.
            # A new connection per request costs little beside an LLM's answer time.
            self.inner = httpx.HTTPTransport(limits=httpx.Limits(max_connections=100, max_keepalive_connections=0))

        def handle_request(self, request):
            streams: list = []
            given = request.extensions.get("trace")

            def trace(name: str, info: dict) -> None:
                if name.endswith((".connect_tcp.complete", ".start_tls.complete")) and info.get("return_value"):
                    streams.append(info["return_value"])
                if given is not None:
                    given(name, info)

            request.extensions = {**request.extensions, "trace": trace}
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                for stream in streams:
                    try:
                        stream.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
                    except (OSError, AttributeError):
                        pass

            timer = threading.Timer(seconds, expire)
            timer.daemon = True
            timer.start()
            try:
                response = self.inner.handle_request(request)
                try:
                    body, size = [], 0
                    for chunk in response.stream:  # the whole answer, read under the deadline
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            raise AnswerTooLarge(f"an answer larger than {MAX_RESPONSE_BYTES >> 20} MiB")
                        body.append(chunk)
                finally:
                    response.close()
            except AnswerTooLarge:
                raise
            except Exception:
                if expired.is_set():
                    raise httpx.ReadTimeout(f"no whole answer within {seconds:g}s", request=request) from None
                raise
            finally:
                timer.cancel()
            return httpx.Response(response.status_code, headers=response.headers,
                                  stream=httpx.ByteStream(b"".join(body)), extensions=response.extensions)

        def close(self) -> None:
            self.inner.close()

    return httpx.Client(transport=DeadlineTransport(), timeout=seconds, follow_redirects=True)


class LLMClient:
    def __init__(self, model: str | None = None, base_url: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 cache: ResponseCache | None = None, api: str = "chat"):
        if api not in APIS:
            raise BadInput(f"--api {api!r}: expected one of {'|'.join(APIS)}")
        if timeout <= 0:
            raise BadInput(f"--timeout {timeout}: must be positive")
        if max_retries < 0:
            raise BadInput(f"--max-retries {max_retries}: must be 0 or more")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._given_url = base_url
        given = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url_secrets = url_secrets(given)
        _redact.add_secret(*self._url_secrets)  # from every file and message, whoever echoes them
        self.shown_url = public_url(given)  # never the credentials: in messages, cache, output
        self.base_url = _without_userinfo(given)  # what is contacted: credentials are never sent
        if self._url_secrets:
            from vlmtools.console import warn

            warn(f"--base-url {self.shown_url}: credentials in the URL are not sent (they would travel as an "
                 f"HTTP Basic header); the API key comes from OPENAI_API_KEY")
        self._key = os.environ.get("OPENAI_API_KEY", "").strip() or None
        _redact.add_secret(self._key)
        self._client = None  # built on first use: printing prompts needs no key
        self._lock = threading.Lock()
        self.model = model or DEFAULT_MODEL
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache = cache
        self.api = api

    def check_key(self) -> None:
        """BadInput now, before anything is written, if no key can be used for this server."""
        self._openai()

    def _openai(self):
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                self._key = resolve_api_key(self._given_url and public_url(self._given_url))
                _redact.add_secret(self._key)
                self._client = OpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout,
                                      max_retries=self.max_retries,
                                      http_client=deadline_http_client(self.timeout))
            return self._client

    def redact(self, text: str) -> str:
        """``text`` without the API key or the base URL's credentials (answers may echo them)."""
        return redact(text, self._key, *self._url_secrets)

    def request(self, prompt: str, *, temperature: float, max_tokens: int, sample: int = 0) -> dict:
        """The request's identity: what the cache is keyed on (no key, no timeouts)."""
        if self.api == "completions":
            return {"base_url": self.shown_url, "model": self.model, "api": "completions", "prompt": prompt,
                    "temperature": temperature, "max_tokens": max_tokens, "sample": sample}
        return {"base_url": self.shown_url, "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": temperature, "max_tokens": max_tokens, "sample": sample}

    def complete(self, prompt: str, *, temperature: float, max_tokens: int, sample: int = 0) -> Answer:
        """Ask once (the client retries); ``sample`` tells repeated samples apart in the cache."""
        request = self.request(prompt, temperature=temperature, max_tokens=max_tokens, sample=sample)
        if self.cache is not None:
            hit = self.cache.get(request)
            if hit is not None and len(hit["text"]) <= MAX_ANSWER_CHARS:
                return Answer(self.redact(hit["text"]), _finish(hit.get("finish_reason")), cached=True)
        text, finish_reason = self._ask(request)
        if len(text) > MAX_ANSWER_CHARS:  # refused before the cache keeps it: a rerun asks again
            raise LLMError(f"malformed response: an answer of {len(text):,} characters (at most "
                           f"{MAX_ANSWER_CHARS:,}; is --max-tokens ignored by the server?)")
        text = self.redact(text)  # a server may echo the key or the URL's credentials
        finish_reason = _finish(finish_reason)
        if self.cache is not None and text.strip():
            self.cache.put(request, text, finish_reason)
        return Answer(text, finish_reason, cached=False)

    def forget(self, prompt: str, *, temperature: float, max_tokens: int, sample: int = 0) -> None:
        """Drop the cached answer to this request: the caller refused it, and a rerun must ask the server
        again rather than replay it."""
        if self.cache is not None:
            self.cache.discard(self.request(prompt, temperature=temperature, max_tokens=max_tokens,
                                            sample=sample))

    def _ask(self, request: dict) -> tuple[str, str | None]:
        import openai

        tries = f"after {self.max_retries} retries" if self.max_retries else "(no retries)"
        try:
            if self.api == "completions":
                response = self._openai().completions.create(
                    model=request["model"], prompt=request["prompt"],
                    temperature=request["temperature"], max_tokens=request["max_tokens"])
            else:
                response = self._openai().chat.completions.create(
                    model=request["model"], messages=request["messages"],
                    temperature=request["temperature"], max_tokens=request["max_tokens"])
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            # Every other class would fail the same way: stop the run (exit 2).
            raise BadInput(self.redact(f"{self.shown_url} refused the API key (HTTP {exc.status_code}): "
                                       f"{_message(exc)}")) from None
        except openai.NotFoundError as exc:
            raise ModelUnavailable(self.redact(f"model {self.model!r} or endpoint not found at {self.shown_url} "
                                               f"(HTTP 404): {_message(exc)}")) from None
        except AnswerTooLarge as exc:
            raise LLMError(f"malformed response from {self.shown_url} ({exc})") from None
        except openai.APITimeoutError:
            raise LLMError(f"timed out after {self.timeout:g}s {tries}") from None
        except openai.APIConnectionError as exc:
            if isinstance(exc.__cause__, AnswerTooLarge):  # openai clients that wrap transport errors
                raise LLMError(f"malformed response from {self.shown_url} ({exc.__cause__})") from None
            raise LLMError(self.redact(f"cannot reach {self.shown_url} {tries}: {_message(exc)}")) from None
        except openai.RateLimitError as exc:
            raise LLMError(self.redact(f"rate limited (HTTP 429) {tries}: {_message(exc)}")) from None
        except openai.APIStatusError as exc:
            raise LLMError(self.redact(f"HTTP {exc.status_code} {tries}: {_message(exc)}")) from None
        except (ValueError, RecursionError, openai.APIResponseValidationError) as exc:
            # JSONDecodeError is a ValueError: the server did not answer with JSON; RecursionError: JSON
            # nested deeper than the parser goes.
            protocol = "chat-completions" if self.api == "chat" else "completions"
            raise LLMError(self.redact(f"malformed response from {self.shown_url} "
                                       f"(not {protocol} JSON: {type(exc).__name__})")) from None
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise LLMError(f"malformed response from {self.shown_url} (no choices)")
        if self.api == "completions":
            text = getattr(choices[0], "text", None)
        else:
            text = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(text, str):
            raise LLMError(f"malformed response from {self.shown_url} (no "
                           f"{'text' if self.api == 'completions' else 'message content'})")
        return text, getattr(choices[0], "finish_reason", None)


def _finish(reason) -> str | None:
    """The answer's finish_reason if it is a short word, as the protocol has it; None otherwise."""
    return reason if isinstance(reason, str) and len(reason) <= 40 and reason.isidentifier() else None


def _message(exc: Exception) -> str:
    """The server's error message, one line, bounded."""
    msg = getattr(exc, "message", None) or str(exc)
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        msg = body["message"]
    return " ".join(str(msg).split())[:300]
