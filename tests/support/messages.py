"""An example outgoing email and readers of a built message's raw bytes, for
the MIME tests (test_message, test_message_properties).

``tracking_lines`` matches the header name exactly as the relay writes it: those
tests assert the bytes on the wire. To read the ids from what an SMTP server
received, use :meth:`tests.support.servers.smtp.ReceivedMessage.tracking`.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from emailrelay.addresses import Mailbox, parse_mailbox
from emailrelay.mail.message import OutgoingEmail

EMAIL_ID = "0b7e3c1a-2f4d-4e5b-8c6d-7e8f9a0b1c2d"


def mailbox(value: str) -> Mailbox:
    parsed = parse_mailbox(value)
    assert parsed is not None
    return parsed


BASE = OutgoingEmail(
    email_id=EMAIL_ID,
    group_id="group-1",
    sender=mailbox("noreply@lfx.linuxfoundation.org"),
    sender_display_name="LFX Self Serve",
    recipient=mailbox("jane@example.com"),
    reply_to=None,
    subject="Hello",
    text="plain body\n",
    html="<p>html body</p>\n",
)


def header_lines(raw: bytes) -> list[bytes]:
    head, _, _ = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def tracking_lines(raw: bytes) -> list[bytes]:
    return [line for line in header_lines(raw) if line.startswith(b"X-LFX-TRACKING-ID:")]
