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
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, make_msgid
from typing import Any

from emailrelay.addresses import Mailbox, strip_line_breaks
from emailrelay.api import SES_CONFIGURATION_SET_HEADER, TRACKING_HEADER

SMTP_MAX_LINE = 998
"""RFC 5321: a line is at most 998 characters plus CRLF."""


class _RelayPolicy(EmailPolicy):
    """``email.policy.SMTP`` that writes the tracking header raw, on one line."""

    def fold(self, name: str, value: Any) -> str:
        if name.lower() == TRACKING_HEADER.lower():
            return f"{name}: {value}{self.linesep}"
        folded: str = super().fold(name, value)
        return folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        if name.lower() == TRACKING_HEADER.lower():
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


def build_message(email: OutgoingEmail, now: datetime | None = None) -> bytes:
    """The message as it goes on the wire (CRLF line ends, not dot-stuffed)."""
    message = EmailMessage(policy=POLICY)
    message["From"] = _address(email.sender, email.sender_display_name)
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
