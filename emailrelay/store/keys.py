"""Which KV key holds which group, and which keys hold a large group's overflow pages.

JetStream KV keys allow only ``[-/_=.a-zA-Z0-9]`` and may not start or end
with ``.`` (nor hold an empty ``..`` token), but callers' group ids are free
text. A key also travels inside a NATS subject (the direct get of a key is a
request to ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``), and
nats-server closes a connection whose protocol line passes its control-line
limit (4 KiB by default). So a usable key is also at most
:data:`MAX_KEY_LENGTH` characters: the longest subject any key makes is then
:data:`MAX_SUBJECT_LENGTH` (1 KiB). The scheme (docs/contract.md, "JetStream
KV") has three kinds of keys:

- a group id that is a usable key (the rules above, length included) and does
  not start with the reserved ``=`` is its own key, so data written by the
  replaced relay stays readable (no id it could store is longer than 942
  characters: see docs/contract.md);
- every other group id is stored under ``=`` plus the unpadded URL-safe
  base64 of its UTF-8 bytes (``==`` plus the base64 SHA-256 of those bytes
  when that would make an unreasonably long key: over 300 bytes);
- overflow page ``n`` (n >= 0) of any group is ``=<base64 of the id>.<n>``
  (``==<sha256>.<n>`` for long ids), and the group's page range, once it has
  overflowed its head, is ``=<base64 of the id>.range`` (emailrelay.store.index).

Why nothing collides: keys of the first kind never start with ``=``; the
other two always do. Base64url (no padding) never contains ``=`` or ``.``, so
an encoded group key (``=`` + base64) and a hashed one (``==`` + base64) are
told apart by their second character, and page and range keys are the only
kinds with a ``.``: a page key ends in digits after it, a range key in
``range``. Within each kind the encoding is injective (the SHA-256 form is
collision-resistant, not injective: it only serves ids over 300 bytes, and
ids too long to be their own key). Every key of the last two kinds is at most
``1 + 400 + 1 + digits`` characters, far below :data:`MAX_KEY_LENGTH`.
"""

from __future__ import annotations

import base64
import hashlib
import re

from emailrelay.api import GROUP_INDEX_BUCKET, RECIPIENTS_BUCKET

_VALID_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
ENCODED_PREFIX = "="
HASHED_PREFIX = "=="
PAGE_SEPARATOR = "."

MAX_SUBJECT_LENGTH = 1024
"""The longest subject a key may make (keys are ASCII: characters = bytes)."""

MAX_KEY_LENGTH = MAX_SUBJECT_LENGTH - max(
    len(f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.")
    for bucket in (RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET)
)
"""962: the longest usable key. Longer ids are hashed (groups) or cannot exist
(emails): checked before any I/O, so no caller's string reaches the protocol line."""

# Ids longer than this many UTF-8 bytes are hashed rather than base64-encoded.
_MAX_ENCODED_ID_BYTES = 300


def is_valid_key(key: str) -> bool:
    """A key JetStream accepts that also fits in a subject (:data:`MAX_KEY_LENGTH`).

    The length is checked first, so a megabyte of input costs nothing."""
    return (
        0 < len(key) <= MAX_KEY_LENGTH
        and bool(_VALID_KEY.match(key))
        and not (key.startswith(".") or key.endswith(".") or ".." in key)
    )


def group_key(group_id: str) -> str:
    """The key of the group's index head: the plain JSON array of its first ids."""
    if is_valid_key(group_id) and not group_id.startswith(ENCODED_PREFIX):
        return group_id
    return _encoded(group_id)


def index_page_key(group_id: str, page: int) -> str:
    """The key of overflow page ``page`` (1, 2, …) of the group's index; page
    0 is where an erasure moves the head of a group that has overflowed."""
    if page < 0:
        raise ValueError("overflow pages are numbered from 0")
    return f"{_encoded(group_id)}{PAGE_SEPARATOR}{page}"


def index_range_key(group_id: str) -> str:
    """The key naming the first and last overflow page of the group's index."""
    return f"{_encoded(group_id)}{PAGE_SEPARATOR}range"


def _encoded(group_id: str) -> str:
    # surrogatepass: a lone surrogate still maps to bytes of its own.
    raw = group_id.encode("utf-8", "surrogatepass")
    if len(raw) > _MAX_ENCODED_ID_BYTES:
        return HASHED_PREFIX + _b64(hashlib.sha256(raw).digest())
    return ENCODED_PREFIX + _b64(raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
