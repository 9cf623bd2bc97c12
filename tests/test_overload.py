"""Overload is not a store failure: with the send backlog full, reads (status,
analytics) keep their own budget (MAX_READS_IN_FLIGHT) and answer; a read
beyond that budget answers ``overloaded`` (503), counted per subject.

End to end against nats-server, aiosmtpd and a relay subprocess, with the
settings of issue 15 (MAX_IN_FLIGHT=4, MAX_BACKLOG=4, 1 s SMTP latency). The
same rules, without servers, are in tests/test_read_budget.py."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nats.errors

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats, encode_payload
from tests.support.send_requests import send_request
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

PAUSED = "emailrelay_request_intake_paused"
NO_RESPONDERS = "no responders"


def ask_all(
    nats_client: SyncNats, requests: list[tuple[str, Any]], timeout: float = 30.0
) -> list[tuple[Any, dict[str, str]]]:
    """Send every ``(subject, payload)`` at once; each reply's JSON body and
    headers, or ``NO_RESPONDERS``, in request order."""

    async def one(subject: str, payload: Any) -> tuple[Any, dict[str, str]]:
        try:
            msg = await nats_client.nc.request(subject, encode_payload(payload), timeout=timeout)
        except nats.errors.NoRespondersError:
            return NO_RESPONDERS, {}
        return json.loads(msg.data), dict(msg.headers or {})

    async def go() -> list[tuple[Any, dict[str, str]]]:
        return await asyncio.gather(*(one(s, p) for s, p in requests))

    return nats_client.run(go(), timeout=timeout + 10)


def outcome(reply: Any) -> str:
    """``sent``, ``no responders`` or the error string of a send's reply."""
    if isinstance(reply, str):
        return reply
    return str(reply["error"]) if "error" in reply else "sent"


def test_reads_answer_with_the_record_while_the_send_backlog_is_full(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay = relay_factory({"MAX_IN_FLIGHT": "4", "MAX_BACKLOG": "4"})
    sent = nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request())
    smtp.latency = 1.0
    reads = [
        (api.GET_EMAIL_STATUS_SUBJECT, {"email_id": sent["email_id"]}),
        (api.GET_EMAIL_STATUS_SUBJECT, {"group_id": sent["group_id"]}),
        (api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {"group_id": sent["group_id"]}),
    ] * 10
    with ThreadPoolExecutor(max_workers=1) as pool:
        burst = pool.submit(ask_all, nats_client, [(api.SEND_EMAIL_SUBJECT, send_request())] * 100)
        wait_until(lambda: relay.metric(PAUSED) == 1, message="send intake not paused")
        read_replies = [body for body, _ in ask_all(nats_client, reads)]
        assert not burst.done(), "the reads must have been answered during the burst"
        send_replies = [body for body, _ in burst.result(timeout=60)]

    records = [r for r in read_replies if isinstance(r, dict) and r.get("email_id")]
    assert records, read_replies
    assert all(r["email_id"] == sent["email_id"] for r in records)
    assert NO_RESPONDERS not in read_replies
    # 30 at once against a budget of 16: some may be shed, none fails.
    read_errors = {r["error"] for r in read_replies if isinstance(r, dict) and "error" in r}
    assert read_errors <= {api.ERR_OVERLOADED}, read_errors
    outcomes = {outcome(r) for r in send_replies}
    assert outcomes <= {"sent", NO_RESPONDERS, api.ERR_DELIVERY_FAILED}, outcomes
    assert "sent" in outcomes


def test_a_read_beyond_its_budget_answers_overloaded_with_code_503_and_is_counted(
    relay_factory: RelayFactory, nats_client: SyncNats
) -> None:
    relay = relay_factory({"MAX_READS_IN_FLIGHT": "1"})
    sent = nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request())
    replies = ask_all(
        nats_client, [(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": sent["email_id"]})] * 200
    )

    overloaded = [headers for body, headers in replies if body == {"error": api.ERR_OVERLOADED}]
    answered = [body for body, _ in replies if body != {"error": api.ERR_OVERLOADED}]
    assert overloaded, "200 reads at once within a budget of 1: some must be shed"
    assert all(h["Nats-Service-Error-Code"] == "503" for h in overloaded)
    assert all(body["email_id"] == sent["email_id"] for body in answered)
    shed = relay.metric("emailrelay_requests_shed_total", subject=api.GET_EMAIL_STATUS_SUBJECT)
    assert shed == len(overloaded)
