"""MIME building: ms per build_message, against the builders it replaced (``nox -s bench``).

Three builders on the same requests, in the same run:

- ``new``: :func:`emailrelay.mail.message.build_message`, the hand-written writer;
- ``modern``: the ``EmailMessage`` + modern-policy builder it replaced (copied
  below unchanged, the baseline);
- ``legacy``: the same message through ``email.mime`` + ``email.header.Header``
  (compat32), the other candidate considered.

Prints ms per build for a typical 2 KB email (ASCII, and with non-ASCII
headers and bodies) and for large inputs (one field of 64 KiB to 1 MiB, the
rest typical), with each baseline as a ratio of the new time. The modern
builder is quadratic on long header values, so it is only run on the sizes it
finishes in seconds (``-`` in the table). Times are CPU time of this process,
so a busy machine does not inflate them. Figures only: nothing here asserts timing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import EmailPolicy, compat32
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emailrelay.addresses import Mailbox, parse_mailbox, strip_line_breaks
from emailrelay.api import SES_CONFIGURATION_SET_HEADER, TRACKING_HEADER
from emailrelay.mail.message import OutgoingEmail, build_message, tracking_header_value

Builder = Callable[[OutgoingEmail], bytes]

# --- the replaced builder (emailrelay/mail/message.py before this change) ---

_RAW_HEADERS = frozenset({TRACKING_HEADER.lower(), "from"})


class _RelayPolicy(EmailPolicy):
    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if name.lower() in _RAW_HEADERS and isinstance(value, str):
            return (name, value)
        stored: tuple[str, Any] = super().header_store_parse(name, value)
        return stored

    def fold(self, name: str, value: Any) -> str:
        if name.lower() in _RAW_HEADERS:
            return f"{name}: {value}{self.linesep}"
        folded: str = super().fold(name, value)
        return folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        if name.lower() in _RAW_HEADERS:
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


POLICY = _RelayPolicy(linesep="\r\n")


def _address(mailbox: Mailbox, display_name: str = "") -> Address:
    return Address(
        display_name=strip_line_breaks(display_name),
        username=strip_line_breaks(mailbox.local_part),
        domain=strip_line_breaks(mailbox.domain),
    )


def _old_format_from(mailbox: Mailbox, display_name: str) -> str:
    addr_spec = _address(mailbox).addr_spec
    name = strip_line_breaks(display_name)
    if not name:
        return addr_spec
    quoted = formataddr((name, addr_spec))
    if name.isascii() and name.isprintable() and len(f"From: {quoted}") <= 78:
        return quoted
    encoded = Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
    one_line = f"{encoded} <{addr_spec}>"
    if "\n" not in encoded and len(f"From: {one_line}") <= 78:
        return one_line
    return f"{encoded}\r\n <{addr_spec}>"


def build_modern(email: OutgoingEmail, now: datetime | None = None) -> bytes:
    message = EmailMessage(policy=POLICY)
    message["From"] = _old_format_from(email.sender, email.sender_display_name)
    message["To"] = _address(email.recipient)
    if email.reply_to is not None:
        message["Reply-To"] = _address(email.reply_to)
    message["Subject"] = strip_line_breaks(email.subject)
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=strip_line_breaks(email.sender.domain))
    message["MIME-Version"] = "1.0"
    message[TRACKING_HEADER] = tracking_header_value(email.group_id, email.email_id)
    if email.configuration_set:
        message[SES_CONFIGURATION_SET_HEADER] = strip_line_breaks(email.configuration_set)
    message.set_content(email.text, subtype="plain", charset="utf-8")
    message.add_alternative(email.html, subtype="html", charset="utf-8")
    return message.as_bytes(policy=POLICY)


# --- the legacy-API candidate ---

LEGACY = compat32.clone(linesep="\r\n")


def build_legacy(email: OutgoingEmail) -> bytes:
    message = MIMEMultipart("alternative")
    message["From"] = _old_format_from(email.sender, email.sender_display_name)
    message["To"] = _address(email.recipient).addr_spec
    # email.message accepts a Header at run time; typeshed says str.
    message["Subject"] = Header(strip_line_breaks(email.subject), "utf-8")  # type: ignore[assignment]
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=strip_line_breaks(email.sender.domain))
    message[TRACKING_HEADER] = tracking_header_value(email.group_id, email.email_id)
    message.attach(MIMEText(email.text, "plain", "utf-8"))
    message.attach(MIMEText(email.html, "html", "utf-8"))
    return message.as_bytes(policy=LEGACY)


# --- the requests ---


def mailbox(value: str) -> Mailbox:
    parsed = parse_mailbox(value)
    assert parsed is not None
    return parsed


TEXT = (
    "Hello Jane,\n\n"
    "Your LFX account was used to sign in from a new device. If this was you, there is\n"
    "nothing to do. If it was not, reset your password at once and review the devices\n"
    "signed in to your account.\n\n"
    * 5
    + "The Linux Foundation\n548 Market St PMB 57274, San Francisco, CA 94104\n"
)
HTML = (
    '<!doctype html><html><head><meta charset="utf-8"><title>LFX</title></head>'
    '<body style="margin:0;padding:0;font-family:Helvetica,Arial,sans-serif;color:#333">\n'
    + (
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0"><tr>'
        '<td style="padding:16px 24px;font-size:15px;line-height:22px">Your LFX account was '
        "used to sign in from a new device. If this was you, there is nothing to do.</td>"
        "</tr></table>\n"
    )
    * 5
    + "</body></html>\n"
)
TYPICAL = OutgoingEmail(
    email_id="0b7e3c1a-2f4d-4e5b-8c6d-7e8f9a0b1c2d",
    group_id="7d1f1c1e-4b51-4f0e-9b2e-61c7d5b0a9f3",
    sender=mailbox("noreply@lfx.linuxfoundation.org"),
    sender_display_name="LFX Self Serve",
    recipient=mailbox("jane.doe@example.com"),
    reply_to=None,
    subject="New sign-in to your LFX account",
    text=TEXT,
    html=HTML,
    configuration_set="lfx-engagement",
)
TYPICAL_UNICODE = replace(
    TYPICAL,
    sender_display_name="LFX Équipe Événements",
    subject="Nouvelle connexion à votre compte LFX — 新しいサインイン",
    text=TEXT.replace("Jane", "Zoë"),
    html=HTML.replace("Jane", "Zoë").replace("nothing to do", "nothing to do ✓"),
)


def ms_per_build(build: Builder, email: OutgoingEmail, budget: float = 0.4) -> float:
    """CPU time (the machine may be shared), best of three rounds, each as many
    builds as fit in a third of ``budget``."""
    start = time.process_time()
    build(email)
    once = time.process_time() - start
    n = max(1, int(budget / 3 / max(once, 1e-6)))
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(n):
            build(email)
        best = min(best, (time.process_time() - start) / n)
    return best * 1000


UNICODE_WORDS = "Grüße aus Köln, "
"""Spaces and non-ASCII: the costly case for header folding and encoding."""
ASCII_WORDS = "Your weekly LFX digest, "


def large(field: str, size: int, words: str = UNICODE_WORDS) -> OutgoingEmail:
    value = (words * (size // len(words) + 1))[:size]
    return replace(TYPICAL, **{field: value})  # type: ignore[arg-type]


def main() -> None:
    print(f"MIME build, ms per message (size: {len(build_message(TYPICAL))} octets on the wire)")
    print(f"{'request':<34}{'new':>9}{'modern':>10}{'ratio':>8}{'legacy':>10}{'ratio':>8}")
    typical = (("typical 2 KB, ASCII", TYPICAL), ("typical 2 KB, non-ASCII", TYPICAL_UNICODE))
    for label, email in typical:
        new = ms_per_build(build_message, email)
        modern = ms_per_build(build_modern, email)
        legacy = ms_per_build(build_legacy, email)
        print(
            f"{label:<34}{new:>9.3f}{modern:>10.3f}{modern / new:>7.1f}x"
            f"{legacy:>10.3f}{legacy / new:>7.1f}x"
        )

    print()
    print("Large inputs (one field this long, the rest typical), ms per message")
    print(f"{'request':<38}{'new':>9}{'modern':>10}{'ratio':>8}")
    # The modern builder is quadratic in header values: 900 KB took 31-33 s.
    modern_max = {"subject": 64 * 1024, "sender_display_name": 256 * 1024}
    cases = [
        ("subject", UNICODE_WORDS, "non-ASCII"),
        ("subject", ASCII_WORDS, "ASCII"),
        ("subject", "x", "no spaces"),
        ("sender_display_name", UNICODE_WORDS, "non-ASCII"),
        ("text", UNICODE_WORDS, "non-ASCII, one line"),
        ("html", ASCII_WORDS, "ASCII, one line"),
    ]
    for field, words, kind in cases:
        for size in (64 * 1024, 256 * 1024, 1024 * 1024):
            email = large(field, size, words)
            new = ms_per_build(build_message, email, budget=1.0)
            label = f"{field} {size // 1024} KiB, {kind}"
            if size <= modern_max.get(field, size) and words is UNICODE_WORDS:
                modern = ms_per_build(build_modern, email, budget=1.0)
                print(f"{label:<38}{new:>9.1f}{modern:>10.1f}{modern / new:>7.1f}x")
            else:
                print(f"{label:<38}{new:>9.1f}{'-':>10}")


if __name__ == "__main__":
    main()
