"""The ``emailrelay`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from emailrelay import __version__, api

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_NO_RELAY = 3


def command_name() -> str:
    """How to run this command again, for hints a user can paste: ``emailrelay``
    when that is what is on PATH, else the path that was used (an unactivated
    virtualenv's ``.venv/bin/emailrelay``) or ``python -m emailrelay``."""
    invoked = Path(sys.argv[0])
    if invoked.name != "emailrelay":
        return f"{shlex.quote(sys.executable)} -m emailrelay"
    on_path = shutil.which("emailrelay")
    if on_path is not None and Path(on_path).resolve() == invoked.resolve():
        return "emailrelay"
    return shlex.quote(str(invoked))


DEFAULT_NATS_URL = "nats://localhost:4222"


def _serve(args: argparse.Namespace) -> int:
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
    from emailrelay.dev import DevOptions, run_dev

    return run_dev(
        DevOptions(
            nats_port=args.nats_port,
            smtp_port=args.smtp_port,
            http_port=args.port,
            state_dir=args.state_dir,
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


def _add_dev_command(commands: Any) -> None:
    dev = commands.add_parser(
        "dev",
        help="run the whole stack locally: nats-server, an SMTP capture and the relay",
        description=(
            "Runs an embedded nats-server (JetStream kept in STATE_DIR/nats), an SMTP server "
            "that captures every message as an .eml file in STATE_DIR/capture, and the relay "
            "with sending on, all on 127.0.0.1. Ctrl-C stops everything. "
            "A port of 0 means any free port (the real one is printed)."
        ),
    )
    dev.add_argument("--nats-port", type=_port, default=4222, help="NATS port (default 4222)")
    dev.add_argument(
        "--smtp-port", type=_port, default=1025, help="SMTP capture port (default 1025)"
    )
    dev.add_argument(
        "--port", type=_port, default=8080, help="relay health port, /livez /readyz (default 8080)"
    )
    dev.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".emailrelay-dev"),
        help="where JetStream data and captured mail live (default ./.emailrelay-dev)",
    )
    dev.set_defaults(run=_dev)


# --- Client commands: send, status, analytics ----------------------------------


def _text_file(value: str) -> str:
    """The contents of a UTF-8 file (``-`` reads standard input)."""
    try:
        if value == "-":
            return sys.stdin.read()
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc}") from None


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {value!r}")
    return seconds


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "-s",
        metavar="URL",
        help=f"NATS URL(s), comma-separated (default: $NATS_URL, else {DEFAULT_NATS_URL})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for NATS and for the relay's reply (default 10)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the relay's reply JSON unchanged"
    )


def _add_client_commands(commands: Any) -> None:
    send = commands.add_parser(
        "send",
        help="send one email through a running relay",
        description="Send one email through a running relay (lfx.email-service.send_email).",
    )
    send.add_argument("--to", required=True, help="recipient address")
    send.add_argument("--subject", required=True)
    html = send.add_mutually_exclusive_group(required=True)
    html.add_argument("--html", help="the HTML body")
    html.add_argument(
        "--html-file",
        type=_text_file,
        metavar="PATH",
        help="read the HTML body from PATH (- = stdin)",
    )
    text = send.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the plain-text body")
    text.add_argument(
        "--text-file",
        type=_text_file,
        metavar="PATH",
        help="read the plain-text body from PATH (- = stdin)",
    )
    send.add_argument("--from", dest="from_", default="", metavar="ADDRESS", help="sender")
    send.add_argument("--from-display-name", default="", metavar="NAME")
    send.add_argument("--reply-to", default="", metavar="ADDRESS")
    send.add_argument("--group-id", default="", help="batch id (default: the relay makes one)")
    _add_connection_options(send)
    send.set_defaults(run=_send)

    status = commands.add_parser(
        "status",
        help="show the tracking record of an email, or of every email in a group",
    )
    which = status.add_mutually_exclusive_group(required=True)
    which.add_argument("--email-id")
    which.add_argument("--group-id")
    status.add_argument("--limit", type=int, help="page size for a group (1-1000)")
    status.add_argument("--offset", type=int, help="where a group's page starts (0-based)")
    _add_connection_options(status)
    status.set_defaults(run=_status, parser=status)

    analytics = commands.add_parser("analytics", help="show delivery and open counts for a group")
    analytics.add_argument("--group-id", required=True)
    _add_connection_options(analytics)
    analytics.set_defaults(run=_analytics)


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
    }
    payload = {name: value for name, value in payload.items() if value}
    return _request(args, api.SEND_EMAIL_SUBJECT, payload, _show_sent)


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


def _request(
    args: argparse.Namespace,
    subject: str,
    payload: dict[str, Any],
    show: Callable[[Any], None],
) -> int:
    """One request; the reply printed; the exit code (see the README)."""
    from emailrelay.client import EmailRelayClient, EmailRelayError, RelayUnavailable, decode_reply

    servers = args.server or os.environ.get("NATS_URL", "").strip() or DEFAULT_NATS_URL

    async def ask() -> bytes:
        async with EmailRelayClient.connect(
            servers, timeout=args.timeout, connect_timeout=args.timeout, name="emailrelay-cli"
        ) as relay:
            return await relay.request(subject, payload)

    try:
        reply = asyncio.run(ask())
    except RelayUnavailable as exc:
        print(f"emailrelay: no relay answered: {exc}", file=sys.stderr)
        return EXIT_NO_RELAY
    if args.json:
        print(reply.decode(errors="replace"))
    try:
        body = decode_reply(reply)
    except EmailRelayError as exc:
        print(exc.error, file=sys.stderr)
        return EXIT_ERROR_REPLY
    if not args.json:
        try:
            show(body)
        except ValidationError:
            print(f"unexpected reply from the relay: {reply[:500]!r}", file=sys.stderr)
            return EXIT_ERROR_REPLY
    return EXIT_OK


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
        ("failed", _flag(record.failed, record.failed_at)),
    ]
    for name, value in rows:
        print(f"{name:<10} {value}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailrelay",
        description="Transactional email relay: NATS requests in, SMTP out.",
    )
    parser.add_argument("--version", action="version", version=f"emailrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the relay (configured by environment variables; see README)"
    )
    serve.set_defaults(run=_serve)
    _add_dev_command(commands)
    _add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
