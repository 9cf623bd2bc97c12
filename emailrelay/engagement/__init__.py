"""SES engagement events from SQS: parsing and applying them (:mod:`.events`)
and the long-polling loop that feeds them to the tracking store (:mod:`.poller`)."""

from .events import EngagementEvent, EventKind, Skipped, apply_event, parse_message
from .poller import (
    DEFAULT_CONCURRENCY,
    EventHandler,
    PollerAborted,
    PollerSettings,
    ReceiveBackoff,
    poll_engagement_events,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "EngagementEvent",
    "EventHandler",
    "EventKind",
    "PollerAborted",
    "PollerSettings",
    "ReceiveBackoff",
    "Skipped",
    "apply_event",
    "parse_message",
    "poll_engagement_events",
]
