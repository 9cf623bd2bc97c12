"""MIME building: one validated send request in, the bytes that go over SMTP out.

A small writer of its own, not :class:`email.message.EmailMessage`: the
modern policy re-parses every header it is given (about half of the relay's
CPU per send), is quadratic on long values, loses a space when it folds a long
non-ASCII subject, raises on Python's line-break characters, and lets text
that merely looks like an RFC 2047 encoded word arrive decoded. Everything
here is a few linear string operations, and each rule below is proven by
round-trip property tests against the stdlib's modern parser
(``tests/test_message_properties.py``).

Headers (every caller value passes :func:`strip_line_breaks` first, so no
value can end a header line):

- ``Subject``: printable ASCII that holds no ``=?``, neither starts nor ends
  with a space and folds at its spaces into lines of at most 78 is written as
  typed; anything else becomes RFC 2047
  encoded words (UTF-8, Q or B, whichever is shorter) with every character
  inside a word, spaces included, so no decoder has whitespace between words to
  keep or drop (that is where the stdlib's folder loses a space).
- ``From``: see :func:`format_from`. ``To`` and ``Reply-To``: the bare address.
- :data:`~emailrelay.api.TRACKING_HEADER`: raw on one line, never folded and
  never encoded (see :func:`tracking_header_value`); SES echoes raw values.

Bodies: line breaks (CR, LF or CRLF) are written CRLF, the canonical form of
text (RFC 2046); nothing else changes and no final line break is added. A part
is ``7bit`` when it is printable ASCII (and tabs) in lines of at most 998
octets, else quoted-printable or base64, whichever is shorter; both keep SMTP
lines short whatever the caller's line lengths. Nothing is dot-stuffed: the
SMTP client does that.
"""

from __future__ import annotations

import binascii
import re
import secrets
from base64 import b64encode
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.utils import format_datetime, make_msgid

from emailrelay.addresses import Mailbox, strip_line_breaks
from emailrelay.api import SES_CONFIGURATION_SET_HEADER, TRACKING_HEADER

SMTP_MAX_LINE = 998
"""RFC 5321: a line is at most 998 characters plus CRLF."""

FOLD_AT = 78
"""RFC 5322's recommended line length, which folded headers keep to."""

_EW_MAX = 75
"""RFC 2047: an encoded word is at most 75 characters long."""

_EW_OVERHEAD = len("=?utf-8?q??=")

_Q_LITERAL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/"
"""Bytes a Q encoded word may carry as themselves anywhere, phrases included
(RFC 2047 section 5 (3)); everything else is ``=XX``, space is ``_``."""

_Q_TABLE = tuple(
    chr(byte) if byte in _Q_LITERAL else "_" if byte == 0x20 else f"={byte:02X}"
    for byte in range(256)
)
_Q_ONE_CHAR = _Q_LITERAL + b" "

_QP_LITERAL = bytes(range(0x20, 0x7F)).replace(b"=", b"") + b"\t\n"
"""Bytes quoted-printable writes as themselves (near enough to size it)."""

_NOT_7BIT = re.compile(r"[^\t\n\x20-\x7e]")

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_ATOMS = re.compile(f"{_ATEXT}(?: {_ATEXT})*")
"""A display name that RFC 5322 lets stand unquoted: atoms, single spaces."""

_RAW_WORD = re.compile(r" *[^ ]+")


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
            out.extend(f"%{byte:02X}" for byte in _utf8(char))
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


def _utf8(value: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        # A lone surrogate (the request parser replaces them; this is the
        # backstop) becomes U+FFFD rather than an internal error.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _q_words(data: bytes, first: int) -> list[str]:
    text = "".join(map(_Q_TABLE.__getitem__, data))
    words: list[str] = []
    start, room = 0, first - _EW_OVERHEAD
    while start < len(text):
        end = start + room
        if end < len(text):
            # Never cut inside an =XX escape...
            if text[end - 1] == "=":
                end -= 1
            elif text[end - 2] == "=":
                end -= 2
            # ...nor between the bytes of one character (=80..=BF continue one).
            while text[end] == "=" and text[end + 1] in "89AB":
                end -= 3
        words.append(f"=?utf-8?q?{text[start:end]}?=")
        start, room = end, _EW_MAX - _EW_OVERHEAD
    return words


def _b_words(data: bytes, first: int) -> list[str]:
    words: list[str] = []
    start, room = 0, first - _EW_OVERHEAD
    while start < len(data):
        end = start + room // 4 * 3
        if end < len(data):
            while data[end] & 0xC0 == 0x80:  # a continuation byte: back to the character
                end -= 1
        words.append(f"=?utf-8?b?{b64encode(data[start:end]).decode('ascii')}?=")
        start, room = end, _EW_MAX - _EW_OVERHEAD
    return words


def encoded_words(value: str, first: int = _EW_MAX) -> list[str]:
    """``value`` as RFC 2047 encoded words in UTF-8, each holding whole
    characters, the first at most ``first`` characters long (what is left of
    the header's first line) and the others at most 75. Q when it is no longer
    than B, so mostly-ASCII text stays readable."""
    data = _utf8(value)
    escaped = len(data.translate(None, _Q_ONE_CHAR))
    if len(data) + 2 * escaped <= (len(data) + 2) // 3 * 4:
        return _q_words(data, first)
    return _b_words(data, first)


def _fold_at_spaces(line: str, limit: int) -> str | None:
    """``line`` (which does not end in a space) folded before spaces into
    lines of at most ``limit``, or ``None`` when some word does not fit.
    Unfolding (removing the CRLFs) gives back ``line``; no line is white
    space only, none ends in white space."""
    if len(line) <= limit:
        return line
    words = _RAW_WORD.findall(line)
    lines: list[str] = []
    # The field name and the first word share the first line: a fold right
    # after the colon would read back as a leading space.
    current = "".join(words[:2])
    for word in words[2:]:
        if len(current) > limit or len(word) > limit:
            return None
        if len(current) + len(word) <= limit:
            current += word
        else:
            lines.append(current)
            current = word
    if len(current) > limit:
        return None
    lines.append(current)
    return "\r\n".join(lines)


def unstructured_header(name: str, value: str, limit: int = FOLD_AT) -> str:
    """``Name: value`` (folded, no final CRLF) for an unstructured header such
    as ``Subject``: as typed when that is safe and folds into lines of at most
    ``limit``, else encoded words on lines of at most 78."""
    value = strip_line_breaks(value)
    if not value:
        return f"{name}:"
    # A leading space would be read as the separator after the colon, and
    # trailing white space on a line is something relays strip.
    plain = value[0] != " " and value[-1] != " " and "=?" not in value
    if plain and value.isascii() and value.isprintable():
        folded = _fold_at_spaces(f"{name}: {value}", limit)
        if folded is not None:
            return folded
    words = encoded_words(value, min(_EW_MAX, FOLD_AT - len(name) - 2))
    return f"{name}: " + "\r\n ".join(words)


def _addr_spec(mailbox: Mailbox) -> str:
    # Address quotes a local part that needs it (parse_mailbox made both ASCII).
    return Address(
        username=strip_line_breaks(mailbox.local_part),
        domain=strip_line_breaks(mailbox.domain),
    ).addr_spec


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_from(mailbox: Mailbox, display_name: str) -> str:
    """The ``From`` value, display name included, formatted here on purpose.

    The stdlib's folder drops the quotes around a display name it has to fold,
    so a long caller-chosen name such as ``... <ceo@evil.example>, x`` became
    extra addresses in ``From``. Here a printable ASCII name (no ``=?``, which
    parsers decode even inside quotes) that fits on the first line stays
    readable: bare atoms when RFC 5322 allows, else a quoted string. Any other
    name is RFC 2047 encoded words, which carry no specials and so can never
    add an address, folded between the words."""
    addr_spec = _addr_spec(mailbox)
    name = strip_line_breaks(display_name)
    if not name:
        return addr_spec
    plain = name.isascii() and name.replace("\t", " ").isprintable() and "=?" not in name
    if plain and len(name) < FOLD_AT:
        phrase = name if _ATOMS.fullmatch(name) else _quoted(name)
        one_line = f"{phrase} <{addr_spec}>"
        if len(f"From: {one_line}") <= FOLD_AT:
            return one_line
    words = encoded_words(name, FOLD_AT - len("From: "))
    last_line = len(words[-1]) + (len("From: ") if len(words) == 1 else 1)
    separator = " " if last_line + len(addr_spec) + 3 <= FOLD_AT else "\r\n "
    return "\r\n ".join(words) + f"{separator}<{addr_spec}>"


def _encode_body(content: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, payload with CRLF line ends)."""
    text = content.replace("\r\n", "\n").replace("\r", "\n")
    if not _NOT_7BIT.search(text) and max(map(len, text.split("\n"))) <= SMTP_MAX_LINE:
        return "7bit", text.replace("\n", "\r\n").encode("ascii")
    data = _utf8(text)
    escaped = len(data.translate(None, _QP_LITERAL))
    if 3 * (len(data) + 2 * escaped) <= 4 * len(data):
        # b2a_qp keeps "\n" as the hard line break and soft-breaks at 76.
        return "quoted-printable", binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
    encoded = b64encode(data.replace(b"\n", b"\r\n"))
    return "base64", b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _boundary(seven_bit_bodies: list[bytes]) -> bytes:
    # "=_" never occurs in quoted-printable or base64; a 7bit body could hold
    # anything, so check those (128 random bits: the loop never turns).
    while True:
        boundary = b"=_" + secrets.token_hex(16).encode("ascii")
        if not any(boundary in body for body in seven_bit_bodies):
            return boundary


def build_message(email: OutgoingEmail, now: datetime | None = None) -> bytes:
    """The message as it goes on the wire (CRLF line ends, not dot-stuffed)."""
    headers = [
        "From: " + format_from(email.sender, email.sender_display_name),
        "To: " + _addr_spec(email.recipient),
    ]
    if email.reply_to is not None:
        headers.append("Reply-To: " + _addr_spec(email.reply_to))
    headers += [
        unstructured_header("Subject", email.subject),
        "Date: " + format_datetime(now or datetime.now(UTC)),
        "Message-ID: " + make_msgid(domain=strip_line_breaks(email.sender.domain)),
        "MIME-Version: 1.0",
        f"{TRACKING_HEADER}: {tracking_header_value(email.group_id, email.email_id)}",
    ]
    if email.configuration_set:
        # Raw up to the SMTP line limit: SES matches the set name as written.
        headers.append(
            unstructured_header(
                SES_CONFIGURATION_SET_HEADER, email.configuration_set, SMTP_MAX_LINE
            )
        )
    parts = [("plain", *_encode_body(email.text)), ("html", *_encode_body(email.html))]
    boundary = _boundary([body for _, cte, body in parts if cte == "7bit"])
    headers.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary.decode()}"')

    out = ["\r\n".join(headers).encode("ascii"), b"\r\n"]
    for subtype, cte, body in parts:
        out += [
            b"\r\n--" + boundary,
            f'\r\nContent-Type: text/{subtype}; charset="utf-8"'.encode("ascii"),
            f"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii"),
            body,
        ]
    out += [b"\r\n--", boundary, b"--\r\n"]
    return b"".join(out)
