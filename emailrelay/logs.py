"""Structured logging: one JSON object per line (or plain text for humans).

Log lines name the email id and a redacted recipient (see
:func:`emailrelay.addresses.redact`); never a body, a credential or a raw
SQS message. Extra fields go in ``extra={...}`` and become JSON keys.
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

# Attributes every LogRecord has; anything else was passed through ``extra``.
_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


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
