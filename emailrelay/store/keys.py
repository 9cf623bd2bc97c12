"""Which KV key holds which group, and which keys hold a large group's overflow pages.

JetStream KV keys allow only ``[-/_=.a-zA-Z0-9]`` and may not start or end
with ``.`` (nor hold an empty ``..`` token), but callers' group ids are free
text. The scheme (docs/contract.md, "JetStream KV") has three kinds of keys:

- a group id that is a valid key and does not start with the reserved ``=``
  is its own key, so data written by the replaced relay stays readable;
- every other group id is stored under ``=`` plus the unpadded URL-safe
  base64 of its UTF-8 bytes (``==`` plus the base64 SHA-256 of those bytes
  when that would make an unreasonably long key);
- overflow page ``n`` (n >= 1) of any group is ``=<base64 of the id>.<n>``
  (``==<sha256>.<n>`` for long ids).

Why nothing collides: keys of the first kind never start with ``=``; the
other two always do. Base64url (no padding) never contains ``=`` or ``.``, so
an encoded group key (``=`` + base64) and a hashed one (``==`` + base64) are
told apart by their second character, and a page key is the only kind with a
``.``. Within each kind the encoding is injective (the SHA-256 form is
collision-resistant, not injective: it only serves ids over 300 bytes).
"""

from __future__ import annotations

import base64
import hashlib
import re

_VALID_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
ENCODED_PREFIX = "="
HASHED_PREFIX = "=="
PAGE_SEPARATOR = "."

# Keys travel inside subjects on the NATS protocol line (4 KiB by default with
# everything else on it); ids longer than this many UTF-8 bytes are hashed.
_MAX_ENCODED_ID_BYTES = 300


def is_valid_key(key: str) -> bool:
    return bool(_VALID_KEY.match(key)) and not (
        key.startswith(".") or key.endswith(".") or ".." in key
    )


def group_key(group_id: str) -> str:
    """The key of the group's index head: the plain JSON array of its first ids."""
    if is_valid_key(group_id) and not group_id.startswith(ENCODED_PREFIX):
        return group_id
    return _encoded(group_id)


def index_page_key(group_id: str, page: int) -> str:
    """The key of overflow page ``page`` (1, 2, …) of the group's index."""
    if page < 1:
        raise ValueError("overflow pages are numbered from 1; page 0 is group_key()")
    return f"{_encoded(group_id)}{PAGE_SEPARATOR}{page}"


def _encoded(group_id: str) -> str:
    raw = group_id.encode("utf-8")
    if len(raw) > _MAX_ENCODED_ID_BYTES:
        return HASHED_PREFIX + _b64(hashlib.sha256(raw).digest())
    return ENCODED_PREFIX + _b64(raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
