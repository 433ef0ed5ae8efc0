"""A thin wrapper over the openai client: one request in, one answer (text) out. ``api="chat"`` (the
default) sends the prompt as a user message to /v1/chat/completions; ``api="completions"`` sends it as is
to /v1/completions, as Menon & Vondrick did (instruct models, local servers that only offer completions).

Retries with backoff on 408/409/429/5xx, connection errors and timeouts are the openai client's own
(`max_retries`, `timeout`; it honours the server's retry-after / retry-after-ms headers). A request that
still fails raises LLMError with a one-line reason. The API key comes only from OPENAI_API_KEY and is
scrubbed from every message this module produces.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

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
    """Replace each secret wherever it appears (short secrets are left alone: too likely to be words)."""
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    return text


def url_secrets(url: str | None) -> list[str]:
    """The credentials inside a URL (``https://user:pass@host/``), longest first."""
    parts = urlparse(url or "")
    found = [v for v in (parts.password, parts.username) if v]
    if parts.username and parts.password:
        found.insert(0, f"{parts.username}:{parts.password}")
    return found


def public_url(url: str) -> str:
    """The URL without credentials: what may be printed, cached or written."""
    parts = urlparse(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[redacted]@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


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
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url_secrets = url_secrets(self.base_url)
        self.shown_url = public_url(self.base_url)  # never the credentials: in messages, cache, output
        self._key = os.environ.get("OPENAI_API_KEY", "").strip() or None
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
                self._client = OpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout,
                                      max_retries=self.max_retries)
            return self._client

    def redact(self, text: str) -> str:
        """``text`` without the API key or the base URL's credentials (answers may echo them)."""
        return redact(text.replace(self.base_url, self.shown_url), self._key, *self._url_secrets)

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
            if hit is not None:
                return Answer(self.redact(hit["text"]), hit.get("finish_reason"), cached=True)
        text, finish_reason = self._ask(request)
        text = self.redact(text)  # a server may echo the key or the URL's credentials
        if self.cache is not None and text.strip():
            self.cache.put(request, text, finish_reason)
        return Answer(text, finish_reason, cached=False)

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
        except openai.APITimeoutError:
            raise LLMError(f"timed out after {self.timeout:g}s {tries}") from None
        except openai.APIConnectionError as exc:
            raise LLMError(self.redact(f"cannot reach {self.shown_url} {tries}: {_message(exc)}")) from None
        except openai.RateLimitError as exc:
            raise LLMError(self.redact(f"rate limited (HTTP 429) {tries}: {_message(exc)}")) from None
        except openai.APIStatusError as exc:
            raise LLMError(self.redact(f"HTTP {exc.status_code} {tries}: {_message(exc)}")) from None
        except (ValueError, openai.APIResponseValidationError) as exc:
            # JSONDecodeError is a ValueError: the server did not answer with JSON.
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


def _message(exc: Exception) -> str:
    """The server's error message, one line, bounded."""
    msg = getattr(exc, "message", None) or str(exc)
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        msg = body["message"]
    return " ".join(str(msg).split())[:300]
