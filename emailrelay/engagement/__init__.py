"""SES engagement events from SQS: parsing and applying them (:mod:`.events`),
what one message does to the store (:mod:`.handler`), and the long-polling
loop that feeds them to the tracking store (:mod:`.poller`)."""

from .events import EngagementEvent, EventKind, Skipped, apply_event, parse_message
from .handler import EventHandler
from .poller import DEFAULT_CONCURRENCY, PollerAborted, PollerSettings, poll_engagement_events

__all__ = [
    "DEFAULT_CONCURRENCY",
    "EngagementEvent",
    "EventHandler",
    "EventKind",
    "PollerAborted",
    "PollerSettings",
    "Skipped",
    "apply_event",
    "parse_message",
    "poll_engagement_events",
]
