"""Email address rules of the contract: parsing, domain allowlists, redaction,
and the text clean-ups every caller value gets before it reaches a header."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.policy import default as _default_policy


@dataclass(frozen=True)
class Mailbox:
    """One parsed RFC 5322 mailbox: ``Name <local@domain>`` or ``local@domain``."""

    display_name: str
    local_part: str
    domain: str

    @property
    def address(self) -> str:
        """The bare address (``local@domain``) used on the envelope and in records."""
        return f"{self.local_part}@{self.domain}"


_HEADER_BREAKS = dict.fromkeys(map(ord, "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))
"""CR, LF, NUL and every other character ``str.splitlines()`` breaks on."""


def strip_line_breaks(value: str) -> str:
    """Remove every character that could end a header line.

    CR and LF never reach a header (the replaced relay stripped them too);
    NUL and the other ``str.splitlines()`` boundaries go with them, because
    the stdlib's email package splits on those and raises or folds where a
    caller's value should have stayed one line."""
    return value.translate(_HEADER_BREAKS)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(value: str) -> str:
    """Every lone surrogate (``"\\ud800"`` in JSON) as U+FFFD.

    Python's JSON decoder joins escaped surrogate pairs into one character, so
    any surrogate left in a decoded string is unpaired: no UTF-8 encoder takes
    it, and it would fail a send (or a record write) long after the request
    was read."""
    return _LONE_SURROGATE.sub("\ufffd", value)


MAX_LOCAL_PART = 64
"""RFC 5321 4.5.3.1.1: octets in a local part."""
MAX_ADDRESS = 254
"""RFC 5321 4.5.3.1.3: a path (``<local@domain>``) is at most 256 octets."""
MAX_MAILBOX_VALUE = 998
"""Characters in a whole mailbox value, display name included: the longest
line SMTP carries (RFC 5321 4.5.3.1.6). Longer values are refused before the
stdlib parser sees them: it is superlinear (64 KB took 3.2 s), and below this
bound it costs at most a few milliseconds."""


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})*")
"""A bare ``local@domain`` of dot-atoms, no display name, no comment: most
addresses callers send. The stdlib parser reads every such string as exactly
that mailbox (tests/test_addresses.py proves it), at ~80 us a call; this
takes about 1 us."""


def parse_mailbox(value: str) -> Mailbox | None:
    """Exactly one mailbox with a non-empty local part and domain, else ``None``.

    Lists, groups, non-ASCII addresses (display names may be anything),
    anything the stdlib parser flags as a defect, and anything longer than
    RFC 5321 allows (:data:`MAX_LOCAL_PART`, :data:`MAX_ADDRESS`) or than
    :data:`MAX_MAILBOX_VALUE` are refused. No DNS: ``localhost``,
    ``example.com`` and ``.test`` domains are fine.
    """
    if len(value) > MAX_MAILBOX_VALUE:
        return None
    if _PLAIN_ADDRESS.fullmatch(value):
        local_part, _, domain = value.partition("@")
        if len(local_part) > MAX_LOCAL_PART or len(value) > MAX_ADDRESS:
            return None
        return Mailbox("", local_part, domain)
    return _parse_with_stdlib(value)


def _parse_with_stdlib(value: str) -> Mailbox | None:
    try:
        header = _default_policy.header_factory("to", value)
    except Exception:
        # The stdlib parser raises (IndexError, HeaderParseError) on some
        # truncated inputs such as "a@"; all of them mean "not an address".
        return None
    if header.defects or len(header.addresses) != 1:
        return None
    if any(group.display_name is not None for group in header.groups):
        return None
    parsed = header.addresses[0]
    if not parsed.username or not parsed.domain:
        return None
    if not (parsed.username + parsed.domain).isascii():
        # RFC 5322 addresses are ASCII; a non-ASCII domain (an unencoded IDN)
        # would otherwise fail inside the SMTP client as an internal error.
        return None
    # Measured as written (addr_spec quotes a local part only where it must).
    wire_local_part = len(parsed.addr_spec) - len(parsed.domain) - 1
    if wire_local_part > MAX_LOCAL_PART or len(parsed.addr_spec) > MAX_ADDRESS:
        return None
    return Mailbox(parsed.display_name, parsed.username, parsed.domain)


def domain_is_listed(domain: str, allowed: Iterable[str]) -> bool:
    """Exact, case-insensitive membership (the From rule)."""
    domain = domain.lower()
    return any(domain == entry for entry in allowed)


def domain_is_within(domain: str, allowed: Iterable[str]) -> bool:
    """Equal to, or a subdomain of, an allowed domain on a label boundary
    (the Reply-To and recipient rule): ``mail.example.org`` is within
    ``example.org``; ``evilexample.org`` is not."""
    domain = domain.lower()
    return any(domain == entry or domain.endswith("." + entry) for entry in allowed)


_REDACTED_DOMAIN = 64


def redact(address: str) -> str:
    """``ab***@example.com``: enough to correlate, not enough to identify."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    if len(domain) > _REDACTED_DOMAIN:
        # Only unparseable values get here with a long "domain"; keep log lines short.
        domain = domain[:_REDACTED_DOMAIN] + "…"
    return f"{local[:2]}***@{domain}"


_ADDRESS_IN_TEXT = re.compile(r"[^\s<>()\[\]:;,\"']+@[^\s<>()\[\]:;,\"']+")


def redact_addresses_in(text: str) -> str:
    """``text`` with every address in it redacted: providers (SES among them)
    name the refused address in their replies, and failure reasons end up in
    logs, which never hold a full address."""
    return _ADDRESS_IN_TEXT.sub(lambda match: redact(match.group(0)), text)
