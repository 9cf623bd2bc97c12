"""The dev inbox's JSON API, against a real ``emailrelay dev`` stack.

Emails go in through the relay (a NATS send request), are captured by the
stack's SMTP server, and come out of ``/api/v1/messages``. Each test sends its
own emails and finds them by a token of its own, so tests share one stack
without depending on one another (clearing the inbox included).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emailrelay import api
from emailrelay.dev.inbox.app import EMAIL_CSP
from emailrelay.dev.inbox.mailbox import Mailbox
from tests.inbox.helpers import send
from tests.support.nats_client import SyncNats
from tests.support.servers.dev import DevStack
from tests.support.servers.relay import RelayProcess
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def inbox(stack: DevStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.inbox_url, timeout=10) as client:
        yield client


def listed(inbox: httpx.Client, **params: Any) -> dict[str, Any]:
    response = inbox.get("/api/v1/messages", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_listed(inbox: httpx.Client, query: str, count: int) -> list[dict[str, Any]]:
    """The list for ``query`` once it holds ``count`` emails."""
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        found[:] = listed(inbox, query=query)["messages"]
        return len(found) == count

    wait_until(arrived, message=f"{count} email(s) matching {query!r} never listed")
    return found


def token() -> str:
    return uuid.uuid4().hex[:12]


def arrived(relay: SyncNats, inbox: httpx.Client, **fields: Any) -> tuple[str, str]:
    """A token and the id of an email sent with it in the subject (and ``fields``),
    once the inbox lists it."""
    tag = token()
    email_id = send(relay, **{"subject": tag, **fields}).email_id
    wait_listed(inbox, tag, 1)
    return tag, email_id


def test_list_is_newest_first(relay: SyncNats, inbox: httpx.Client) -> None:
    tag = token()
    sent = [send(relay, subject=f"{tag} number {n}").email_id for n in range(3)]
    found = wait_listed(inbox, tag, 3)
    assert [m["email_id"] for m in found] == list(reversed(sent))


def test_list_entry_has_recipient_subject_group_time_and_tracking(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    tag = token()
    reply = send(relay, to=f"Jane Doe <jane-{tag}@example.com>", subject=f"Hello {tag}")
    [entry] = wait_listed(inbox, tag, 1)
    assert entry["email_id"] == reply.email_id
    assert entry["to"] == f"jane-{tag}@example.com"  # the bare recipient
    assert entry["subject"] == f"Hello {tag}"
    assert entry["group_id"] == reply.group_id
    assert entry["captured_at"].endswith("Z")
    assert "state" in entry["tracking"]


def test_query_matches_recipient_subject_and_group_ignoring_case(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    tag = token()
    by_recipient = send(relay, to=f"r-{tag}@example.com").email_id
    by_subject = send(relay, subject=f"s-{tag}").email_id
    by_group = send(relay, group_id=f"g-{tag}").email_id
    wait_listed(inbox, tag, 3)
    for query, email_id in (
        (f"R-{tag}", by_recipient),
        (f"S-{tag}", by_subject),
        (f"G-{tag}", by_group),
    ):
        assert [m["email_id"] for m in listed(inbox, query=query.upper())["messages"]] == [email_id]


def test_limit_and_offset_page_the_list_and_total_counts_every_match(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    tag = token()
    sent = [send(relay, subject=f"{tag} {n}").email_id for n in range(3)]
    wait_listed(inbox, tag, 3)
    first = listed(inbox, query=tag, limit=2)
    second = listed(inbox, query=tag, limit=2, offset=2)
    assert (first["total"], second["total"]) == (3, 3)
    assert [m["email_id"] for m in first["messages"] + second["messages"]] == sent[::-1]


def test_one_message_has_decoded_html_text_and_headers(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    tag = token()
    email_id = send(
        relay, subject=f"Grüße {tag}", html=f"<p>Grüße {tag}</p>", text=f"Grüße {tag}"
    ).email_id
    wait_listed(inbox, tag, 1)
    body = inbox.get(f"/api/v1/messages/{email_id}").json()
    assert body["subject"] == f"Grüße {tag}"
    assert body["html"].strip() == f"<p>Grüße {tag}</p>"
    assert body["text"].strip() == f"Grüße {tag}"
    headers = {name: value for name, value in body["headers"]}
    assert headers[api.TRACKING_HEADER].endswith(f"/{email_id}")
    assert headers["Subject"] == f"Grüße {tag}"


def test_raw_is_the_captured_file_byte_for_byte(
    relay: SyncNats, inbox: httpx.Client, stack: DevStack
) -> None:
    _, email_id = arrived(relay, inbox)
    response = inbox.get(f"/api/v1/messages/{email_id}/raw")
    [captured] = (stack.state_dir / "capture").glob(f"*-{email_id}.eml")
    assert response.status_code == 200
    assert response.headers["content-type"] == "message/rfc822"
    assert response.content == captured.read_bytes()


def test_event_is_accepted_with_202_and_then_moves_the_record(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    _, email_id = arrived(relay, inbox)
    response = inbox.post(f"/api/v1/messages/{email_id}/events", json={"type": "click"})
    assert response.status_code == 202, response.text

    def clicked() -> bool:
        tracking = inbox.get(f"/api/v1/messages/{email_id}").json()["tracking"]
        return tracking.get("click_count") == 1

    wait_until(clicked, message="the click never reached the record")


def test_event_fired_from_the_inbox_shows_in_the_relays_status(
    relay: SyncNats, inbox: httpx.Client, stack: DevStack
) -> None:
    _, email_id = arrived(relay, inbox)
    assert inbox.post(f"/api/v1/messages/{email_id}/events", json={"type": "bounce"}).is_success

    def bounced() -> bool:
        reply = relay.request(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": email_id})
        return json.loads(reply).get("bounce_type") == "Permanent"

    wait_until(bounced, message=f"no bounce in the relay's status\n{stack.logs()}")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/messages/{id}"),
        ("GET", "/api/v1/messages/{id}/raw"),
        ("POST", "/api/v1/messages/{id}/events"),
    ],
)
def test_unknown_email_id_is_a_json_404(inbox: httpx.Client, method: str, path: str) -> None:
    unknown = str(uuid.uuid4())
    response = inbox.request(method, path.format(id=unknown), json={"type": "open"})
    assert response.status_code == 404
    assert unknown in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "not JSON"),
        (b'{"type": "delivery"}', "type must be one of open, click, bounce, complaint"),
        (b'["open"]', "type must be one of"),
        (b'{"type": ["open"]}', "type must be one of"),
    ],
)
def test_event_body_that_is_not_json_or_names_another_type_is_a_json_400(
    relay: SyncNats, inbox: httpx.Client, body: bytes, error: str
) -> None:
    _, email_id = arrived(relay, inbox)
    response = inbox.post(f"/api/v1/messages/{email_id}/events", content=body)
    assert response.status_code == 400
    assert error in response.json()["error"]


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "many"}, {"offset": "-1"}])
def test_bad_limit_or_offset_is_a_json_400(inbox: httpx.Client, params: dict[str, str]) -> None:
    response = inbox.get("/api/v1/messages", params=params)
    assert response.status_code == 400
    assert next(iter(params)) in response.json()["error"]


def test_email_whose_file_was_erased_leaves_the_list(
    relay: SyncNats, inbox: httpx.Client, stack: DevStack
) -> None:
    tag = token()
    kept, erased = (send(relay, subject=f"{tag} {n}").email_id for n in range(2))
    wait_listed(inbox, tag, 2)
    [captured] = (stack.state_dir / "capture").glob(f"*-{erased}.eml")
    captured.unlink()
    assert [m["email_id"] for m in listed(inbox, query=tag)["messages"]] == [kept]
    assert inbox.get(f"/api/v1/messages/{erased}").status_code == 404


def test_delete_clears_the_inbox(relay: SyncNats, inbox: httpx.Client, stack: DevStack) -> None:
    arrived(relay, inbox)
    response = inbox.delete("/api/v1/messages")
    assert response.status_code == 200
    assert response.json()["deleted"] >= 1
    assert listed(inbox) == {"messages": [], "total": 0}
    assert not list((stack.state_dir / "capture").glob("*.eml"))


def test_email_html_carries_the_content_security_policy(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    _, email_id = arrived(relay, inbox, html='<p><a href="https://example.com/">x</a></p>')
    response = inbox.get(f"/messages/{email_id}/html")
    assert response.headers["content-security-policy"] == EMAIL_CSP
    assert 'target="_blank" rel="noopener noreferrer"' in response.text


def test_message_page_shows_subject_from_to_and_date_in_its_markup(
    relay: SyncNats, inbox: httpx.Client
) -> None:
    tag = token()
    email_id = send(relay, subject=f"<b>{tag}</b>", to=f"page-{tag}@example.com").email_id
    wait_listed(inbox, tag, 1)
    page = inbox.get(f"/messages/{email_id}").text
    assert f'<h2 id="subject">&lt;b&gt;{tag}&lt;/b&gt;</h2>' in page  # escaped, not markup
    assert f"page-{tag}@example.com" in page
    assert "noreply@lfx.linuxfoundation.org" in page
    assert '<dd id="date">' in page
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in page


def test_a_restarted_stack_shows_the_same_inbox(tmp_path: Path) -> None:
    first = DevStack(tmp_path / "state", tmp_path)
    try:
        with SyncNats(first.nats_url) as client:
            email_id = send(client, subject="kept across restarts").email_id
        wait_until(lambda: list((tmp_path / "state" / "capture").glob(f"*-{email_id}.eml")))
        assert first.interrupt() == 0, first.logs()
    finally:
        first.kill()
    second = DevStack(tmp_path / "state", tmp_path)
    try:
        body = httpx.get(f"{second.inbox_url}api/v1/messages", timeout=10).json()
        assert [m["email_id"] for m in body["messages"]] == [email_id]
    finally:
        second.kill()


def test_serve_never_serves_the_inbox(module_relay: RelayProcess) -> None:
    for path in ("/", "/api/v1/messages"):
        assert httpx.get(f"{module_relay.base_url}{path}", timeout=10).status_code == 404


def test_a_file_gone_between_listing_and_reading_is_left_out(tmp_path: Path) -> None:
    """An erasure can remove a file after the directory was listed: that email
    is simply not there (a dangling link is a listed name with nothing to read)."""
    (tmp_path / "20261203T101010.000000Z-0001-gone.eml").symlink_to(tmp_path / "nowhere")
    assert Mailbox(tmp_path).messages() == []


def test_stream_says_change_when_an_email_arrives(
    relay: SyncNats, inbox: httpx.Client, stack: DevStack
) -> None:
    with httpx.stream("GET", f"{stack.inbox_url}api/v1/stream", timeout=10) as listening:
        lines = listening.iter_lines()
        assert next(lines) == "event: hello"
        send(relay, subject=token())
        assert "event: change" in lines  # reads on until it comes (10 s per read)


def test_ctrl_c_stops_the_stack_while_a_page_listens_for_changes(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "state", tmp_path)
    try:
        with httpx.stream("GET", f"{stack.inbox_url}api/v1/stream", timeout=10) as listening:
            assert next(listening.iter_lines()) == "event: hello"
            assert stack.interrupt(timeout=30) == 0, stack.logs()
        assert "emailrelay dev: stopped" in stack.stdout()
    finally:
        stack.kill()
