"""The inbox's view of the capture directory: one :class:`Captured` per ``.eml``.

The files are the inbox (see :mod:`emailrelay.dev.capture`): nothing is copied
elsewhere, so a restarted stack shows the same emails, and a file removed by
anyone (an erasure, ``DELETE /api/v1/messages``, ``rm``) leaves the list at the
next read. A file may vanish between listing the directory and reading it:
that email is simply not there any more, never an error.

Captured files never change once renamed into place, so each one is parsed once
and its summary kept by name.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path

from emailrelay.api import TRACKING_HEADER

_ID = re.compile(r"^[A-Za-z0-9.-]{1,160}$")
"""What a message id in a URL may be (an email id, or a file stem for a message
the relay did not send): no slash, so it never names a path outside the directory."""

_STAMP = "%Y%m%dT%H%M%S.%fZ"


@dataclass(frozen=True)
class Captured:
    """What the list shows of one captured file, read from its headers."""

    email_id: str
    """The email id from the tracking header; the file stem when there is none."""
    group_id: str
    to: str
    """The bare recipient address (the first, if the header names several)."""
    subject: str
    captured_at: datetime
    path: Path
    tracked: bool

    def matches(self, query: str) -> bool:
        """Case-insensitive substring of recipient, subject or group."""
        needle = query.casefold()
        return any(needle in field.casefold() for field in (self.to, self.subject, self.group_id))


@dataclass(frozen=True)
class Contents:
    """One message opened: its decoded parts and its headers in order."""

    html: str
    text: str
    headers: list[tuple[str, str]]
    from_header: str
    to_header: str
    date: str


class Mailbox:
    """The ``.eml`` files of one capture directory, newest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._known: dict[str, Captured] = {}

    def messages(self) -> list[Captured]:
        """Every captured message, newest first (file names start with the
        capture time, then a sequence number, so the name order is the time order)."""
        try:
            names = sorted(
                (entry.name for entry in self.directory.iterdir() if entry.name.endswith(".eml")),
                reverse=True,
            )
        except FileNotFoundError:
            names = []
        self._known = {name: self._known[name] for name in names if name in self._known}
        found = []
        for name in names:
            captured = self._known.get(name) or self._read(name)
            if captured is not None:
                self._known[name] = captured
                found.append(captured)
        return found

    def find(self, email_id: str) -> Captured | None:
        """The message with that id (the newest, should one have been captured twice)."""
        if not _ID.match(email_id):
            return None
        return next((m for m in self.messages() if m.email_id == email_id), None)

    def clear(self) -> int:
        """Delete every captured file; how many went."""
        deleted = 0
        for message in self.messages():
            try:
                message.path.unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        self._known.clear()
        return deleted

    def _read(self, name: str) -> Captured | None:
        path = self.directory / name
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        message = _parse(raw)
        tracking = str(message.get(TRACKING_HEADER, "") or "").strip()
        group_id, _, email_id = tracking.rpartition("/")
        tracked = bool(email_id) and _ID.match(email_id) is not None
        stem = name.removesuffix(".eml")
        return Captured(
            email_id=email_id if tracked else stem,
            group_id=group_id if tracked else "",
            to=bare_recipient(str(message.get("To", "") or "")),
            subject=_header(message, "Subject"),
            captured_at=_captured_at(stem, path),
            path=path,
            tracked=tracked,
        )


def read_contents(raw: bytes) -> Contents:
    """The decoded HTML and text parts (empty when absent) and the headers."""
    message = _parse(raw)
    return Contents(
        html=_part(message, "html"),
        text=_part(message, "plain"),
        headers=[(name, _safe_str(value)) for name, value in message.items()],
        from_header=_header(message, "From"),
        to_header=_header(message, "To"),
        date=_header(message, "Date"),
    )


def bare_recipient(to_header: str) -> str:
    addresses = [address for _, address in getaddresses([to_header]) if address]
    return addresses[0] if addresses else to_header.strip()


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)  # the default policy's message class
    return message


def _part(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_subtype() != subtype:
        return ""
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown charset, a broken encoding
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else ""


def _header(message: EmailMessage, name: str) -> str:
    return _safe_str(message.get(name, ""))


def _safe_str(value: object) -> str:
    """A header as text; a header the policy cannot decode is shown as it is."""
    try:
        return str(value or "")
    except (LookupError, ValueError):
        return repr(value)


def _captured_at(stem: str, path: Path) -> datetime:
    try:
        return datetime.strptime(stem.split("-", 1)[0], _STAMP).replace(tzinfo=UTC)
    except ValueError:
        try:
            return datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            return datetime.now(UTC)
