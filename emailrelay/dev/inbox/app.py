"""The dev inbox's ASGI app: the pages, the JSON API they use, and live updates.

::

    GET    /                                   the list (static page; fills itself from the API)
    GET    /messages/{email_id}                one email (subject, from, to, date in the markup)
    GET    /messages/{email_id}/html           the email's HTML, inert (CSP below)
    GET    /groups/{group_id}                  a group: its emails, analytics and a chart
    GET    /static/{name}                      the pages' CSS and JavaScript (package data)
    GET    /api/v1/messages                    ?query= &limit= (50) &offset=, newest first
    DELETE /api/v1/messages                    clear the inbox (deletes the captured files)
    GET    /api/v1/messages/{email_id}         + html, text, headers, record
    GET    /api/v1/messages/{email_id}/raw     the captured bytes, message/rfc822
    POST   /api/v1/messages/{email_id}/events  {"type": "open"|"click"|"bounce"|"complaint"} → 202
    GET    /api/v1/groups/{group_id}           analytics (the relay's own reply) and event times
    GET    /api/v1/stream                      server-sent events: ``change`` when anything moved

An email's HTML is untrusted: it is served with :data:`EMAIL_CSP` (no script,
no remote anything, no form target, no ``<base href>``) into an iframe the page
sandboxes without ``allow-scripts``. ``?images=remote`` widens ``img-src`` to
http(s) for that one load: the visible "load remote images" toggle. Links get
``target="_blank" rel="noopener noreferrer"`` put first in each ``<a>`` and
``<area>`` tag (the first of two equal attributes is the one a browser keeps).

Events go into the dev event queue as ``emailrelay dev event`` sends them (an
SES record in an SNS envelope, built from the captured file), so the production
poller applies them: the page shows what ``status`` would.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import anyio

from emailrelay import api
from emailrelay.dev.eventqueue import DevEventQueue
from emailrelay.dev.inbox.changes import Changes
from emailrelay.dev.inbox.http import (
    Request,
    Response,
    Route,
    dispatch,
    json_error,
    json_response,
    route,
    stream,
)
from emailrelay.dev.inbox.mailbox import Captured, Mailbox, read_contents
from emailrelay.dev.sesevents import DevEvent, ses_event, sns_notification
from emailrelay.handlers.analytics import GetEngagementAnalyticsHandler
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.status import TrackingReader
from emailrelay.health import Receive, Scope, Send, answer_lifespan
from emailrelay.store.kv import StoreError

log = logging.getLogger(__name__)

EMAIL_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:; "
    "base-uri 'none'; form-action 'none'"
)
"""The policy on every email's HTML: it renders, and nothing in it runs or calls out."""

EMAIL_CSP_REMOTE_IMAGES = EMAIL_CSP.replace("img-src data: cid:", "img-src data: cid: http: https:")

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'"
)
"""The inbox's own pages: only their own script and style, no inline code."""

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
KEEPALIVE = 15.0
"""Seconds between comments on an idle event stream, so a proxy keeps it open."""

EVENT_TYPES = {
    "open": DevEvent.OPEN,
    "click": DevEvent.CLICK,
    "bounce": DevEvent.BOUNCE,
    "complaint": DevEvent.COMPLAINT,
}

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def tracking_summary(record: api.TrackingRecord | None) -> dict[str, Any]:
    """The tracking state the list shows; ``state`` is the furthest one reached
    (``pending`` until the relay wrote a record)."""
    if record is None:
        return {"state": "pending"}
    flags = {
        "delivered": record.delivered,
        "opened": record.opened,
        "clicked": record.clicked,
        "bounced": record.bounce_type is not None,
        "complained": record.complaint_feedback_type is not None,
        "failed": record.failed,
    }
    order = ("complained", "bounced", "failed", "clicked", "opened", "delivered")
    state = next((name for name in order if flags[name]), "sent")
    return {
        "state": state,
        **flags,
        "open_count": record.open_count,
        "click_count": record.click_count,
    }


class InboxApp:
    """The app over one capture directory, the tracking records and the event queue."""

    def __init__(
        self,
        mailbox: Mailbox,
        tracking: TrackingReader,
        events: DevEventQueue,
        changes: Changes,
    ) -> None:
        self.mailbox = mailbox
        self.tracking = tracking
        self.events = events
        self.changes = changes
        self._analytics = GetEngagementAnalyticsHandler(tracking)
        self.routes: list[Route] = [
            route("GET", "/", self._index),
            route("GET", "/messages/{email_id}", self._message_page),
            route("GET", "/messages/{email_id}/html", self._message_html),
            route("GET", "/groups/{group_id}", self._group_page),
            route("GET", "/static/{name}", self._static),
            route("GET", "/api/v1/messages", self._list),
            route("DELETE", "/api/v1/messages", self._clear),
            route("GET", "/api/v1/messages/{email_id}", self._one),
            route("GET", "/api/v1/messages/{email_id}/raw", self._raw),
            route("POST", "/api/v1/messages/{email_id}/events", self._event),
            route("GET", "/api/v1/groups/{group_id}", self._group),
            stream("GET", "/api/v1/stream", self._stream),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "http":
            await dispatch(self.routes, scope, receive, send)

    # --- the JSON API ------------------------------------------------------

    async def _list(self, request: Request) -> Response:
        try:
            limit = _whole(request.query.get("limit"), DEFAULT_LIMIT, "limit", 1, MAX_LIMIT)
            offset = _whole(request.query.get("offset"), 0, "offset", 0, None)
        except ValueError as exc:
            return json_error(400, str(exc))
        query = request.query.get("query", "").strip()
        found = [m for m in self.mailbox.messages() if not query or m.matches(query)]
        page = found[offset : offset + limit]
        records = await self._records(page)
        return json_response(
            200,
            {
                "messages": [_summary(m, records.get(m.email_id)) for m in page],
                "total": len(found),
            },
        )

    async def _clear(self, request: Request) -> Response:
        deleted = await anyio.to_thread.run_sync(self.mailbox.clear)
        self.changes.bump()
        return json_response(200, {"deleted": deleted})

    async def _one(self, request: Request) -> Response:
        found = self._captured(request)
        if found is None:
            return _no_such_message(request)
        message, raw = found
        record = (await self._records([message])).get(message.email_id)
        contents = read_contents(raw)
        return json_response(
            200,
            {
                **_summary(message, record),
                "from": contents.from_header,
                "to_header": contents.to_header,
                "date": contents.date,
                "html": contents.html,
                "text": contents.text,
                "headers": [[name, value] for name, value in contents.headers],
                "record": json.loads(record.to_json()) if record is not None else None,
            },
        )

    async def _raw(self, request: Request) -> Response:
        found = self._captured(request)
        if found is None:
            return _no_such_message(request)
        message, raw = found
        return Response(
            200,
            raw,
            "message/rfc822",
            [("content-disposition", f'attachment; filename="{message.email_id}.eml"')],
        )

    async def _event(self, request: Request) -> Response:
        found = self._captured(request)
        if found is None:
            return _no_such_message(request)
        _, raw = found
        try:
            body = json.loads(request.body)
        except (UnicodeDecodeError, ValueError):
            return json_error(400, "the body is not JSON")
        name = body.get("type") if isinstance(body, dict) else None
        if not isinstance(name, str) or name not in EVENT_TYPES:
            return json_error(400, f"type must be one of {', '.join(EVENT_TYPES)}")
        kind = EVENT_TYPES[name]
        link = body.get("link")
        if isinstance(link, str) and link:
            event = ses_event(kind, raw, link=link)
        else:
            event = ses_event(kind, raw)
        queued = self.events.send(sns_notification(event))
        return json_response(202, {"queued": queued, "type": name})

    async def _group(self, request: Request) -> Response:
        group_id = request.params["group_id"]
        reply = await self._analytics(json.dumps({"group_id": group_id}).encode())
        analytics = json.loads(encode_reply(reply))
        if "error" in analytics:
            status = 404 if analytics["error"] == api.ERR_NOT_FOUND else 503
            return json_error(status, f"group {group_id}: {analytics['error']}")
        try:
            ids = await self.tracking.group_ids(group_id) or []
            records = await self.tracking.get_records(ids, skip_unreadable=True)
        except StoreError as exc:
            return json_error(503, f"tracking records unreadable: {exc}")
        captured = [m for m in self.mailbox.messages() if m.group_id == group_id]
        by_id = {record.email_id: record for record in records}
        return json_response(
            200,
            {
                "group_id": group_id,
                "analytics": analytics,
                "messages": [_summary(m, by_id.get(m.email_id)) for m in captured],
                "times": _event_times(records),
            },
        )

    def _captured(self, request: Request) -> tuple[Captured, bytes] | None:
        """The email the path names and its bytes; ``None`` when it was never
        captured or its file is gone (erased or cleared since it was listed)."""
        message = self.mailbox.find(request.params["email_id"])
        if message is None:
            return None
        try:
            return message, message.path.read_bytes()
        except FileNotFoundError:
            return None

    async def _records(self, messages: list[Captured]) -> dict[str, api.TrackingRecord]:
        ids = [m.email_id for m in messages if m.tracked]
        try:
            records = await self.tracking.get_records(ids, skip_unreadable=True)
        except StoreError as exc:  # the list still shows what was captured
            log.warning("inbox: tracking records unreadable", extra={"error": repr(exc)})
            return {}
        return {record.email_id: record for record in records}

    # --- live updates ------------------------------------------------------

    async def _stream(self, request: Request, receive: Receive, send: Send) -> None:
        """``event: change`` each time something moved (at most one per change
        seen; a burst of changes can arrive as one), until the page goes away."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        async with anyio.create_task_group() as tg:

            async def until_disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnected)
            seen = self.changes.version
            await _send_event(send, "hello", {"version": seen})
            while True:
                with anyio.move_on_after(KEEPALIVE) as idle:
                    seen = await self.changes.wait_past(seen)
                if idle.cancelled_caught:
                    idle_comment = {"type": "http.response.body", "body": b": idle\n\n"}
                    await send({**idle_comment, "more_body": True})
                else:
                    await _send_event(send, "change", {"version": seen})

    # --- pages -------------------------------------------------------------

    async def _index(self, request: Request) -> Response:
        return _page("index.html", title="emailrelay dev inbox")

    async def _group_page(self, request: Request) -> Response:
        group_id = request.params["group_id"]
        return _page("group.html", title=f"group {group_id}", group_id=group_id)

    async def _message_page(self, request: Request) -> Response:
        found = self._captured(request)
        if found is None:
            return _page("missing.html", status=404, title="no such email")
        message, raw = found
        contents = read_contents(raw)
        record = (await self._records([message])).get(message.email_id)
        headers = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
            for name, value in contents.headers
        )
        return _page(
            "message.html",
            title=message.subject or "(no subject)",
            email_id=message.email_id,
            group_link_rows=(
                f'<a href="/groups/{quote(message.group_id, safe="")}">'
                f"{html.escape(message.group_id)}</a>"
                if message.group_id
                else "(none)"
            ),
            subject=message.subject or "(no subject)",
            from_=contents.from_header,
            to=contents.to_header,
            date=contents.date,
            text=contents.text or "(no text part)",
            headers_rows=headers,
            has_html="yes" if contents.html else "no",
            state=tracking_summary(record)["state"],
            record=json.dumps(json.loads(record.to_json()), indent=2) if record else "(none yet)",
        )

    async def _message_html(self, request: Request) -> Response:
        found = self._captured(request)
        if found is None:
            return Response(404, b"no such email\n")
        _, raw = found
        remote = request.query.get("images") == "remote"
        return Response(
            200,
            links_in_new_tabs(read_contents(raw).html).encode(),
            "text/html; charset=utf-8",
            [
                ("content-security-policy", EMAIL_CSP_REMOTE_IMAGES if remote else EMAIL_CSP),
                ("referrer-policy", "no-referrer"),
            ],
        )

    async def _static(self, request: Request) -> Response:
        name = request.params["name"]
        kind = STATIC_TYPES.get(name.rpartition(".")[2])
        resource = files("emailrelay.dev.inbox") / "static" / name
        if kind is None or "/" in name or not resource.is_file():
            return Response(404, b"not found\n")
        return Response(200, resource.read_bytes(), kind)


STATIC_TYPES = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8"}

_LINK_TAG = re.compile(r"<(a|area)(?=[\s>/])", re.IGNORECASE)


def links_in_new_tabs(email_html: str) -> str:
    """Every link opens a new tab with no handle on this page."""
    return _LINK_TAG.sub(r'<\1 target="_blank" rel="noopener noreferrer"', email_html)


def _summary(message: Captured, record: api.TrackingRecord | None) -> dict[str, Any]:
    return {
        "email_id": message.email_id,
        "to": message.to,
        "subject": message.subject,
        "group_id": message.group_id,
        "captured_at": api.format_time(message.captured_at),
        "tracking": tracking_summary(record),
    }


def _event_times(records: list[api.TrackingRecord]) -> dict[str, list[str]]:
    """When each send, delivery, open and click happened (the opens and clicks
    the records keep), for the group chart."""
    times: dict[str, list[datetime]] = {"sent": [], "delivered": [], "opened": [], "clicked": []}
    for record in records:
        times["sent"].append(record.sent_at)
        if record.delivered_at is not None:
            times["delivered"].append(record.delivered_at)
        times["opened"].extend(event.opened_at for event in record.opened_at_list)
        times["clicked"].extend(event.clicked_at for event in record.clicked_links)
    return {name: sorted(api.format_time(t) for t in values) for name, values in times.items()}


def _no_such_message(request: Request) -> Response:
    return json_error(404, f"no captured email {request.params['email_id']}")


def _whole(value: str | None, default: int, name: str, low: int, high: int | None) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None
    if number < low or (high is not None and number > high):
        bound = f"{low} to {high}" if high is not None else f"{low} or more"
        raise ValueError(f"{name} must be {bound}, not {number}")
    return number


async def _send_event(send: Send, name: str, data: dict[str, Any]) -> None:
    body = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": True})


def _page(template: str, *, status: int = 200, **fields: str) -> Response:
    """A page from package data, each ``{{name}}`` replaced by its field,
    HTML-escaped (``*_rows`` fields are markup built here, already escaped)."""
    text = (files("emailrelay.dev.inbox") / "static" / template).read_text(encoding="utf-8")
    for name, value in fields.items():
        key = name.rstrip("_")
        text = text.replace(
            "{{" + key + "}}", value if key.endswith("_rows") else html.escape(value)
        )
    return Response(
        status, text.encode(), "text/html; charset=utf-8", [("content-security-policy", PAGE_CSP)]
    )
