"""SES events as the relay receives them from SQS, for every test that needs one.

Events are built from AWS's documented examples (tests/data/ses-event-examples.json,
a copy of the shared examples file), with the relay's tracking header added;
:func:`sns_body` wraps one as SNS delivers it, ``json.dumps`` gives the raw form.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

EXAMPLES_PATH = Path(__file__).resolve().parents[1] / "data" / "ses-event-examples.json"
SES_EXAMPLES: dict[str, Any] = json.loads(EXAMPLES_PATH.read_text())

EMAIL_ID = "5b0c1a5e-7f0e-4a55-9f37-0c2a3c7f6d11"
GROUP_ID = "group-1"

EVENT_TYPES = [
    "Send",
    "Delivery",
    "Open",
    "Click",
    "Bounce",
    "Complaint",
    "Reject",
    "DeliveryDelay",
]


def ses_event(
    example: str, email_id: str = EMAIL_ID, header_name: str = "X-LFX-TRACKING-ID"
) -> dict[str, Any]:
    """The documented example with our tracking header added to mail.headers."""
    event: dict[str, Any] = copy.deepcopy(SES_EXAMPLES[example])
    headers = event["mail"].setdefault("headers", [])
    headers.append({"name": header_name, "value": f"{GROUP_ID}/{email_id}"})
    return event


def sns_body(event: dict[str, Any], sns_message_id: str | None = None) -> str:
    envelope = dict(SES_EXAMPLES["_sns_envelope_example"])
    envelope["MessageId"] = sns_message_id or str(uuid.uuid4())
    envelope["Message"] = json.dumps(event)
    return json.dumps(envelope)


def bounce(address: str, bounce_type: str = "Permanent") -> dict[str, Any]:
    """The documented Bounce example naming ``address`` (Permanent: suppresses)."""
    event: dict[str, Any] = copy.deepcopy(SES_EXAMPLES["Bounce"])
    event["bounce"]["bounceType"] = bounce_type
    event["bounce"]["bouncedRecipients"][0]["emailAddress"] = address
    return event


def complaint(address: str) -> dict[str, Any]:
    """The documented Complaint example naming ``address``."""
    event: dict[str, Any] = copy.deepcopy(SES_EXAMPLES["Complaint"])
    event["complaint"]["complainedRecipients"] = [{"emailAddress": address}]
    return event
