"""Wiring: builds the parts from the settings and runs them in one task group.

::

    emailrelay serve
    └── task group (trio, with a trio-asyncio loop open for nats-py and aiosmtplib)
        ├── NATS request subscriptions -> backlog (MAX_BACKLOG) -> handlers (MAX_IN_FLIGHT)
        │      (send, status, analytics; suppression.* when SUPPRESSION_ENABLED=true)
        │      reads (status, analytics, suppression get/list): own budget
        │      (MAX_READS_IN_FLIGHT), never paused; beyond it answered `overloaded`
        ├── NATS service discovery ($SRV.PING/INFO/STATS, every instance answers)
        ├── health server (/livez, /readyz, /metrics)
        ├── asyncio loop watchdog (/livez)
        ├── NATS connection watch (closed for good: stop, exit 1)
        ├── SQS poller for SES events (when SES_EVENTING_ENABLED=true)
        ├── tracking watcher (when the KV store was missing at start)
        ├── pending tracking writes (sent emails whose record waits for the store,
        │      and sent events waiting for EMAIL_EVENTS when EVENTS_STREAM_ENABLED=true)
        └── signal watcher (from before NATS is connected)

The SMTP pool is a resource of the send handler, closed after the last
request is answered. Every way out is the same path: something sets
``stopping`` (a signal, or a part that failed for good), the request loop
drains and replies, the remaining parts are cancelled, NATS is drained.
A signal exits 0 whatever state NATS is in; a part that failed exits 1.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import trio

from emailrelay import api, looplag, tracing
from emailrelay.bridge.loop import asyncio_loop
from emailrelay.bridge.nats import DRAIN_TIMEOUT, NatsConnection, NatsUnavailable, drained_on_exit
from emailrelay.bridge.smtp import DATA_REPLY_WAIT, SmtpConnection, SmtpEndpoint
from emailrelay.bridge.watchdog import LoopWatchdog
from emailrelay.command import EXIT_FAILURE, EXIT_OK, command_name
from emailrelay.config import EmailTransport, Settings
from emailrelay.discovery import ServiceStats, instance_metadata, serve_discovery
from emailrelay.engagement.handler import RecordUpdater
from emailrelay.engagement.poller import MessageQueue, PollerSettings, poll_engagement_events
from emailrelay.engagement.stream import (
    EventPublisher,
    SentEvents,
    events_stream_spec,
    open_events_stream,
)
from emailrelay.handlers.analytics import GetEngagementAnalyticsHandler
from emailrelay.handlers.erasure import EraseRecipientDataHandler
from emailrelay.handlers.send import (
    SETTLE_WAIT,
    TRACKING_WAIT,
    NoSender,
    SendEmailHandler,
    SendRules,
    TrackingOnceOpen,
)
from emailrelay.handlers.status import GetEmailStatusHandler
from emailrelay.handlers.suppression import (
    AddSuppressionHandler,
    GetSuppressionHandler,
    ListSuppressionsHandler,
    RemoveSuppressionHandler,
)
from emailrelay.health import bind_http_socket, serve_health, why_unbindable
from emailrelay.mail.pool import Connection, SmtpPool
from emailrelay.mail.rate import AdaptiveRate, TokenBucket
from emailrelay.mail.ses import SesApi, SesUnavailable
from emailrelay.metrics import REQUESTS_EXPIRED, SMTP_SEND_RATE, TRACKING_WRITE_FAILURES
from emailrelay.server import CUT_OFF_SECONDS, Handler, RequestServer, bounded_by_deadline
from emailrelay.sqs import SqsClient, SqsError
from emailrelay.store import buckets
from emailrelay.store.idempotency import IdempotencyStore
from emailrelay.store.kv import StoreError
from emailrelay.store.pending import PendingTrackingWrites
from emailrelay.store.suppressions import SuppressionStore
from emailrelay.store.tracking import TrackingStore
from emailrelay.supervision import Backoff, Lifecycle

log = logging.getLogger(__name__)

PENDING_LAST_TRY_SECONDS = 3.0
"""At shutdown, after the last reply: time left to store pending tracking
writes (within the pod's termination grace beyond SHUTDOWN_GRACE_SECONDS)."""

IDEMPOTENCY_STALE_GRACE = DATA_REPLY_WAIT + SETTLE_WAIT + 3.0
"""Seconds beyond SEND_TIMEOUT after which a key still in progress is read as
outcome unknown (its owner crashed): a live owner's send ends by SEND_TIMEOUT
plus the wait for a DATA reply (1 s, emailrelay.bridge.smtp), and its outcome
is written within SETTLE_WAIT (1 s, emailrelay.handlers.send) after that; 3 s
more cover the replicas' clock skew (wall clocks, NTP-synchronised) and a
write that lands just after its caller stopped waiting. 5 s in all: with the
default SEND_TIMEOUT a crashed owner's key reads as outcome unknown after
13 s."""


def shutdown_extra_seconds(tracking_wait: float = TRACKING_WAIT) -> float:
    """Longest a SIGTERM'd process runs beyond SHUTDOWN_GRACE_SECONDS: the
    cut-off requests' last DATA reply and key write, a tracking wait, the
    pending writes' last try, then the NATS drain (12 s with the defaults).
    The chart's ``terminationGracePeriodExtraSeconds`` must cover it
    (tests/test_chart.py)."""
    return CUT_OFF_SECONDS + tracking_wait + PENDING_LAST_TRY_SECONDS + DRAIN_TIMEOUT


def run(settings: Settings) -> int:
    """Run the service until a signal or a fatal failure; return the exit code."""
    try:
        http_socket = bind_http_socket(settings.http_host, settings.port)
    except OSError as exc:
        log.error(why_unbindable(exc, settings.http_host, settings.port, "PORT"))
        return EXIT_FAILURE
    tracing.configure_from_environment()
    try:
        return trio.run(_run_with_asyncio_loop, settings, http_socket)
    finally:
        http_socket.close()
        tracing.shutdown()


async def _run_with_asyncio_loop(settings: Settings, http_socket: socket.socket) -> int:
    lifecycle = Lifecycle()
    async with asyncio_loop(), anyio.create_task_group() as tg:
        # Signals are watched before NATS is reached: SIGTERM while the
        # first connect is still retrying is a normal stop too.
        tg.start_soon(_watch_signals, lifecycle)
        code = await _connect_and_serve(settings, lifecycle, http_socket)
        tg.cancel_scope.cancel()
    return code


async def _connect_and_serve(
    settings: Settings, lifecycle: Lifecycle, http_socket: socket.socket
) -> int:
    nats: NatsConnection | None = None
    async with anyio.create_task_group() as tg:

        async def connect() -> None:
            nonlocal nats
            log.info(
                "connecting to NATS at %s; giving up after %gs (NATS_CONNECT_TIMEOUT)",
                ", ".join(settings.nats_urls),
                settings.nats_connect_timeout,
            )
            try:
                nats = await NatsConnection.connect(
                    settings.nats_urls,
                    settings.nats_creds,
                    give_up_after=settings.nats_connect_timeout,
                )
            except NatsUnavailable as exc:
                log.error(
                    "giving up: %s after %gs (set NATS_URL; on a laptop, `%s dev` runs "
                    "NATS, an SMTP capture and the relay in one command)",
                    exc,
                    settings.nats_connect_timeout,
                    command_name(),
                )
                lifecycle.fail("nats connect")
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(connect)
        await lifecycle.stopping.wait()
        tg.cancel_scope.cancel()
    if nats is None:
        # Stopped by a signal before NATS was reached, or never reached it.
        return EXIT_FAILURE if lifecycle.failure else EXIT_OK
    async with drained_on_exit(nats):
        return await serve(settings, nats, lifecycle, http_socket=http_socket)


async def serve(
    settings: Settings,
    nats: NatsConnection,
    lifecycle: Lifecycle | None = None,
    *,
    http_socket: socket.socket | None = None,
    tracking: TrackingStore | None = None,
    events: EventSource | None = None,
) -> int:
    """Serve until stopped; the exit code. Without a ``lifecycle`` of the
    caller's, signals are watched here. ``http_socket``: the HTTP port already
    bound (else the health server binds PORT itself); ``tracking``: a store
    the caller opened (else opened here); ``events``: a queue of SES events
    of the caller's (``emailrelay dev``'s stand-in for SQS), polled exactly as
    SQS is, with the same store and suppression list: one wiring for both."""
    watch_signals = lifecycle is None
    lifecycle = lifecycle or Lifecycle()
    if tracking is None:
        tracking = await open_tracking_store(nats, settings)
    reservations: IdempotencyStore | None = None
    suppressions: SuppressionStore | None = None
    if tracking is not None:
        reservations, suppressions = await open_send_stores(nats, settings)
        if settings.suppression_enabled and suppressions is None:
            log.error(
                "SUPPRESSION_ENABLED is true but the %s bucket cannot be opened "
                "(create it, or set KV_AUTO_CREATE=true); exiting",
                api.SUPPRESSIONS_BUCKET,
            )
            return EXIT_FAILURE
    sqs: SqsClient | None = None
    if settings.ses_eventing_enabled:
        if tracking is None:
            log.error(
                "SES_EVENTING_ENABLED is true but the KV store is not available "
                "(events need JetStream and both buckets); exiting"
            )
            return EXIT_FAILURE
        try:
            sqs = await SqsClient.from_environment(settings.ses_engagement_sqs_queue_url or "")
        except SqsError as exc:
            log.error("SES_EVENTING_ENABLED is true but SQS cannot be used: %s; exiting", exc)
            return EXIT_FAILURE
    if not settings.email_enabled:
        log.warning(
            "EMAIL_ENABLED is not true: this relay sends nothing. Every send it takes "
            "is answered as skipped (empty email_id), also in a queue group beside relays "
            "that do send (emailrelay_skipped_sends counts them); set EMAIL_ENABLED=true to send"
        )
    publisher: EventPublisher | None = None
    if settings.events_stream_enabled:
        publisher = await open_events_publisher(nats, settings)
        if publisher is None:
            return EXIT_FAILURE
    pool: SmtpPool | None = None
    ses: SesApi | None = None
    if settings.email_enabled and settings.email_transport is EmailTransport.SES:
        try:
            ses = await open_ses_api(settings)
        except SesUnavailable as exc:
            log.error("EMAIL_TRANSPORT is ses but the SES API cannot be used: %s; exiting", exc)
            if sqs is not None:
                await sqs.aclose()
            return EXIT_FAILURE
        pool = build_ses_pool(settings, ses)
    elif settings.email_enabled:
        pool = build_smtp_pool(settings)
    pending = PendingTrackingWrites()
    # Started before the KV store could be opened (a cluster still electing
    # its JetStream leader): sends are tracked all the same, their writes
    # waiting in the pending queue until _track_once_available opens it.
    once_open = TrackingOnceOpen()
    send_handler = SendEmailHandler(
        rules=send_rules(settings),
        sender=tracing.traced_sender(pool if pool is not None else NoSender()),
        tracking=once_open if tracking is None else tracing.traced_tracking(tracking),
        tracking_wait=settings.tracking_wait,
        on_tracking_failure=TRACKING_WRITE_FAILURES.inc,
        pending=pending,
        on_expired=REQUESTS_EXPIRED.inc,
        reservations=reservations,
        suppressions=suppressions,
        sent_events=None if publisher is None else SentEvents(publisher, pending),
    )
    service = ServiceStats([], metadata=instance_metadata(settings.email_enabled))
    requests = RequestServer(
        nats,
        settings.max_in_flight,
        stats=service,
        max_backlog=settings.max_backlog,
        send_timeout=settings.send_timeout,
        max_reads_in_flight=settings.max_reads_in_flight,
    )
    lifecycle.hurry = requests.cut_off
    watchdog = LoopWatchdog()
    # Ready once the relay is in the queue group of every subject it can
    # answer at start: before that, a request from a caller that trusts
    # /readyz could find no responder.
    subscribed = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            if watch_signals:
                tg.start_soon(_watch_signals, lifecycle)
            tg.start_soon(watchdog.run)
            tg.start_soon(_stop_when_nats_closes, nats, lifecycle)
            tg.start_soon(looplag.watch_loop_lag)
            tg.start_soon(
                lifecycle.supervise, "pending tracking writes", pending.write_when_possible
            )
            tg.start_soon(
                lifecycle.supervise,
                "health server",
                lambda: serve_health(
                    settings.http_host,
                    settings.port,
                    lambda: (
                        nats.is_connected
                        and subscribed.is_set()
                        and (pool is None or pool.misconfiguration is None)
                    ),
                    lifecycle.stopping,
                    sock=http_socket,
                    is_alive=watchdog.alive,
                ),
            )
            if sqs is not None:
                events = EventSource(sqs, "sqs poller", "SQS")
            if events is not None and tracking is not None:
                _start_engagement(
                    tg, lifecycle, events, tracking, settings, suppressions, publisher
                )
            routes: dict[str, Handler] = {api.SEND_EMAIL_SUBJECT: send_handler}
            if tracking is not None:
                routes |= query_routes(tracking, nats, suppressions)
                if suppressions is not None:
                    routes |= suppression_routes(suppressions)
            if await _add_routes(requests, service, routes):
                subscribed.set()
            if tracking is None:
                tg.start_soon(
                    lifecycle.supervise,
                    "tracking",
                    lambda: _track_once_available(
                        nats, settings, send_handler, once_open, requests, service
                    ),
                )
            tg.start_soon(
                lifecycle.supervise,
                "service discovery",
                lambda: serve_discovery(nats, service, lifecycle.stopping),
            )
            await requests.serve(lifecycle.stopping, settings.shutdown_grace_seconds)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await pending.last_try(PENDING_LAST_TRY_SECONDS)
            if pool is not None:
                await pool.aclose()
            if ses is not None:
                await ses.aclose()
            if sqs is not None:
                await sqs.aclose()
    if lifecycle.failure is not None:
        log.error("stopped after a fatal failure", extra={"part": lifecycle.failure})
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


@dataclass(frozen=True)
class EventSource:
    """Where SES events come from: SQS in production, the dev stack's
    in-memory queue on a laptop. ``part``: the name a fatal failure is logged
    under; ``name``: what the poller says it polls; ``through``: what the
    poller writes the tracking store through (the dev inbox watches its
    updates); the store itself by default."""

    queue: MessageQueue
    part: str
    name: str
    through: Callable[[RecordUpdater], RecordUpdater] = lambda store: store


def _start_engagement(
    tg: anyio.abc.TaskGroup,
    lifecycle: Lifecycle,
    events: EventSource,
    tracking: TrackingStore,
    settings: Settings,
    suppressions: SuppressionStore | None,
    publisher: EventPublisher | None,
) -> None:
    """The engagement path, the same whatever the source: the production
    poller over ``events`` into the tracking store, the suppression list
    (Permanent bounces and complaints) and the ``EMAIL_EVENTS`` stream, each
    when it is on."""
    poller = PollerSettings(max_receives=settings.ses_event_max_receives)
    tg.start_soon(
        lifecycle.supervise,
        events.part,
        lambda: poll_engagement_events(
            events.queue,
            events.through(tracking),
            poller,
            suppressions=suppressions,
            source=events.name,
            events=publisher,
        ),
    )


async def _watch_signals(lifecycle: Lifecycle) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if not lifecycle.stopping.is_set():
                log.info("%s received; draining", signal.Signals(signum).name)
                lifecycle.stop()
            else:
                log.warning("second signal; cutting off in-flight requests now")
                lifecycle.hurry()


async def _stop_when_nats_closes(nats: NatsConnection, lifecycle: Lifecycle) -> None:
    """A connection nats-py will not reconnect can carry no request and no
    reply: stop (exit 1) so that the orchestrator starts a fresh process.
    In-flight work is cut off at once: its replies could not be sent."""
    reason = await nats.wait_closed_for_good()
    log.error("NATS connection closed for good; shutting down", extra={"error": reason})
    lifecycle.hurry()
    lifecycle.fail("nats connection")


def suppression_routes(store: SuppressionStore) -> dict[str, Handler]:
    """The suppression list's subjects (SUPPRESSION_ENABLED=true); a request
    still running at its deadline answers ``internal error``, except a list
    page: ``overloaded`` (it was slow, not failing; what it read of the list
    is kept for the retry)."""
    return {
        api.SUPPRESSION_GET_SUBJECT: bounded_by_deadline(
            GetSuppressionHandler(store), api.ERR_INTERNAL
        ),
        api.SUPPRESSION_LIST_SUBJECT: bounded_by_deadline(
            ListSuppressionsHandler(store), api.ERR_OVERLOADED
        ),
        api.SUPPRESSION_ADD_SUBJECT: bounded_by_deadline(
            AddSuppressionHandler(store), api.ERR_INTERNAL
        ),
        api.SUPPRESSION_REMOVE_SUBJECT: bounded_by_deadline(
            RemoveSuppressionHandler(store), api.ERR_INTERNAL
        ),
    }


def query_routes(
    tracking: TrackingStore, nats: NatsConnection, suppressions: SuppressionStore | None = None
) -> dict[str, Handler]:
    """Status, analytics and erasure: served whenever the KV store is; a query
    still running at its deadline (or cut off at shutdown) answers ``internal
    error``, an erasure ``erasure incomplete, safe to repeat``."""
    return {
        api.ERASE_RECIPIENT_DATA_SUBJECT: bounded_by_deadline(
            EraseRecipientDataHandler(tracking, suppressions), api.ERR_ERASURE_INCOMPLETE
        ),
        api.GET_EMAIL_STATUS_SUBJECT: bounded_by_deadline(
            GetEmailStatusHandler(tracking, lambda: nats.max_payload), api.ERR_INTERNAL
        ),
        api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT: bounded_by_deadline(
            GetEngagementAnalyticsHandler(tracking), api.ERR_INTERNAL
        ),
    }


async def _add_routes(
    requests: RequestServer, service: ServiceStats, routes: dict[str, Handler]
) -> bool:
    """Subscribe and list ``routes``; ``False`` once stopping (nothing added)."""
    if not await requests.add_routes(routes):
        return False
    for subject in routes:
        service.add_endpoint(subject)
    return True


TRACKING_RETRY_MAX = 30.0


async def _track_once_available(
    nats: NatsConnection,
    settings: Settings,
    send_handler: SendEmailHandler,
    once_open: TrackingOnceOpen,
    requests: RequestServer,
    service: ServiceStats,
) -> None:
    """JetStream or the buckets were missing at start (a NATS cluster still
    electing its JetStream leader, buckets an operator has yet to declare):
    look again, with backoff, and start tracking and answering status and
    analytics as soon as they are there, without a restart. Meanwhile the
    sends' tracking writes wait in the pending queue (``once_open``), which
    stores them once the buckets are open."""
    backoff = Backoff(initial=1.0, maximum=TRACKING_RETRY_MAX)
    attempt = 0
    while True:
        attempt += 1
        await backoff.sleep(attempt)
        tracking = await open_tracking_store(nats, settings)
        if tracking is not None:
            reservations, suppressions = await open_send_stores(nats, settings)
            if reservations is not None:
                send_handler.start_reservations(reservations)
            if suppressions is not None:
                send_handler.start_suppressions(suppressions)
                await _add_routes(requests, service, suppression_routes(suppressions))
            once_open.open(tracing.traced_tracking(tracking))
            await _add_routes(requests, service, query_routes(tracking, nats, suppressions))
            return


def send_rules(settings: Settings) -> SendRules:
    return SendRules(
        email_enabled=settings.email_enabled,
        default_from=settings.default_sender,
        default_from_display_name=settings.default_from_display_name,
        allowed_from_domains=settings.allowed_from_domains,
        allowed_reply_to_domains=settings.allowed_reply_to_domains,
        allowed_recipient_domains=settings.allowed_recipient_domains,
        configuration_set=settings.ses_configuration_set,
    )


def build_smtp_pool(settings: Settings) -> SmtpPool:
    endpoint = SmtpEndpoint(
        host=settings.smtp_host,
        port=settings.smtp_port,
        tls_mode=settings.smtp_tls_mode,
        credentials=settings.smtp_credentials,
        # System trust store; OpenSSL honours SSL_CERT_FILE / SSL_CERT_DIR.
        tls_context=ssl.create_default_context(),
        local_hostname=socket.gethostname(),
        timeout=min(settings.send_timeout, 30.0),
    )

    async def connect() -> Connection:
        return await SmtpConnection.open(endpoint)

    return _sender_pool(settings, connect, "smtp")


async def open_ses_api(settings: Settings) -> SesApi:
    """The SES v2 API client (EMAIL_TRANSPORT=ses), configured from the AWS
    environment; :class:`SesUnavailable` when no region or no credentials."""
    return await SesApi.from_environment(
        configuration_set=settings.ses_configuration_set,
        max_connections=settings.smtp_pool_size,
        request_timeout=min(settings.send_timeout, 30.0),
    )


def build_ses_pool(settings: Settings, ses: SesApi) -> SmtpPool:
    """The SMTP pool's slots, pacing and retries, each slot an SES API sender:
    SMTP_POOL_SIZE and SMTP_MAX_SEND_RATE apply to the SES transport too."""

    async def connect() -> Connection:
        return ses.connection()

    return _sender_pool(settings, connect, "ses")


def _sender_pool(
    settings: Settings, connect: Callable[[], Awaitable[Connection]], transport: str
) -> SmtpPool:
    # SMTP_MAX_SEND_RATE: a token bucket in front of every attempt, its rate
    # moved by the provider's throttling replies (emailrelay.mail.rate).
    pacer: TokenBucket | None = None
    rate: AdaptiveRate | None = None
    if settings.smtp_max_send_rate > 0:
        pacer = TokenBucket(settings.smtp_max_send_rate, now=anyio.current_time())
        rate = AdaptiveRate(pacer, settings.smtp_max_send_rate)
    SMTP_SEND_RATE.set(settings.smtp_max_send_rate)
    return SmtpPool(
        connect,
        size=settings.smtp_pool_size,
        max_messages=settings.smtp_connection_max_messages,
        max_age=settings.smtp_connection_max_age,
        send_timeout=settings.send_timeout,
        pacer=pacer,
        rate=rate,
        transport=transport,
    )


async def open_tracking_store(nats: NatsConnection, settings: Settings) -> TrackingStore | None:
    """Both buckets, created with the deployment's settings when missing
    (unless KV_AUTO_CREATE=false), re-opened or re-created when they vanish
    later. ``None`` turns tracking off."""
    return await buckets.open_tracking_store(
        nats,
        buckets.BucketPolicy(settings.kv_auto_create, settings.kv_replicas),
        retention=settings.retention or 0.0,
    )


async def open_events_publisher(nats: NatsConnection, settings: Settings) -> EventPublisher | None:
    """The ``EMAIL_EVENTS`` publisher, the stream created first when missing
    and KV_AUTO_CREATE=true. ``None``, with one error line, when it is missing
    and may not be created: the relay must not start (as with a missing
    suppression bucket). JetStream not answering yet is no reason to stop:
    publishing then fails like any outage (sent events wait, SES events stay
    in SQS) until it answers."""
    spec = events_stream_spec(
        settings.kv_replicas,
        settings.events_max_age,
        settings.events_max_bytes,
        settings.events_duplicate_window,
    )
    publisher = EventPublisher(nats, recreate=spec if settings.kv_auto_create else None)
    try:
        there = await open_events_stream(nats, spec, settings.kv_auto_create)
    except StoreError as exc:
        log.warning(
            "events stream not checked: JetStream not available; publishing waits for it",
            extra={"stream": spec.name, "error": str(exc)},
        )
        return publisher
    if not there:
        log.error(
            "EVENTS_STREAM_ENABLED is true but the %s stream does not exist "
            "(create it, or set KV_AUTO_CREATE=true); exiting",
            spec.name,
        )
        return None
    log.info("events stream on", extra={"stream": spec.name})
    return publisher


async def open_send_stores(
    nats: NatsConnection, settings: Settings
) -> tuple[IdempotencyStore | None, SuppressionStore | None]:
    """The idempotency store (its bucket opened or created with
    IDEMPOTENCY_TTL as max_age) and, when SUPPRESSION_ENABLED=true, the
    suppression list; each ``None`` when its bucket cannot be opened (a
    request with an idempotency key then answers ``email delivery failed``)."""
    policy = buckets.BucketPolicy(settings.kv_auto_create, settings.kv_replicas)
    reservations: IdempotencyStore | None = None
    kv = await buckets.open_reopening_bucket(
        nats, buckets.idempotency_bucket(settings.idempotency_ttl), policy
    )
    if kv is not None:
        reservations = IdempotencyStore(
            kv,
            stale_after=settings.send_timeout + IDEMPOTENCY_STALE_GRACE,
            ttl=settings.idempotency_ttl,
        )
    suppressions: SuppressionStore | None = None
    if settings.suppression_enabled:
        listed = await buckets.open_reopening_bucket(
            nats, buckets.suppressions_bucket(settings.suppression_retention or 0.0), policy
        )
        if listed is not None:
            suppressions = SuppressionStore(listed)
            log.info("suppression list on", extra={"bucket": api.SUPPRESSIONS_BUCKET})
    return reservations, suppressions
