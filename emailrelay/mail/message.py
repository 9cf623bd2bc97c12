"""MIME building: one validated send request in, the bytes that go over SMTP out.

Built with :class:`email.message.EmailMessage` under an SMTP policy, so no
request string is ever pasted into header text: the policy quotes display
names where RFC 5322 needs it, RFC 2047-encodes non-ASCII, and picks a body
transfer encoding (quoted-printable or base64) whenever a line is longer
than the policy allows or the text is not ASCII.

The one exception is :data:`~emailrelay.api.TRACKING_HEADER`: SES echoes raw
header values back in its events, so that header must stay on one line,
never folded and never encoded (see :func:`tracking_header_value`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, formataddr, make_msgid
from typing import Any

from emailrelay.addresses import Mailbox, strip_line_breaks
from emailrelay.api import SES_CONFIGURATION_SET_HEADER, TRACKING_HEADER

SMTP_MAX_LINE = 998
"""RFC 5321: a line is at most 998 characters plus CRLF."""


_RAW_HEADERS = frozenset({TRACKING_HEADER.lower(), "from"})
"""Headers whose value this module writes itself, stored and written as given."""


class _RelayPolicy(EmailPolicy):
    """``email.policy.SMTP`` that stores and writes a few headers exactly as
    this module formatted them (see :data:`_RAW_HEADERS`): the tracking header
    raw on one line, and ``From`` (see :func:`format_from`).

    The stdlib would re-parse them first, which decodes anything that looks
    like an RFC 2047 encoded word (a group id ``=?utf-8?q?x?=`` became ``x``),
    and then re-fold them."""

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


@dataclass(frozen=True)
class OutgoingEmail:
    """A send request that passed every check of the contract."""

    email_id: str
    group_id: str
    sender: Mailbox
    sender_display_name: str
    recipient: Mailbox
    reply_to: Mailbox | None
    subject: str
    text: str
    html: str
    configuration_set: str | None = None


def _percent_encode(value: str) -> str:
    out: list[str] = []
    for char in value:
        if char == "%" or not (" " <= char <= "~"):
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def tracking_header_value(group_id: str, email_id: str) -> str:
    """``<group_id>/<email_id>`` with the group percent-encoded where it is not
    printable ASCII (and ``%`` itself), shortened so that the whole header line
    fits in :data:`SMTP_MAX_LINE`. The email id after the last ``/`` is never
    cut: the engagement-event handler finds the record by it."""
    group = _percent_encode(strip_line_breaks(group_id))
    room = SMTP_MAX_LINE - len(f"{TRACKING_HEADER}: /{email_id}")
    if len(group) > room:
        group = group[:room]
        # Never leave half of a %XX escape at the cut.
        tail = group[-2:]
        if "%" in tail:
            group = group[: len(group) - 2 + tail.index("%")]
    return f"{group}/{email_id}"


def _address(mailbox: Mailbox, display_name: str = "") -> Address:
    return Address(
        display_name=strip_line_breaks(display_name),
        username=strip_line_breaks(mailbox.local_part),
        domain=strip_line_breaks(mailbox.domain),
    )


def format_from(mailbox: Mailbox, display_name: str) -> str:
    """The ``From`` value, display name included, formatted here on purpose.

    The stdlib's folder drops the quotes around a display name it has to fold,
    so a long caller-chosen name such as ``... <ceo@evil.example>, x`` became
    extra addresses in ``From``. Here a short printable ASCII name is a quoted
    string on one line; any other name is RFC 2047-encoded (encoded words
    carry no specials) and folded between encoded words."""
    addr_spec = _address(mailbox).addr_spec
    name = strip_line_breaks(display_name)
    if not name:
        return addr_spec
    quoted = formataddr((name, addr_spec))
    if name.isascii() and name.isprintable() and len(f"From: {quoted}") <= 78:
        return quoted
    # Header.encode folds between encoded words with CRLF + space itself.
    encoded = Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
    one_line = f"{encoded} <{addr_spec}>"
    if "\n" not in encoded and len(f"From: {one_line}") <= 78:
        return one_line
    return f"{encoded}\r\n <{addr_spec}>"


def build_message(email: OutgoingEmail, now: datetime | None = None) -> bytes:
    """The message as it goes on the wire (CRLF line ends, not dot-stuffed)."""
    message = EmailMessage(policy=POLICY)
    message["From"] = format_from(email.sender, email.sender_display_name)
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
