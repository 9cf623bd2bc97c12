"""The ``emailrelay`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import math
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from pydantic import ValidationError

from emailrelay import __version__, api
from emailrelay.command import (
    EXIT_ERROR_REPLY,
    EXIT_NO_RELAY,
    EXIT_OK,
    EXIT_USAGE,
    command_name,
)

if TYPE_CHECKING:
    from emailrelay.client import EmailRelayClient, RelayReply
    from emailrelay.dev.state import StackInfo


def _lacks_extra(command: str, extra: str) -> bool:
    """True, with one line on stderr, when a lean install (the client alone)
    runs a command that needs ``emailrelay[extra]``; checked before the import."""
    from emailrelay.installed import install_hint

    hint = install_hint(command, extra)
    if hint is not None:
        print(hint, file=sys.stderr)
    return hint is not None


def _serve(args: argparse.Namespace) -> int:
    if _lacks_extra("serve", "server"):
        return EXIT_USAGE
    from emailrelay.app import run
    from emailrelay.config import ConfigError, load_settings
    from emailrelay.logs import configure_logging

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"emailrelay: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format, settings.log_add_source)
    try:
        return run(settings)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130


# --- emailrelay dev ------------------------------------------------------------


def _dev(args: argparse.Namespace) -> int:
    if _lacks_extra("dev", "dev"):
        return EXIT_USAGE
    from emailrelay.dev import DevOptions, run_dev

    return run_dev(
        DevOptions(
            nats_port=args.nats_port,
            smtp_port=args.smtp_port,
            http_port=args.port,
            inbox_port=args.inbox_port,
            state_dir=args.state_dir,
            nats_monitoring_port=args.nats_monitoring_port,
            transport=args.transport,
        )
    )


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {port}")
    return port


DEFAULT_STATE_DIR = Path(".emailrelay-dev")
STATE_DIR_HELP = "the dev stack's state directory (default ./.emailrelay-dev)"


def _add_dev_command(commands: Any) -> None:
    dev = commands.add_parser(
        "dev",
        usage=(
            "%(prog)s [--nats-port N] [--smtp-port N] [--port N] [--nats-monitoring-port N] "
            "[--state-dir DIR]\n       %(prog)s event {open,click,bounce,...} --email-id ID"
        ),
        help="run the whole stack locally: nats-server, an SMTP capture and the relay",
        description=(
            "Runs an embedded nats-server (JetStream kept in STATE_DIR/nats), an SMTP server "
            "that captures every message as an .eml file in STATE_DIR/capture, and the relay "
            "with sending on, all on 127.0.0.1. Every captured message gets an SES Delivery "
            "event; `dev event` makes the others. Ctrl-C (or SIGTERM, or closing the terminal) "
            "stops everything. A port of 0 means any free port (the real one is printed). "
            "One stack per state directory."
        ),
    )
    dev.add_argument("--nats-port", type=_port, default=4222, help="NATS port (default 4222)")
    dev.add_argument(
        "--smtp-port", type=_port, default=1025, help="SMTP capture port (default 1025)"
    )
    dev.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="relay HTTP port: /livez /readyz /metrics (default 8080)",
    )
    dev.add_argument(
        "--nats-monitoring-port",
        type=_port,
        default=None,
        help="nats-server's monitoring port: /varz /jsz /healthz (default 8222 when "
        "--nats-port is 4222, else any free port)",
    )
    dev.add_argument(
        "--inbox-port",
        type=_port,
        default=8025,
        help="the dev inbox, captured mail in a browser (default 8025)",
    )
    dev.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where JetStream data and captured mail live (default ./.emailrelay-dev)",
    )
    dev.add_argument(
        "--transport",
        choices=("smtp", "ses"),
        default="smtp",
        help="how the relay sends: smtp (default) or ses, the SES v2 API of a local "
        "endpoint; either way every message is captured",
    )
    dev.set_defaults(run=_dev)
    actions = dev.add_subparsers(
        dest="dev_command",
        metavar="event",
        title="optional action (with the stack running)",
        prog=dev.prog,  # not derived from the usage above
    )
    _add_dev_event_command(actions)


def _add_dev_event_command(actions: Any) -> None:
    from emailrelay.dev.sesevents import BOUNCE_TYPES, DevEvent

    event = actions.add_parser(
        "event",
        help="make an SES engagement event for a captured email (open, click, ...)",
        description=(
            "Makes the SES event Amazon SES would publish for an email the running dev stack "
            "captured (built from its .eml file, in an SNS envelope) and hands it to the "
            "stack, whose relay applies it with the same code as events from SQS; then prints "
            "the email's tracking record. The stack is found through --state-dir when given, "
            "else ./.emailrelay-dev when a stack runs there, else by asking NATS "
            "(--server, $NATS_URL, or the default): so this works from any directory and "
            "on any --nats-port, 0 included."
        ),
    )
    event.add_argument(
        "kind",
        choices=[kind.value.lower() for kind in DevEvent],
        help="the SES event type (delivery is sent by the stack itself on capture)",
    )
    event.add_argument(
        "--email-id",
        required=True,
        type=_email_id,
        help="the email's id, as `send` printed it",
    )
    event.add_argument(
        "--link",
        default="https://example.com/",
        metavar="URL",
        help="the clicked link, for click (default https://example.com/)",
    )
    event.add_argument(
        "--bounce-type",
        choices=BOUNCE_TYPES,
        default="Permanent",
        help="for bounce (default Permanent)",
    )
    # SUPPRESS: without the flag here, `dev --state-dir DIR event ...` keeps DIR.
    event.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help=STATE_DIR_HELP)
    event.add_argument(
        "--timeout",
        type=_timeout_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the stack (default 10)",
    )
    event.add_argument(
        "--server",
        "-s",
        metavar="URL",
        help="the stack's NATS URL, to find it from any directory "
        f"(default: $NATS_URL, else {api.DEFAULT_NATS_URL})",
    )
    event.add_argument(
        "--json", action="store_true", help="print the tracking record's JSON unchanged"
    )
    event.set_defaults(run=_dev_event, parser=event)


_EMAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,128}$")


def _email_id(value: str) -> str:
    if not _EMAIL_ID.match(value):
        raise argparse.ArgumentTypeError(f"not an email id such as `send` prints: {value!r}")
    return value


def _find_stack(args: argparse.Namespace) -> StackInfo:
    """The running dev stack: through ``--state-dir`` when given; else through
    ./.emailrelay-dev when a stack runs there; else by asking NATS, so that
    ``dev event`` works from any directory. Raises NoStackRunning."""
    from emailrelay.client import EmailRelayClient, RelayUnavailable
    from emailrelay.dev.engagement import DEV_STACK_SUBJECT
    from emailrelay.dev.state import NoStackRunning, StackInfo, running_stack

    state_dir: Path = args.state_dir.resolve()
    try:
        return running_stack(state_dir)
    except NoStackRunning:
        if args.state_dir != DEFAULT_STATE_DIR:
            raise
    servers = _nats_servers(args)

    async def ask() -> bytes:
        async with EmailRelayClient.connect(
            servers, timeout=min(args.timeout, 2.0), connect_timeout=min(args.timeout, 2.0)
        ) as relay:
            return await relay.request(DEV_STACK_SUBJECT, {})

    try:
        return StackInfo(**json.loads(asyncio.run(ask())))
    except (RelayUnavailable, ValueError, TypeError):
        raise NoStackRunning(
            f"no emailrelay dev found: none running in {state_dir}, none answering on "
            f"{', '.join(servers)} (start one with `{command_name()} dev`, or pass "
            "--server URL or --state-dir DIR of the running one)"
        ) from None


def _dev_event(args: argparse.Namespace) -> int:
    from emailrelay.client import EmailRelayClient, RelayUnavailable
    from emailrelay.dev.sesevents import DevEvent, ses_event, sns_notification
    from emailrelay.dev.state import NoStackRunning

    try:
        stack = _find_stack(args)
    except NoStackRunning as exc:
        print(f"emailrelay: {exc}", file=sys.stderr)
        return EXIT_NO_RELAY
    captured = sorted(Path(stack.capture_dir).glob(f"*-{args.email_id}.eml"))
    if not captured:
        print(
            f"emailrelay: no email {args.email_id} in {stack.capture_dir} "
            "(events are for emails this dev stack captured)",
            file=sys.stderr,
        )
        return EXIT_ERROR_REPLY
    kind = DevEvent(args.kind.capitalize())
    event = ses_event(kind, captured[-1].read_bytes(), link=args.link, bounce_type=args.bounce_type)

    async def inject() -> tuple[bytes, RelayReply]:
        async with EmailRelayClient.connect(
            stack.nats_url,
            timeout=args.timeout,
            connect_timeout=args.timeout,
            name="emailrelay-dev-event",
        ) as relay:
            # The request body is the SQS message body: the SNS envelope itself.
            accepted = await relay.request(
                stack.events_subject, json.loads(sns_notification(event))
            )
            status = await relay.exchange(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": args.email_id})
            return accepted, status

    try:
        accepted, status = asyncio.run(inject())
    except RelayUnavailable as exc:
        print(
            f"emailrelay: the dev stack at {stack.nats_url} did not answer: {exc}", file=sys.stderr
        )
        return EXIT_NO_RELAY
    if not args.json:
        handled = json.loads(accepted).get("handled") is True
        print(
            f"{args.kind} event for {args.email_id}: "
            + ("applied by the relay" if handled else "queued (the relay retries it)")
        )
    return _print_reply(args, status, _show_status)


# --- Client commands: send, status, analytics ----------------------------------


def _text_file(value: str) -> str:
    """The contents of a UTF-8 file (``-`` reads standard input)."""
    try:
        if value == "-":
            return sys.stdin.read()
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc}") from None


MIN_TIMEOUT = 0.01
MAX_TIMEOUT = 3600.0


def _timeout_seconds(value: str) -> float:
    """A finite number of seconds a person would wait: 10 ms to an hour."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g} (got {value!r})"
        )
    return seconds


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low or (high is not None and number > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"must be a whole number {span} (got {value!r})")
        return number

    return parse


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--server",
        "-s",
        metavar="URL",
        help=f"NATS URL(s), comma-separated (default: $NATS_URL, else {api.DEFAULT_NATS_URL})",
    )
    group.add_argument(
        "--timeout",
        type=_timeout_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for NATS and for the relay's reply (default 10); "
        "a refused connection or an unknown host fails at once",
    )
    group.add_argument("--json", action="store_true", help="print the relay's reply JSON unchanged")


EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 the relay answered with an error (printed on stderr); "
    "2 usage error; 3 no relay answered (NATS unreachable, nobody serving, or no reply "
    "in time)"
)


def _add_client_commands(commands: Any) -> None:
    send = commands.add_parser(
        "send",
        help="send one email through a running relay",
        description=(
            "Send one email through a running relay (lfx.email-service.send_email) and print "
            "its email_id and group_id. --to, --subject and both bodies are required: "
            "--html (or --html-file) and --text (or --text-file)."
        ),
        epilog=EXIT_CODES_HELP,
    )
    message = send.add_argument_group("message (required)")
    message.add_argument("--to", required=True, metavar="ADDRESS", help="recipient address")
    message.add_argument("--subject", required=True, help="subject line")
    html = message.add_mutually_exclusive_group(required=True)
    html.add_argument("--html", help="the HTML body")
    html.add_argument(
        "--html-file",
        type=_text_file,
        metavar="PATH",
        help="read the HTML body from PATH (- = stdin)",
    )
    text = message.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the plain-text body")
    text.add_argument(
        "--text-file",
        type=_text_file,
        metavar="PATH",
        help="read the plain-text body from PATH (- = stdin)",
    )
    optional = send.add_argument_group("optional fields (the relay's defaults apply)")
    optional.add_argument(
        "--from",
        dest="from_",
        default="",
        metavar="ADDRESS",
        help="sender; its domain must be in the relay's SMTP_ALLOWED_FROM_DOMAINS "
        "(default: its DEFAULT_SMTP_FROM)",
    )
    optional.add_argument(
        "--from-display-name",
        default="",
        metavar="NAME",
        help="the From display name (default: the relay's DEFAULT_SMTP_FROM_DISPLAY_NAME)",
    )
    optional.add_argument(
        "--reply-to",
        default="",
        metavar="ADDRESS",
        help="Reply-To address; its domain must be in (or under) the relay's "
        "SMTP_ALLOWED_REPLY_TO_DOMAINS",
    )
    optional.add_argument(
        "--group-id",
        default="",
        metavar="ID",
        help="your batch id, for status and analytics by group (default: the relay makes one)",
    )
    optional.add_argument(
        "--idempotency-key",
        default="",
        type=_idempotency_key,
        metavar="KEY",
        help="at most 256 characters; running the same command again with the same key "
        "prints the first email_id and sends nothing more (once every relay runs a "
        "version that knows keys)",
    )
    _add_connection_options(send)
    send.set_defaults(run=_send, parser=send)

    status = commands.add_parser(
        "status",
        help="show the tracking record of an email, or of every email in a group",
        description=(
            "Show one email's tracking record (sent, delivered, opened, failed), or the "
            "records of every email in a group in send order "
            "(lfx.email-service.get_email_status). Page a big group with --limit and --offset."
        ),
        epilog=EXIT_CODES_HELP,
    )
    which = status.add_mutually_exclusive_group(required=True)
    which.add_argument("--email-id", metavar="ID", help="one email, by the id `send` printed")
    which.add_argument("--group-id", metavar="ID", help="every email sent with this group id")
    status.add_argument(
        "--limit",
        type=_whole_number(1, api.MAX_STATUS_PAGE),
        metavar="N",
        help=f"page size for a group (1-{api.MAX_STATUS_PAGE})",
    )
    status.add_argument(
        "--offset",
        type=_whole_number(0),
        metavar="N",
        help="where a group's page starts (0-based)",
    )
    _add_connection_options(status)
    status.set_defaults(run=_status, parser=status)

    analytics = commands.add_parser(
        "analytics",
        help="show delivery and open counts for a group",
        description=(
            "Show a group's counts: total_sent, delivered, opened (every open), unique_opened "
            "(emails opened at least once) and failed "
            "(lfx.email-service.get_email_engagement_analytics)."
        ),
        epilog=EXIT_CODES_HELP,
    )
    analytics.add_argument(
        "--group-id", required=True, metavar="ID", help="the group id the emails were sent with"
    )
    _add_connection_options(analytics)
    analytics.set_defaults(run=_analytics, parser=analytics)
    _add_suppression_command(commands)
    _add_erase_command(commands)
    _add_events_command(commands)


def _idempotency_key(value: str) -> str:
    if len(value) > api.MAX_IDEMPOTENCY_KEY_CHARS:
        raise argparse.ArgumentTypeError(
            f"must be at most {api.MAX_IDEMPOTENCY_KEY_CHARS} characters (got {len(value)})"
        )
    return value


def _mailbox(value: str) -> str:
    """One address, checked before anything is asked of the relay."""
    from emailrelay.addresses import parse_mailbox

    if parse_mailbox(value.strip()) is None:
        raise argparse.ArgumentTypeError(f"not one email address: {value!r}")
    return value.strip()


SUPPRESSION_NOTE = (
    "Served only by relays running with SUPPRESSION_ENABLED=true "
    "(otherwise: exit 3, nobody serving the subject)."
)


def _add_suppression_command(commands: Any) -> None:
    suppression = commands.add_parser(
        "suppression",
        help="inspect and manage the suppression list (SUPPRESSION_ENABLED=true)",
        description=(
            "The recipients the relay will not send to again: Permanent bounces and "
            "complaints from SES events, and addresses added by hand. A send to one of them "
            "answers `recipient suppressed`. Addresses compare case-insensitively. "
            + SUPPRESSION_NOTE
        ),
        epilog=EXIT_CODES_HELP,
    )
    actions = suppression.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="print a page of suppressed addresses",
        description="Print suppressed addresses with reason and time "
        "(lfx.email-service.suppression.list), a page at a time. " + SUPPRESSION_NOTE,
        epilog=EXIT_CODES_HELP,
    )
    listing.add_argument(
        "--limit",
        type=_whole_number(1, api.MAX_SUPPRESSION_PAGE),
        default=api.DEFAULT_SUPPRESSION_PAGE,
        metavar="N",
        help=f"page size (1-{api.MAX_SUPPRESSION_PAGE}, default {api.DEFAULT_SUPPRESSION_PAGE})",
    )
    listing.add_argument(
        "--offset",
        type=_whole_number(0),
        default=0,
        metavar="N",
        help="where the page starts (0-based; the output names the next page's offset)",
    )
    _add_connection_options(listing)
    listing.set_defaults(run=_suppression_list, parser=listing)

    for name, run, verb, subject in (
        ("get", _suppression_get, "show why an address is suppressed", api.SUPPRESSION_GET_SUBJECT),
        ("add", _suppression_change, "suppress an address by hand", api.SUPPRESSION_ADD_SUBJECT),
        (
            "remove",
            _suppression_change,
            "allow sending to an address again",
            api.SUPPRESSION_REMOVE_SUBJECT,
        ),
    ):
        action = actions.add_parser(
            name,
            help=verb,
            description=f"{verb[0].upper()}{verb[1:]} ({subject}). {SUPPRESSION_NOTE}",
            epilog=EXIT_CODES_HELP,
        )
        action.add_argument(
            "address",
            type=_mailbox,
            metavar="ADDRESS",
            help="the recipient address (a@b.example or 'Name <a@b.example>'; any case)",
        )
        _add_connection_options(action)
        action.set_defaults(run=run, parser=action, subject=subject)


def _add_erase_command(commands: Any) -> None:
    erase = commands.add_parser(
        "erase",
        help="erase one recipient's tracking data (a data-protection request)",
        description=(
            "Remove every tracking record addressed to RECIPIENT and its id from every "
            "group index (lfx.email-service.erase_recipient_data). Idempotent: a repeat "
            "erases nothing and says so. The suppression-list entry is kept unless "
            "--suppression is given. --scan also finds records written before the "
            "recipient index existed: it reads the whole email-recipients bucket itself "
            "(direct KV access), with a progress bar, and resumes an interrupted scan."
        ),
        epilog=EXIT_CODES_HELP,
    )
    erase.add_argument(
        "--recipient", required=True, type=_mailbox, metavar="ADDRESS", help="one address"
    )
    erase.add_argument("--suppression", action="store_true", help="erase its suppression entry too")
    erase.add_argument("--scan", action="store_true", help="also scan every record (older data)")
    erase.add_argument(
        "--state-file",
        type=Path,
        metavar="PATH",
        help="where --scan keeps its position (default: .emailrelay-erase-<hash>.json)",
    )
    _add_connection_options(erase)
    erase.set_defaults(run=_erase, parser=erase)


def _erase(args: argparse.Namespace) -> int:
    payload = {"recipient": args.recipient, "suppression": args.suppression}
    if not args.scan:
        return _request(args, api.ERASE_RECIPIENT_DATA_SUBJECT, payload, _show_erasure)
    from emailrelay.erase_scan import default_state_file, run_scan

    state_file = args.state_file or default_state_file(args.recipient)
    reply = run_scan(_nats_servers(args), args.recipient, state_file, args.timeout)
    code = EXIT_OK
    if args.suppression:
        code = _request(args, api.ERASE_RECIPIENT_DATA_SUBJECT, payload, lambda body: None)
    print(reply.model_dump_json() if args.json else _erasure_line(reply))
    return code


def _erasure_line(reply: api.EraseRecipientDataReply) -> str:
    if not reply.erased_records and not reply.erased_index_entries:
        return "nothing to erase (already erased, or no records for this recipient)"
    return (
        f"erased {reply.erased_records} records and "
        f"{reply.erased_index_entries} group-index entries"
    )


def _show_erasure(body: Any) -> None:
    print(_erasure_line(api.EraseRecipientDataReply.model_validate(body)))


def _suppression_list(args: argparse.Namespace) -> int:
    payload = {"limit": args.limit, "offset": args.offset}
    return _request(args, api.SUPPRESSION_LIST_SUBJECT, payload, _show_suppressions)


def _suppression_get(args: argparse.Namespace) -> int:
    payload = {"address": args.address}
    return _request(args, args.subject, payload, _show_suppression)


def _suppression_change(args: argparse.Namespace) -> int:
    payload = {"address": args.address}
    return _request(args, args.subject, payload, _show_suppression_change)


def _show_suppression(body: Any) -> None:
    entry = api.SuppressionEntry.model_validate(body)
    print(f"{entry.address}  {entry.reason}  since {_when(entry.suppressed_at)}")
    for name, value in entry.event.items():
        print(f"  {name}: {value}")


def _show_suppressions(body: Any) -> None:
    page = api.SuppressionListReply.model_validate(body)
    print(f"{len(page.suppressions)} suppressed address(es) from offset {page.offset}")
    for entry in page.suppressions:
        print(f"{entry.address}  {entry.reason}  {_when(entry.suppressed_at)}")
    if page.next_offset is not None:
        print(f"more: {command_name()} suppression list --offset {page.next_offset}")


def _show_suppression_change(body: Any) -> None:
    change = api.SuppressionChangeReply.model_validate(body)
    print(f"{change.address}: {'changed' if change.changed else 'unchanged (nothing to do)'}")


def _send(args: argparse.Namespace) -> int:
    payload = {
        "to": args.to,
        "subject": args.subject,
        "html": args.html if args.html is not None else args.html_file,
        "text": args.text if args.text is not None else args.text_file,
        "from": args.from_,
        "from_display_name": args.from_display_name,
        "reply_to": args.reply_to,
        "group_id": args.group_id,
        "idempotency_key": args.idempotency_key,
    }
    payload = {name: value for name, value in payload.items() if value}
    return _request(
        args,
        api.SEND_EMAIL_SUBJECT,
        payload,
        _show_sent,
        replayed=lambda body: _show_replayed(body, args.idempotency_key),
    )


def _status(args: argparse.Namespace) -> int:
    paging = {"limit": args.limit, "offset": args.offset}
    paging = {name: value for name, value in paging.items() if value is not None}
    if paging and not args.group_id:
        args.parser.error("--limit and --offset page a group: use them with --group-id")
    if args.email_id is not None:
        return _request(
            args, api.GET_EMAIL_STATUS_SUBJECT, {"email_id": args.email_id}, _show_status
        )
    payload: dict[str, Any] = {"group_id": args.group_id, **paging}
    return _request(args, api.GET_EMAIL_STATUS_SUBJECT, payload, _show_status)


def _analytics(args: argparse.Namespace) -> int:
    payload = {"group_id": args.group_id}
    return _request(args, api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, payload, _show_analytics)


SUBJECT_SETTINGS: dict[str, str] = {
    subject: "SUPPRESSION_ENABLED=true" for subject in api.SUPPRESSION_SUBJECTS
}
"""Subjects a relay serves only with a setting on: "no relay is serving"
names the setting. One row per subject."""


def _request(
    args: argparse.Namespace,
    subject: str,
    payload: dict[str, Any],
    show: Callable[[Any], None],
    *,
    replayed: Callable[[Any], None] | None = None,
) -> int:
    """One request; the reply printed; the exit code (see the README)."""
    from emailrelay.client import NoResponders, RelayUnavailable

    servers = _nats_servers(args)

    async def ask() -> RelayReply:
        async with _connected_client(servers, args.timeout) as relay:
            return await relay.exchange(subject, payload)

    try:
        reply = asyncio.run(ask())
    except RelayUnavailable as exc:
        setting = SUBJECT_SETTINGS.get(exc.subject) if isinstance(exc, NoResponders) else None
        needs = f" (relays serve it only with {setting}; is it set?)" if setting else ""
        print(f"emailrelay: no relay answered: {exc}{needs}", file=sys.stderr)
        return EXIT_NO_RELAY
    show_reply = replayed if replayed is not None and reply.replayed else show
    return _print_reply(args, reply, show_reply)


@contextlib.asynccontextmanager
async def _connected_client(servers: Sequence[str], wait: float) -> AsyncIterator[EmailRelayClient]:
    """The client, connected; :class:`~emailrelay.client.RelayUnavailable` at
    once when no server accepts a connection."""
    from emailrelay.client import EmailRelayClient, RelayUnavailable

    # The client retries a refused connection until its connect timeout (a
    # relay may start before NATS); a person at a terminal wants to know now.
    problem = await unreachable(servers, wait)
    if problem is not None:
        raise RelayUnavailable(f"cannot reach NATS: {problem}")
    async with EmailRelayClient.connect(
        servers, timeout=wait, connect_timeout=wait, name="emailrelay-cli"
    ) as relay:
        yield relay


def _print_reply(args: argparse.Namespace, reply: RelayReply, show: Callable[[Any], None]) -> int:
    """The reply on stdout (``--json``: unchanged), an error reply on stderr:
    the contract's exact string, and for people ``emailrelay: `` before it and
    the relay's detail (or a hint of ours) after it."""
    from emailrelay.client import EmailRelayError, decode_reply

    if args.json:
        print(reply.data.decode(errors="replace"))
    try:
        body = decode_reply(reply.data, reply.headers)
    except EmailRelayError as exc:
        if args.json:
            print(exc.error, file=sys.stderr)
        else:
            hint = exc.detail or _hint(args, exc.error)
            print(f"emailrelay: {exc.error}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return EXIT_ERROR_REPLY
    if not args.json:
        try:
            show(body)
        except ValidationError:
            print(f"unexpected reply from the relay: {reply.data[:500]!r}", file=sys.stderr)
            return EXIT_ERROR_REPLY
    return EXIT_OK


def _hint(args: argparse.Namespace, error: str) -> str:
    """What to try next when the relay sent no detail (a relay before the header)."""
    if error == api.ERR_INVALID_TO and re.search(r"[,;]", getattr(args, "to", "") or ""):
        return "one recipient per request"
    if error == api.ERR_FROM_DOMAIN_NOT_ALLOWED:
        return "the relay allows the domains in its SMTP_ALLOWED_FROM_DOMAINS"
    if error == api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED:
        return "the relay allows the domains in its SMTP_ALLOWED_REPLY_TO_DOMAINS"
    return ""


def _nats_servers(args: argparse.Namespace) -> tuple[str, ...]:
    """The NATS URLs to use, checked here: a usage error names where they came from."""
    from emailrelay.config import parse_nats_urls

    if args.server:
        source, text = "--server", args.server
    elif os.environ.get("NATS_URL", "").strip():
        source, text = "NATS_URL", os.environ["NATS_URL"]
    else:
        return (api.DEFAULT_NATS_URL,)
    try:
        return parse_nats_urls(text)
    except ValueError as exc:
        args.parser.error(f"{source} {exc}")
        raise  # not reached: error() exits


_DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "ws": 80, "wss": 443}


async def unreachable(servers: Sequence[str], wait: float) -> str | None:
    """``None`` as soon as one server accepts a TCP connection; else why none
    does (``127.0.0.1:4222: connection refused``, ``unknown host nats.example``),
    known in milliseconds unless a server just does not answer."""

    async def probe(url: str) -> str | None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 4222)
        try:
            async with asyncio.timeout(wait):
                _, writer = await asyncio.open_connection(host, port)
        except socket.gaierror:
            return f"unknown host {host}"
        except TimeoutError:
            return f"{host}:{port} did not answer within {wait:g}s"
        except OSError as exc:
            # asyncio words a refusal "Connect call failed (...)": say what errno says.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            return f"{host}:{port}: {reason.lower()}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    probes = [asyncio.ensure_future(probe(url)) for url in servers]
    problems = []
    try:
        for finished in asyncio.as_completed(probes):
            problem = await finished
            if problem is None:
                return None
            problems.append(problem)
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
    return "; ".join(problems)


def _show_sent(body: Any) -> None:
    reply = api.SendEmailReply.model_validate(body)
    if not reply.email_id:
        print(
            "not sent: the relay skipped it on purpose (EMAIL_ENABLED is not true, or the "
            "recipient's domain is outside SMTP_ALLOWED_RECIPIENT_DOMAINS)"
        )
        return
    print(f"sent  email_id={reply.email_id}  group_id={reply.group_id}")
    print(f"      {command_name()} status --email-id {reply.email_id}")


def _show_replayed(body: Any, key: str) -> None:
    """A send the relay answered from its idempotency key: nothing new went out."""
    reply = api.SendEmailReply.model_validate(body)
    print(
        f"already sent (idempotency key {key}): "
        f"email_id={reply.email_id}  group_id={reply.group_id}"
    )
    print(f"      {command_name()} status --email-id {reply.email_id}")


def _show_status(body: Any) -> None:
    if isinstance(body, list):
        records = [api.TrackingRecord.model_validate(item) for item in body]
        print(f"{len(records)} email(s)")
        for record in records:
            print(
                f"{record.email_id}  {_when(record.sent_at)}  {_state(record)}  "
                f"{record.to}  {record.subject}"
            )
        return
    record = api.TrackingRecord.model_validate(body)
    rows = [
        ("email_id", record.email_id),
        ("group_id", record.group_id),
        ("to", record.to),
        ("subject", record.subject),
        ("sent_at", _when(record.sent_at)),
        ("delivered", _flag(record.delivered, record.delivered_at)),
        (
            "opened",
            f"{record.open_count} time(s), last {_when(record.last_opened_at)}"
            if record.opened
            else "no",
        ),
        (
            "clicked",
            f"{record.click_count} time(s), last {_when(record.last_clicked_at)}"
            if record.clicked
            else "no",
        ),
        ("failed", _flag(record.failed, record.failed_at) + _failure(record)),
    ]
    for name, value in rows:
        print(f"{name:<10} {value}")
    for name, value in _the_rest(record).items():
        print(f"{name:<10} {value}")


def _failure(record: api.TrackingRecord) -> str:
    """Every reason a record failed (a bounce and a later complaint both show)."""
    reasons = []
    if record.bounce_type:
        reasons.append(f"bounce: {record.bounce_type}, {record.bounce_sub_type or '-'}")
    if record.complaint_feedback_type:
        reasons.append(f"complaint: {record.complaint_feedback_type}")
    if record.reject_reason:
        reasons.append(f"rejected: {record.reject_reason}")
    return f" ({'; '.join(reasons)})" if reasons else ""


_SHOWN_ABOVE = {
    "email_id", "group_id", "to", "subject", "sent_at", "delivered", "delivered_at",
    "opened", "open_count", "last_opened_at", "clicked", "click_count", "last_clicked_at",
    "failed", "failed_at", "bounce_type", "bounce_sub_type", "complaint_feedback_type",
    "reject_reason",
}  # fmt: skip


def _item(item: Any) -> str:
    if isinstance(item, dict):
        return ", ".join(f"{k}={v}" for k, v in item.items())
    return str(item)


def _the_rest(record: api.TrackingRecord) -> dict[str, str]:
    """The record's other fields that hold something, so that the human view
    shows all that ``--json`` shows (a field added later included)."""
    rest: dict[str, str] = {}
    for name, value in json.loads(record.to_json()).items():
        if name in _SHOWN_ABOVE or value in (None, False, "", [], {}):
            continue
        if isinstance(value, list):
            rest[name] = "; ".join(_item(item) for item in value)
        else:
            rest[name] = str(value)
    return rest


def _state(record: api.TrackingRecord) -> str:
    if record.failed:
        return "failed   "
    if record.opened:
        return "opened   "
    if record.delivered:
        return "delivered"
    return "sent     "


def _flag(value: bool, when: Any) -> str:
    return f"yes, {_when(when)}" if value else "no"


def _when(value: Any) -> str:
    return api.format_time(value) if value is not None else "-"


def _show_analytics(body: Any) -> None:
    reply = api.EngagementAnalyticsReply.model_validate(body)
    for name, value in reply.model_dump().items():
        print(f"{name:<14} {value}")


# --- emailrelay events ----------------------------------------------------------


def _add_events_command(commands: Any) -> None:
    events = commands.add_parser(
        "events",
        help="read the EMAIL_EVENTS stream (relays with EVENTS_STREAM_ENABLED=true)",
        description=(
            "Print the outcomes of sent emails from the JetStream stream EMAIL_EVENTS, one "
            "line each, oldest first, through a durable consumer: a second run goes on "
            "where the first stopped. Without --follow it stops once it has caught up."
        ),
        epilog=EXIT_CODES_HELP.replace("no relay answered", "the stream cannot be read"),
    )
    events.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=api.EVENT_TYPES,
        default=[],
        metavar="TYPE",
        help=f"only this type, repeatable ({', '.join(api.EVENT_TYPES)}); default: all",
    )
    events.add_argument(
        "--follow", "-f", action="store_true", help="keep waiting for new events (Ctrl-C stops)"
    )
    events.add_argument(
        "--consumer",
        metavar="NAME",
        help="the durable consumer's name (default: emailrelay-cli-<types or all>)",
    )
    _add_connection_options(events)
    events.set_defaults(run=_events, parser=events)


def _events(args: argparse.Namespace) -> int:
    from emailrelay.client import RelayUnavailable

    servers = _nats_servers(args)
    types = sorted(set(args.types))
    consumer = args.consumer or "emailrelay-cli-" + ("-".join(types) or "all")

    async def read() -> None:
        async with _connected_client(servers, args.timeout) as relay:
            stream = relay.events(consumer, types, follow=args.follow)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    print(event.to_json().decode() if args.json else _event_line(event))
                    sys.stdout.flush()

    try:
        asyncio.run(read())
    except RelayUnavailable as exc:
        print(f"emailrelay: {exc}", file=sys.stderr)
        return EXIT_NO_RELAY
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _event_line(event: api.EmailEvent) -> str:
    details = {
        "bounce": "/".join(filter(None, (event.bounce_type, event.bounce_sub_type))),
        "feedback": event.complaint_feedback_type,
        "link": event.link,
    }
    extra = "".join(f"  {name}={value}" for name, value in details.items() if value)
    return (
        f"{api.format_time(event.occurred_at)}  {event.type:<10}  {event.recipient}  "
        f"email_id={event.email_id}  group_id={event.group_id}{extra}"
    )


def _serve_epilog() -> str:
    from emailrelay.config import environment_defaults

    rows = environment_defaults()
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {default}" for name, default in rows]
    return (
        "environment variables (default):\n"
        + "\n".join(lines)
        + "\n\nAn empty value means unset. README.md, section Configuration, says what "
        "each one does.\nexit codes: 0 stopped by SIGTERM/SIGINT; 1 a fatal failure (NATS "
        "unreachable, PORT taken, ...); 2 a configuration error."
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the mistakes people make answered first and briefly: a
    mistyped flag is named (with the flag it most resembles) before any
    "required" complaint, and an error shows a one-line usage, not the block."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        # This parser's own flags come before its subcommand's name, if it has one.
        commands = self._subcommand_names()
        own = next((i for i, word in enumerate(words) if word in commands), len(words))
        unknown = self._unknown_flag(words[:own])
        if unknown is not None:
            self.error(unknown)
        return super().parse_known_args(words, namespace)

    def _subcommand_names(self) -> set[str]:
        return {
            name
            for action in self._actions
            if isinstance(action, argparse._SubParsersAction)
            for name in action.choices
        }

    def _unknown_flag(self, words: list[str]) -> str | None:
        known = list(self._option_string_actions)
        for word in words:
            if word == "--":
                return None
            if not word.startswith("-") or word == "-" or self._negative_number_matcher.match(word):
                continue
            flag = word.split("=", 1)[0]
            if flag in known or (not flag.startswith("--") and len(flag) > 2):
                continue  # known, or short flags run together (-sURL)
            long_flags = [k for k in known if k.startswith("--")]
            if any(k.startswith(flag) for k in long_flags):
                continue  # an abbreviation: argparse takes it, or says it is ambiguous
            close = difflib.get_close_matches(flag, long_flags, 1, 0.75)
            suggestion = f" (did you mean {close[0]}?)" if close else ""
            return f"unrecognized argument {flag}{suggestion}"
        return None

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message}\n"
            f"usage: {self.prog} ... (`{self.prog} --help` lists the flags)\n",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="emailrelay",
        description="Transactional email relay: NATS requests in, SMTP out.",
        epilog="Run `emailrelay COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"emailrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the relay (configured by environment variables; see README)",
        description=(
            "Run the relay: connect to NATS, serve the lfx.email-service subjects (send_email, "
            "get_email_status, get_email_engagement_analytics; suppression.get/list/add/remove "
            "too with SUPPRESSION_ENABLED=true) in the queue group lfx.email-service.queue, "
            "send over SMTP, track in JetStream KV, "
            "and serve /livez, /readyz and /metrics on PORT. It takes no flags: every "
            "setting is an environment variable."
        ),
        epilog=_serve_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(run=_serve)
    _add_dev_command(commands)
    _add_client_commands(commands)
    return parser


EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE
"""What a shell reports for a command stopped by a closed pipe (``| head -1``)."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code: int = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (``| head -1``): stop quietly, as other commands do.
        # Python's last flush at exit would fail again: stdout goes nowhere now.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_CLOSED_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
