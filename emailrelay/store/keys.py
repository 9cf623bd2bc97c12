"""Which KV key holds which group.

JetStream KV keys allow only ``[-/_=.a-zA-Z0-9]`` and may not start or end
with ``.`` (nor hold an empty ``..`` token), but callers' group ids are free
text. A group id that is a valid key, and does not start with the reserved
prefix ``=``, is its own key, so data written by the replaced relay stays
readable. Every other id is stored under ``=`` plus the unpadded URL-safe
base64 of its UTF-8 bytes. No id of the first kind starts with ``=`` and the
encoding is injective, so two different ids never share a key.
"""

from __future__ import annotations

import base64
import re

_VALID_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
ENCODED_PREFIX = "="


def is_valid_key(key: str) -> bool:
    return bool(_VALID_KEY.match(key)) and not (
        key.startswith(".") or key.endswith(".") or ".." in key
    )


def group_key(group_id: str) -> str:
    if is_valid_key(group_id) and not group_id.startswith(ENCODED_PREFIX):
        return group_id
    encoded = base64.urlsafe_b64encode(group_id.encode("utf-8")).decode("ascii").rstrip("=")
    return ENCODED_PREFIX + encoded
