"""Prometheus metrics, served on ``/metrics``.

Defined in one place so names and labels stay consistent; every module that
counts something imports the metric from here. Label values are small fixed
sets (subjects, outcomes, event types): never an id or an address.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "emailrelay_requests",
    "NATS requests answered, by subject and outcome (ok or the contract error string).",
    ["subject", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "emailrelay_request_seconds",
    "Time from receiving a NATS request to replying.",
    ["subject"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REQUESTS_IN_FLIGHT = Gauge("emailrelay_requests_in_flight", "Requests being handled now.")

SMTP_SEND_SECONDS = Histogram(
    "emailrelay_smtp_send_seconds",
    "One send attempt on a pooled connection, by transport: an SMTP transaction "
    "(MAIL, RCPT, DATA), or one SES SendEmail call.",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SMTP_REPLIES = Counter(
    "emailrelay_smtp_replies",
    "Outcomes of send attempts by class and transport (smtp, ses): ok, transient (4xx, "
    "SES 5xx or connection), permanent (5xx, SES 4xx), ambiguous (no final reply after "
    "hand-over).",
    ["result", "transport"],
)
SMTP_CONNECTIONS = Gauge(
    "emailrelay_smtp_connections",
    "Open connections in the sender pool, by transport (for ses: senders holding a slot of "
    "the shared HTTPS pool).",
    ["transport"],
)

TRACKING_WRITE_FAILURES = Counter(
    "emailrelay_tracking_write_failures",
    "Sends whose tracking record or group-index entry could not be stored in time.",
)
KV_CONFLICTS = Counter(
    "emailrelay_kv_conflicts",
    "Revision conflicts on KV read-modify-write, retried.",
    ["bucket"],
)

SQS_EVENTS = Counter(
    "emailrelay_sqs_events",
    "SES engagement events by type and outcome (applied, duplicate, skipped, retry, deleted).",
    ["type", "outcome"],
)
SQS_RECEIVE_ERRORS = Counter("emailrelay_sqs_receive_errors", "Failed SQS ReceiveMessage calls.")
SQS_EVENT_LAG_SECONDS = Histogram(
    "emailrelay_sqs_event_lag_seconds",
    "Time from the SES event's timestamp to its processing.",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)

KV_BUCKET_REOPENS = Counter(
    "emailrelay_kv_bucket_reopens",
    "KV buckets found missing while running, by bucket and outcome: reopened (it was "
    "there again), created (KV_AUTO_CREATE=true), missing (not there, may not create), "
    "failed (JetStream did not answer).",
    ["bucket", "outcome"],
)
TRACKING_PENDING = Gauge(
    "emailrelay_tracking_pending",
    "Tracking writes of sent emails not stored within their request's time, waiting "
    "for the KV store to come back.",
)
TRACKING_PENDING_DROPPED = Counter(
    "emailrelay_tracking_pending_dropped",
    "Tracking writes lost because the pending queue was full.",
)
EVENT_LOOP_LAG_SECONDS = Gauge(
    "emailrelay_event_loop_lag_seconds",
    "The longest wake-up lag of the event loop in the last 30 s: how late a "
    "timer fired because something held the loop (anything above 0.1 s stalls "
    "every request and /livez alike).",
)
REQUEST_BACKLOG = Gauge(
    "emailrelay_request_backlog",
    "Requests received and waiting for a handler (beyond MAX_IN_FLIGHT); bounded by MAX_BACKLOG.",
)
REQUEST_INTAKE_PAUSED = Gauge(
    "emailrelay_request_intake_paused",
    "1 while the backlog is full and this replica has left the queue group, else 0.",
)
REQUESTS_SHED = Counter(
    "emailrelay_requests_shed",
    "Requests answered at once without being handled because this replica was too "
    "busy, by subject: reads beyond MAX_READS_IN_FLIGHT (overloaded), sends past "
    "twice MAX_BACKLOG (email delivery failed).",
    ["subject"],
)
REQUESTS_EXPIRED = Counter(
    "emailrelay_requests_expired",
    "Send requests whose deadline (Emailrelay-Deadline, else receipt + SEND_TIMEOUT) "
    "passed before the provider accepted the message; answered email delivery failed.",
)
SMTP_THROTTLED = Counter(
    "emailrelay_smtp_throttled",
    "Throttling replies from the provider (454 Maximum sending rate exceeded and "
    "the like; SES TooManyRequestsException), by transport: retried within the deadline, "
    "and the send rate lowered.",
    ["transport"],
)
SMTP_DAILY_QUOTA_EXCEEDED = Counter(
    "emailrelay_smtp_daily_quota_exceeded",
    "Sends refused because the provider's daily message quota is used up "
    "(answered email delivery failed at once, not retried), by transport.",
    ["transport"],
)
SMTP_SEND_RATE = Gauge(
    "emailrelay_smtp_send_rate",
    "The send rate this process paces itself to (messages/s; 0: SMTP_MAX_SEND_RATE unset).",
)
IDEMPOTENT_REPLIES = Counter(
    "emailrelay_idempotent_replies",
    "Send requests with an idempotency key, by what the key held: reserved (sent now), "
    "completed (first reply again), in_progress (waited), mismatch, unknown, store_failed.",
    ["outcome"],
)
IDEMPOTENCY_WRITE_FAILURES = Counter(
    "emailrelay_idempotency_write_failures",
    "Outcomes of sends with an idempotency key that could not be stored (the key "
    "then reads as outcome unknown once SEND_TIMEOUT plus a grace has passed).",
)
SUPPRESSED_SENDS = Counter(
    "emailrelay_suppressed_sends",
    "Send requests refused because the recipient is on the suppression list.",
)
SUPPRESSION_CHECK_FAILURES = Counter(
    "emailrelay_suppression_check_failures",
    "Suppression look-ups that failed (the store did not answer); the send went ahead (fail open).",
)
SUPPRESSIONS_ADDED = Counter(
    "emailrelay_suppressions_added",
    "Recipients added to the suppression list, by reason (bounce, complaint, manual).",
    ["reason"],
)
SKIPPED_SENDS = Counter(
    "emailrelay_skipped_sends",
    "Send requests answered with the skip reply (empty ids, nothing sent), by reason: "
    "email_disabled (EMAIL_ENABLED is not true), recipient_domain "
    "(outside SMTP_ALLOWED_RECIPIENT_DOMAINS).",
    ["reason"],
)
STREAM_EVENTS_PUBLISHED = Counter(
    "emailrelay_stream_events_published",
    "Events published to the EMAIL_EVENTS stream (EVENTS_STREAM_ENABLED=true), by type and "
    "outcome: stored, or duplicate (the stream already held that event id and dropped it).",
    ["type", "outcome"],
)
STREAM_EVENT_PUBLISH_FAILURES = Counter(
    "emailrelay_stream_event_publish_failures",
    "Publishes to EMAIL_EVENTS that failed, by type: a sent event then waits in the "
    "pending writes, an SES event's SQS message comes back for redelivery.",
    ["type"],
)
STREAM_EVENTS_PENDING = Gauge(
    "emailrelay_stream_events_pending",
    "Sent events not yet published to EMAIL_EVENTS, waiting for the stream to answer.",
)
SES_SENDING_PAUSED = Counter(
    "emailrelay_ses_sending_paused",
    "Sends refused because SES sending is paused for the account or configuration set "
    "(SendingPausedException) or the account is suspended (AccountSuspendedException), "
    "by error: every send fails until an operator acts.",
    ["error"],
)
READY = Gauge(
    "emailrelay_ready",
    "1 while this replica is ready (/readyz answers 200: NATS connected, in the "
    "queue groups it serves, and the SMTP settings fit the server), else 0; read at each scrape.",
)
