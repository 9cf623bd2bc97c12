"""Settings from the environment, validated once at start.

The contract variables keep the replaced relay's names and defaults. Rules:

* an empty value means unset (the default applies), except the two override
  allowlists ``SMTP_ALLOWED_FROM_DOMAINS`` and ``SMTP_ALLOWED_REPLY_TO_DOMAINS``,
  where "set but empty" means "allow none";
* lists are comma-separated, trimmed and lower-cased;
* booleans are ``true``/``t``/``1`` or ``false``/``f``/``0`` in any case;
  anything else is a start-up error (the original read it as false);
* durations are seconds (``30``, ``2.5``) or carry a unit (``500ms``, ``30s``, ``5m``).
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from emailrelay.addresses import Mailbox, parse_mailbox
from emailrelay.api import DEFAULT_NATS_URL


class ConfigError(Exception):
    """A variable that cannot be used; the message names it and says why."""


class SmtpTlsMode(enum.StrEnum):
    AUTO = "auto"
    """Implicit TLS on ports 465/2465, otherwise STARTTLS when the server offers it."""
    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    """STARTTLS is required; a server that does not offer it is a failed send."""
    NONE = "none"
    """Plain text, credentials included: only for a trusted local relay."""


class EmailTransport(enum.StrEnum):
    SMTP = "smtp"
    """SMTP_HOST:SMTP_PORT, through the pool of persistent SMTP connections."""
    SES = "ses"
    """The Amazon SES v2 API (one SendEmail call per email, emailrelay.mail.ses)."""


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


TRUE_WORDS = frozenset({"true", "t", "1"})
FALSE_WORDS = frozenset({"false", "f", "0"})
"""The boolean words every variable the relay reads accepts, in any case."""


def _parse_bool(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise ValueError("must be one of true, t, 1, false, f, 0")
    return value


def _parse_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip().lower() for item in value.split(",") if item.strip())
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("must be seconds or a duration such as 500ms, 30s, 5m")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


_NATS_SCHEMES = {"nats", "tls", "ws", "wss"}


def parse_nats_urls(text: str) -> tuple[str, ...]:
    """Comma-separated NATS URLs, checked without connecting; :class:`ValueError`
    says what is wrong in words that follow the variable or flag name."""
    urls = tuple(url.strip() for url in text.split(",") if url.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in _NATS_SCHEMES:
            got = f"{parts.scheme}://" if "://" in url else "a URL without a scheme"
            raise ValueError(
                f"must be nats://, tls://, ws:// or wss:// URLs, comma-separated (got {got})"
            )
        if not parts.hostname:
            raise ValueError(f"must name a host in every URL (got {parts.scheme}:// without one)")
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            raise ValueError("must have a port that is a whole number from 1 to 65535") from None
    if not urls:
        raise ValueError("is empty")
    return urls


def _parse_nats_urls(value: Any) -> Any:
    return parse_nats_urls(value) if isinstance(value, str) else value


def _parse_sender(value: Any) -> Mailbox:
    if isinstance(value, Mailbox):
        return value
    mailbox = parse_mailbox(value) if isinstance(value, str) else None
    if mailbox is None:
        raise ValueError("must be one email address such as noreply@example.com")
    return mailbox


Bool = Annotated[bool, BeforeValidator(_parse_bool)]
DomainList = Annotated[tuple[str, ...], BeforeValidator(_parse_list)]
Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
NatsUrls = Annotated[tuple[str, ...], BeforeValidator(_parse_nats_urls)]
Port = Annotated[int, Field(ge=0, le=65535)]
"""A port to listen on: 0 picks any free one."""
RemotePort = Annotated[int, Field(ge=1, le=65535)]
"""A port to connect to."""


_DEFAULT_FROM = "noreply@lfx.linuxfoundation.org"


class Settings(BaseModel):
    """Every knob of the service. Field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    # NATS
    nats_urls: NatsUrls = Field(default=(DEFAULT_NATS_URL,), alias="NATS_URL")
    nats_creds: Path | None = Field(default=None, alias="NATS_CREDS")
    nats_connect_timeout: Seconds = Field(default=30.0, alias="NATS_CONNECT_TIMEOUT")

    # HTTP (health and metrics)
    port: Port = Field(default=8080, alias="PORT")
    http_host: str = Field(default="0.0.0.0", alias="HTTP_HOST")

    # Sending
    email_enabled: Bool = Field(default=False, alias="EMAIL_ENABLED")
    email_transport: EmailTransport = Field(default=EmailTransport.SMTP, alias="EMAIL_TRANSPORT")
    smtp_host: str = Field(default="localhost", alias="SMTP_HOST")
    smtp_port: RemotePort = Field(default=587, alias="SMTP_PORT")
    smtp_username: str | None = Field(default=None, alias="SMTP_USERNAME")
    smtp_password: str | None = Field(default=None, alias="SMTP_PASSWORD", repr=False)
    smtp_tls_mode: SmtpTlsMode = Field(default=SmtpTlsMode.AUTO, alias="SMTP_TLS_MODE")
    # Opened on demand, up to this many; 64 covers 1,280 sends/s at 50 ms per
    # SMTP transaction (README, "Sizing the SMTP pool").
    smtp_pool_size: Annotated[int, Field(ge=1, le=1024)] = Field(default=64, alias="SMTP_POOL_SIZE")
    smtp_connection_max_messages: Annotated[int, Field(ge=1)] = Field(
        default=100, alias="SMTP_CONNECTION_MAX_MESSAGES"
    )
    smtp_connection_max_age: Seconds = Field(default=300.0, alias="SMTP_CONNECTION_MAX_AGE")
    default_from: str = Field(default=_DEFAULT_FROM, alias="DEFAULT_SMTP_FROM")
    default_sender: Annotated[Mailbox, PlainValidator(_parse_sender)] = Field(
        default_factory=lambda: _parse_sender(_DEFAULT_FROM),
        validation_alias="DEFAULT_SMTP_FROM",
    )
    """DEFAULT_SMTP_FROM parsed, once, here: a value that does not parse stops
    the start. No ``alias`` of its own, so it is not listed as a second variable."""
    default_from_display_name: str = Field(
        default="LFX Self Serve", alias="DEFAULT_SMTP_FROM_DISPLAY_NAME"
    )
    allowed_from_domains: DomainList = Field(
        default=("lfx.linuxfoundation.org",), alias="SMTP_ALLOWED_FROM_DOMAINS"
    )
    allowed_reply_to_domains: DomainList = Field(
        default=("linuxfoundation.org",), alias="SMTP_ALLOWED_REPLY_TO_DOMAINS"
    )
    allowed_recipient_domains: DomainList = Field(
        default=(), alias="SMTP_ALLOWED_RECIPIENT_DOMAINS"
    )
    ses_configuration_set: str | None = Field(default=None, alias="SES_CONFIGURATION_SET")
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=256, alias="MAX_IN_FLIGHT"
    )
    max_backlog: Annotated[int, Field(ge=1, le=100_000)] = Field(default=256, alias="MAX_BACKLOG")
    send_timeout: Seconds = Field(default=8.0, alias="SEND_TIMEOUT")
    """Deadline of a send whose caller sends no ``Emailrelay-Deadline``: 8 s,
    so that the reply (at most 1.5 s later, see emailrelay.handlers.send)
    beats the 10 s timeout of the replaced relay's callers."""
    tracking_wait: Seconds = Field(default=1.0, alias="TRACKING_WAIT")
    """How long a sent email's reply waits for its tracking writes (never past
    the request's deadline); what is not stored by then goes to the pending
    writes (emailrelay.store.pending) and the success goes at once."""
    max_reads_in_flight: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=16, alias="MAX_READS_IN_FLIGHT"
    )
    smtp_max_send_rate: Annotated[float, Field(ge=0, le=100_000)] = Field(
        default=0.0, alias="SMTP_MAX_SEND_RATE"
    )
    """Messages per second per process (emailrelay.mail.rate); 0 = unlimited."""
    idempotency_ttl: Seconds = Field(default=24 * 3600.0, alias="IDEMPOTENCY_TTL")
    """How long an idempotency key is remembered (emailrelay.store.idempotency)."""
    suppression_enabled: Bool = Field(default=False, alias="SUPPRESSION_ENABLED")
    """Refuse suppressed recipients (emailrelay.store.suppressions)."""
    retention: Seconds | None = Field(default=None, alias="RETENTION")
    """How long tracking records and index pages live after their last write
    (the buckets' ``max_age``); unset: for ever (emailrelay.store.index)."""
    suppression_retention: Seconds | None = Field(default=None, alias="SUPPRESSION_RETENTION")
    """How long a suppression entry lives (``email-suppressions``' ``max_age``); unset: for ever."""
    shutdown_grace_seconds: Seconds = Field(default=25.0, alias="SHUTDOWN_GRACE_SECONDS")

    # Engagement events
    ses_eventing_enabled: Bool = Field(default=False, alias="SES_EVENTING_ENABLED")
    ses_engagement_sqs_queue_url: str | None = Field(
        default=None, alias="SES_ENGAGEMENT_SQS_QUEUE_URL"
    )
    ses_event_max_receives: Annotated[int, Field(ge=1)] = Field(
        default=5, alias="SES_EVENT_MAX_RECEIVES"
    )

    # Engagement events on NATS (the EMAIL_EVENTS stream)
    events_stream_enabled: Bool = Field(default=False, alias="EVENTS_STREAM_ENABLED")
    """Publish every outcome once to EMAIL_EVENTS (emailrelay.engagement.stream)."""
    events_max_age: Seconds = Field(default=30 * 24 * 3600.0, alias="EVENTS_MAX_AGE")
    """How long the stream keeps an event (a stream the relay creates)."""
    events_max_bytes: Annotated[int, Field(ge=1)] = Field(default=1024**3, alias="EVENTS_MAX_BYTES")
    """The stream's size bound in bytes; the oldest events go first beyond it."""
    events_duplicate_window: Seconds = Field(default=120.0, alias="EVENTS_DUPLICATE_WINDOW")
    """How long the stream remembers an event id to drop its copies."""

    # Tracking store
    kv_replicas: Annotated[int, Field(ge=1, le=5)] = Field(default=1, alias="KV_REPLICAS")
    kv_auto_create: Bool = Field(default=True, alias="KV_AUTO_CREATE")

    # Logging
    log_level: str = Field(default="info", alias="LOG_LEVEL")
    log_format: LogFormat = Field(default=LogFormat.JSON, alias="LOG_FORMAT")
    log_add_source: Bool = Field(default=False, alias="LOG_ADD_SOURCE")

    @property
    def smtp_credentials(self) -> tuple[str, str] | None:
        if self.smtp_username and self.smtp_password:
            return (self.smtp_username, self.smtp_password)
        return None


# Set-but-empty is meaningful for these two: "no override domain is allowed".
_EMPTY_IS_A_VALUE = {"SMTP_ALLOWED_FROM_DOMAINS", "SMTP_ALLOWED_REPLY_TO_DOMAINS"}


def _env_names() -> dict[str, str]:
    return {field.alias: name for name, field in Settings.model_fields.items() if field.alias}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the environment; raise :class:`ConfigError` naming
    the first variable that cannot be used."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for alias in _env_names():
        raw = env.get(alias)
        if raw is None or (raw.strip() == "" and alias not in _EMPTY_IS_A_VALUE):
            continue
        values[alias] = raw
    if "DEFAULT_SMTP_FROM" not in values and env.get("SMTP_FROM", "").strip():
        values["DEFAULT_SMTP_FROM"] = env["SMTP_FROM"]

    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_in_our_words(exc.errors()[0])) from None

    _check_consistency(settings)
    return settings


# Values never repeated in an error message: they may hold a credential.
_SECRET_VARIABLES = {"NATS_URL", "SMTP_USERNAME", "SMTP_PASSWORD"}
_QUOTED_MAX = 60


def _got(variable: str, value: object) -> str:
    """`` (got "value")``, shortened; nothing for a variable that may hold a secret."""
    if variable in _SECRET_VARIABLES or not isinstance(value, str):
        return ""
    if len(value) > _QUOTED_MAX:
        value = value[: _QUOTED_MAX - 1] + "…"
    return f" (got {json.dumps(value, ensure_ascii=False)})"


def _in_our_words(error: ErrorDetails) -> str:
    """One validation error as a sentence in the project's voice:
    ``SMTP_PORT must be a whole number from 1 to 65535 (got "abc")``."""
    variable = str(error["loc"][0]) if error["loc"] else "configuration"
    field = Settings.model_fields.get(_env_names().get(variable, ""))
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "value_error":
        # Our own validators (booleans, durations, URLs) already speak this way.
        message = str(context.get("error", error["msg"]))
    elif field is not None and field.annotation is int:
        message = f"must be {_whole_number_range(field)}"
    elif kind == "enum":
        message = "must be one of " + str(context.get("expected", "")).replace("'", "").replace(
            " or ", ", "
        )
    elif kind == "greater_than" and _is_duration(field):
        message = "must be more than 0: seconds or a duration such as 500ms, 30s, 5m"
    else:
        message = "is not usable: " + str(error["msg"]).lower()
    return f"{variable} {message}{_got(variable, error.get('input'))}"


def _whole_number_range(field: FieldInfo) -> str:
    low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    if low is not None and high is not None:
        return f"a whole number from {low} to {high}"
    if low is not None:
        return f"a whole number of at least {low}"
    return "a whole number"


def _is_duration(field: FieldInfo | None) -> bool:
    return field is not None and any(
        isinstance(m, BeforeValidator) and m.func is _parse_duration for m in field.metadata
    )


MIN_EVENTS_DUPLICATE_WINDOW = 120.0
"""Seconds: JetStream's own default window, and the least the issue allows."""


def _check_consistency(settings: Settings) -> None:
    if settings.log_level.lower() not in ("debug", "info", "warn", "warning", "error"):
        raise ConfigError(
            "LOG_LEVEL must be one of debug, info, warn, error"
            + _got("LOG_LEVEL", settings.log_level)
        )
    if settings.nats_creds is not None and not settings.nats_creds.is_file():
        raise ConfigError(
            f"NATS_CREDS must name a .creds file (there is none at {settings.nats_creds})"
        )
    if bool(settings.smtp_username) != bool(settings.smtp_password):
        missing = "SMTP_PASSWORD" if settings.smtp_username else "SMTP_USERNAME"
        raise ConfigError(
            f"SMTP_USERNAME and SMTP_PASSWORD must be set together ({missing} is empty)"
        )
    if settings.events_duplicate_window < MIN_EVENTS_DUPLICATE_WINDOW:
        raise ConfigError(
            "EVENTS_DUPLICATE_WINDOW must be at least 2m (a redelivered SES event "
            f"must still find its first copy; got {settings.events_duplicate_window:g}s)"
        )
    if settings.events_duplicate_window > settings.events_max_age:
        raise ConfigError(
            "EVENTS_DUPLICATE_WINDOW must not be longer than EVENTS_MAX_AGE "
            f"({settings.events_duplicate_window:g}s > {settings.events_max_age:g}s)"
        )
    if settings.ses_eventing_enabled and not settings.ses_engagement_sqs_queue_url:
        raise ConfigError(
            "SES_ENGAGEMENT_SQS_QUEUE_URL must be set when SES_EVENTING_ENABLED is true"
        )


def environment_defaults() -> list[tuple[str, str]]:
    """Every variable the relay reads, with its default as a person would write it."""
    rows = []
    for field in Settings.model_fields.values():
        if not field.alias:
            continue
        default = field.default
        if default is None:
            shown = "(unset)"
        elif default == ():
            shown = "(empty)"
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, tuple):
            shown = ",".join(default)
        elif isinstance(default, enum.Enum):
            shown = str(default.value)
        elif isinstance(default, float) and _is_duration(field):
            shown = f"{default:.15g}s"
        else:
            shown = str(default)
        rows.append((field.alias, shown))
    return rows
