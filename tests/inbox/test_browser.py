"""The dev inbox in a real browser: headless Chromium (Debian's ``chromium``)
driven by Playwright, against a real ``emailrelay dev`` stack (``nox -s browser``).

Emails go in through the relay; everything is observed in the page. The
hostile email's remote image and stylesheet point at an HTTP server this
module runs, which records every request it gets: nothing may reach it until
the "Load remote images" toggle is used, and then the image must.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from emailrelay.dev.inbox.app import EMAIL_CSP
from tests.inbox.helpers import send
from tests.support.nats_client import SyncNats
from tests.support.servers.dev import DevStack
from tests.support.waiting import LOOPBACK, wait_until

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000
GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


class RequestRecorder:
    """A loopback HTTP server that answers images and stylesheets and keeps every path asked."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.paths.append(self.path)
                kind, body = ("image/gif", GIF)
                if self.path.endswith(".css"):
                    kind, body = ("text/css", b"body { background: red; }")
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def asked(self, tag: str) -> list[str]:
        return [path for path in self.paths if tag in path]

    def __enter__(self) -> RequestRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def recorder() -> Iterator[RequestRecorder]:
    with RequestRecorder() as server:
        yield server


@contextlib.contextmanager
def plain_asyncio_policy() -> Iterator[None]:
    """asyncio's own policy for a moment: trio_asyncio (imported by the relay's
    modules) installs one whose new loops cannot run nested, and Playwright's
    sync API makes its loop when it starts and runs it nested."""
    trio_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(trio_policy)


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, on a fresh profile; Playwright downloads no browser."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `nox -s browser`, which installs it")
    with contextlib.ExitStack() as exits:
        with plain_asyncio_policy():
            playwright = exits.enter_context(sync_playwright())
        profile = exits.enter_context(tempfile.TemporaryDirectory())
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 720},
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    page = browser.new_page()
    try:
        yield page
    finally:
        page.close()


def open_list(page: Page, stack: DevStack) -> None:
    page.goto(stack.inbox_url)
    page.locator("#live.on").wait_for()  # the event stream is connected


def open_email(page: Page, stack: DevStack, email_id: str) -> None:
    page.goto(f"{stack.inbox_url}messages/{email_id}")
    page.locator("#live.on").wait_for()


def captured(stack: DevStack, email_id: str) -> None:
    capture = stack.state_dir / "capture"
    wait_until(lambda: list(capture.glob(f"*-{email_id}.eml")), message="never captured")


def test_sent_email_appears_in_the_list_without_a_reload(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    open_list(page, stack)
    page.evaluate("window.sameDocument = true")  # gone if the page reloads
    subject = f"Arrives live {uuid.uuid4().hex[:8]}"
    send(relay, subject=subject)
    page.locator("#messages tbody tr", has_text=subject).wait_for()
    assert page.evaluate("window.sameDocument") is True


def test_list_shows_the_tracking_state_moving_to_delivered(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    subject = f"Tracked {uuid.uuid4().hex[:8]}"
    open_list(page, stack)
    send(relay, subject=subject)
    row = page.locator("#messages tbody tr", has_text=subject)
    row.locator(".state-delivered").wait_for()  # the stack's Delivery event, applied


def test_search_box_narrows_the_list(page: Page, stack: DevStack, relay: SyncNats) -> None:
    tag = uuid.uuid4().hex[:8]
    send(relay, subject=f"Wanted {tag}")
    other = send(relay, subject=f"Other {uuid.uuid4().hex[:8]}").email_id
    captured(stack, other)
    open_list(page, stack)
    page.locator("#search").fill(tag.upper())
    page.locator("#count", has_text="1 email(s) matching").wait_for()
    assert page.locator("#messages tbody tr").all_inner_texts()[0].count(f"Wanted {tag}") == 1
    assert page.locator("#messages tbody tr").count() == 1


def test_email_page_shows_its_html_inside_the_iframe(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    text = f"Rendered {uuid.uuid4().hex[:8]}"
    email_id = send(relay, subject=text, html=f"<h1>{text}</h1>").email_id
    captured(stack, email_id)
    open_email(page, stack, email_id)
    page.frame_locator("#html-frame").locator("h1", has_text=text).wait_for()
    assert page.locator("#subject").inner_text() == text


def test_open_button_moves_the_record_on_the_page(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    email_id = send(relay, subject=f"Opened {uuid.uuid4().hex[:8]}").email_id
    captured(stack, email_id)
    open_email(page, stack, email_id)
    page.locator("#record", has_text='"delivered": true').wait_for()
    page.get_by_role("button", name="open", exact=True).click()
    page.locator("#record", has_text='"open_count": 1').wait_for()
    assert page.locator("#state").inner_text() == "opened"


def test_email_iframe_is_sandboxed_without_scripts(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    email_id = send(relay, subject=f"Sandboxed {uuid.uuid4().hex[:8]}").email_id
    captured(stack, email_id)
    open_email(page, stack, email_id)
    sandbox = page.locator("iframe#html-frame").get_attribute("sandbox")
    assert sandbox is not None
    assert set(sandbox.split()) == {"allow-popups", "allow-popups-to-escape-sandbox"}


def test_email_html_reaches_the_browser_with_the_content_security_policy(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    email_id = send(relay, subject=f"Policed {uuid.uuid4().hex[:8]}").email_id
    captured(stack, email_id)
    with page.expect_response(re.compile(rf"/messages/{email_id}/html$")) as html:
        open_email(page, stack, email_id)
    assert html.value.headers["content-security-policy"] == EMAIL_CSP


def hostile_email(relay: SyncNats, recorder: RequestRecorder, tag: str) -> str:
    """An email whose HTML tries a script, a remote stylesheet and a remote image."""
    markup = (
        f'<link rel="stylesheet" href="{recorder.url}/style-{tag}.css">'
        f"<p>Hostile {tag}</p>"
        f'<img src="{recorder.url}/pixel-{tag}.gif" alt="pixel">'
        "<script>document.body.setAttribute('data-script-ran', 'yes');"
        f"fetch('{recorder.url}/script-{tag}');"
        "try { parent.document.title = 'script ran'; } catch (e) {}</script>"
    )
    return send(relay, subject=f"Hostile {tag}", html=markup).email_id


def frame_loaded(page: Page, tag: str) -> None:
    """Until the email's frame has fired ``load`` (its images and styles tried)."""
    page.frame_locator("#html-frame").locator("p", has_text=f"Hostile {tag}").wait_for()
    frame = next(f for f in page.frames if re.search(r"/html(\?|$)", f.url))
    frame.wait_for_load_state("load")


def open_hostile_email(
    page: Page, stack: DevStack, relay: SyncNats, recorder: RequestRecorder
) -> str:
    """The hostile email's page, its frame loaded; the email's tag."""
    tag = uuid.uuid4().hex[:8]
    email_id = hostile_email(relay, recorder, tag)
    captured(stack, email_id)
    open_email(page, stack, email_id)
    frame_loaded(page, tag)
    return tag


def test_hostile_email_makes_no_request_and_runs_no_script(
    page: Page, stack: DevStack, relay: SyncNats, recorder: RequestRecorder
) -> None:
    tag = open_hostile_email(page, stack, relay, recorder)
    assert recorder.asked(tag) == []
    body = page.frame_locator("#html-frame").locator("body")
    assert body.get_attribute("data-script-ran") is None
    assert page.title() != "script ran"


def test_remote_images_toggle_loads_the_image_and_still_no_script(
    page: Page, stack: DevStack, relay: SyncNats, recorder: RequestRecorder
) -> None:
    tag = open_hostile_email(page, stack, relay, recorder)
    page.get_by_label("Load remote images").check()
    wait_until(
        lambda: f"/pixel-{tag}.gif" in recorder.asked(tag),
        message="the remote image was never asked for after the toggle",
    )
    frame_loaded(page, tag)
    assert recorder.asked(tag) == [f"/pixel-{tag}.gif"]  # no stylesheet, no script fetch
    body = page.frame_locator("#html-frame").locator("body")
    assert body.get_attribute("data-script-ran") is None


def test_group_page_shows_analytics_and_draws_a_chart(
    page: Page, stack: DevStack, relay: SyncNats
) -> None:
    group = f"browser-group-{uuid.uuid4().hex[:8]}"
    last = [send(relay, group_id=group, subject=f"In {group} {n}").email_id for n in range(2)][-1]
    captured(stack, last)
    page.goto(f"{stack.inbox_url}groups/{group}")
    page.locator("#analytics div", has_text="total sent").locator("dd", has_text="2").wait_for()
    for series in ("sent", "delivered"):  # deliveries arrive a moment later, drawn live
        page.locator(f"svg#chart rect.series-{series}").first.wait_for()
    assert page.locator("#messages tbody tr").count() == 2
