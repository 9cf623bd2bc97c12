"""Structured logging: one JSON object per line (or plain text for humans).

Log lines name the email id and a redacted recipient (see
:func:`emailrelay.addresses.redact`); never a body, a credential or a raw
SQS message. Extra fields go in ``extra={...}`` and become JSON keys.

A value a caller chose (a group id, an id that failed a check) goes through
:func:`shorten` first: a request may carry a megabyte in any field, and a log
line is no place for it. As a net for the rest, the formatters cut any string
extra at :data:`MAX_EXTRA_CHARS`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from emailrelay.config import LogFormat

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

SHORT_VALUE_CHARS = 80
"""What :func:`shorten` keeps of a caller's value by default: a UUID and then some."""
MAX_EXTRA_CHARS = 512
"""Any string extra is cut to this many characters by the formatters."""


def shorten(value: str, limit: int = SHORT_VALUE_CHARS) -> str:
    """``value`` as a log line may carry it: at most ``limit`` characters,
    the cut marked with how much was left out (so two long ids that share a
    prefix are at least told apart by length)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…(+{len(value) - limit} chars)"


# Attributes every LogRecord has; anything else was passed through ``extra``.
_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: shorten(v, MAX_EXTRA_CHARS) if isinstance(v, str) else v
        for k, v in record.__dict__.items()
        if k not in _STANDARD_ATTRS
    }


class JsonFormatter(logging.Formatter):
    def __init__(self, add_source: bool) -> None:
        super().__init__()
        self.add_source = add_source

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extra_fields(record))
        if self.add_source:
            entry["source"] = f"{record.pathname}:{record.lineno}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, add_source: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.add_source = add_source

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extra_fields(record).items())
        if extras:
            line = f"{line} {extras}"
        if self.add_source:
            line = f"{line} ({record.pathname}:{record.lineno})"
        return line


def configure_logging(level: str, log_format: LogFormat, add_source: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(add_source))
    else:
        handler.setFormatter(TextFormatter(add_source))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level.lower()])
    # Library chatter at debug level would log raw protocol lines (and with
    # them recipients); keep third parties at warning or above.
    for noisy in (
        "nats",
        "aiosmtplib",
        "hypercorn",
        "httpx",
        "httpcore",
        "botocore",
        "trio_asyncio",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
