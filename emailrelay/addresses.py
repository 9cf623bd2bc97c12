"""Email address rules of the contract: parsing, domain allowlists, redaction."""

from __future__ import annotations

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


def parse_mailbox(value: str) -> Mailbox | None:
    """Exactly one mailbox with a non-empty local part and domain, else ``None``.

    Lists, groups, non-ASCII addresses (display names may be anything) and
    anything the stdlib parser flags as a defect are refused.
    No DNS: ``localhost``, ``example.com`` and ``.test`` domains are fine.
    """
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


def redact(address: str) -> str:
    """``ab***@example.com``: enough to correlate, not enough to identify."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:2]}***@{domain}"
