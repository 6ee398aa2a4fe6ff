"""Secrets kept out of everything curate writes or prints: tokens in the environment, credentials in URLs.

The secrets are the values of the token variables (`SECRET_ENV`), the credentials of every
URL `redact_url` has seen (a `user:pass@` part, query values such as `?key=`) and any value given
to `remember_secret` (the Hub token `curate push` reads from the HF login). `redact(text)`
replaces each with `***`; the CLI's log handler (`SecretFilter`, installed by `curate.terminal`)
and its error line use it, `redacted_logs` puts the filter on the root logger's handlers for a
while (a push), a model's `base_url` is written redacted into plan.json, stats and the card
(`curate.backends.params`), and the OpenAI backend redacts its row errors. Leaves out: refusing
a file that holds the Hub token before a push (`curate.hub`).

Example: redact_url("http://u:pw@host/v1?key=s") -> 'http://***@host/v1?key=***'
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
from typing import Iterator
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words

_seen: set[str] = set()  # credentials taken from URLs in this process
_lock = threading.Lock()


def redact_url(url: str) -> str:
    """The URL with its user-info and every query value replaced by `***`; remembers them as secrets.

    Example: redact_url("https://api.example.com/v1") -> 'https://api.example.com/v1'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    found: list[str] = []
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        found += [p for p in userinfo.split(":") if p]
        found.append(base64.b64encode(unquote(userinfo).encode()).decode())  # as a Basic auth header carries it
        netloc = f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        found += [value for _, value in pairs if value]
        found += [raw.split("=", 1)[1] for raw in query.split("&") if "=" in raw and raw.split("=", 1)[1]]
        query = "&".join(f"{name}={MASK}" for name, _ in pairs)
    with _lock:
        _seen.update(value for value in found if len(value) >= MIN_SECRET_CHARS)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def remember_secret(value: str | None) -> None:
    """Treat `value` as a secret from now on in this process (values under 4 characters are ignored).

    Example: remember_secret(huggingface_hub.get_token()); redact(f"got {token}") -> 'got ***'
    """
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _seen.add(value)


def known_secrets() -> list[str]:
    """Token values in the environment and URL credentials seen so far, longest first.

    Example: known_secrets() -> ['hf_abcdef…'] with HF_TOKEN set
    """
    values = {os.environ.get(name, "") for name in SECRET_ENV}
    with _lock:
        values |= _seen
    return sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every known secret replaced by `***`. Example: redact("key sk-123456") -> 'key ***'"""
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """A handler filter that redacts secrets from each record's message (and its traceback text).

    Example: handler.addFilter(SecretFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text) != text:
                record.exc_info, record.exc_text = None, redact(text)
        return True


@contextlib.contextmanager
def redacted_logs(*secrets: str | None, loggers: tuple[str, ...] = ()) -> Iterator[None]:
    """Remember `secrets`, and meanwhile scrub every known secret from the records that the root
    logger's handlers (and those of `loggers`) handle.

    Example: with redacted_logs(token, loggers=("huggingface_hub",)): push()
    """
    for secret in secrets:
        remember_secret(secret)
    handlers = [h for name in ("", *loggers) for h in logging.getLogger(name or None).handlers]
    scrub = SecretFilter()
    for handler in handlers:
        handler.addFilter(scrub)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(scrub)


__all__ = ["SECRET_ENV", "SecretFilter", "known_secrets", "redact", "redact_url", "redacted_logs", "remember_secret"]
