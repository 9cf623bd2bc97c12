"""MIME building: headers, parts, encodings and the raw tracking header, checked on the bytes."""

from __future__ import annotations

from dataclasses import replace
from email.message import EmailMessage

from emailrelay.mail.message import SMTP_MAX_LINE, build_message
from tests.support.messages import BASE, EMAIL_ID, header_lines, mailbox, parse, tracking_lines


def body_parts(raw: bytes) -> tuple[str, str]:
    """(text/plain, text/html) content, CRLF normalised to LF."""
    message = parse(raw)
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    contents = [p.get_content().replace("\r\n", "\n") for p in parts]
    return contents[0], contents[1]


def test_headers_decode_to_the_request_values() -> None:
    message = parse(build_message(BASE))
    assert message["From"] == "LFX Self Serve <noreply@lfx.linuxfoundation.org>"
    assert message["To"] == "jane@example.com"
    assert message["Subject"] == "Hello"


def test_message_id_date_and_mime_version_are_present() -> None:
    message = parse(build_message(BASE))
    assert message["Message-ID"].startswith("<")
    assert message["Message-ID"].endswith("@lfx.linuxfoundation.org>")
    assert message["Date"].datetime is not None
    assert message["MIME-Version"] == "1.0"


def test_reply_to_is_absent_when_not_given() -> None:
    assert parse(build_message(BASE))["Reply-To"] is None


def test_reply_to_is_written_when_given() -> None:
    raw = build_message(replace(BASE, reply_to=mailbox("help@linuxfoundation.org")))
    assert parse(raw)["Reply-To"] == "help@linuxfoundation.org"


def test_reply_to_local_part_that_needs_quotes_keeps_them() -> None:
    reply_to = mailbox('"odd local"@lists.example.org')
    parsed = parse(build_message(replace(BASE, reply_to=reply_to)))["Reply-To"].addresses[0]
    assert (parsed.username, parsed.domain) == ("odd local", "lists.example.org")


def test_configuration_set_header_when_set() -> None:
    raw = build_message(replace(BASE, configuration_set="lfx-tracking"))
    assert b"X-SES-CONFIGURATION-SET: lfx-tracking" in header_lines(raw)


def test_no_configuration_set_header_when_unset() -> None:
    assert b"X-SES-CONFIGURATION-SET" not in build_message(BASE)


def test_both_parts_equal_the_request_bodies() -> None:
    text, html = body_parts(build_message(BASE))
    assert (text, html) == (BASE.text, BASE.html)


def test_a_5000_character_html_line_arrives_intact() -> None:
    html = "<p>" + "x" * 5000 + "</p>"
    raw = build_message(replace(BASE, html=html))
    assert max(len(line) for line in raw.split(b"\r\n")) <= SMTP_MAX_LINE
    assert body_parts(raw)[1].rstrip("\n") == html


def test_a_lone_dot_line_arrives_intact() -> None:
    text = "before\n.\nafter"
    assert body_parts(build_message(replace(BASE, text=text)))[0].rstrip("\n") == text


def test_non_ascii_bodies_arrive_intact() -> None:
    text, html = "Grüße, 日本語 ✓\n", "<p>Grüße, 日本語 ✓</p>\n"
    assert body_parts(build_message(replace(BASE, text=text, html=html))) == (text, html)


def test_non_ascii_subject_is_rfc2047_encoded_and_decodes() -> None:
    subject = "Grüße aus Köln — 日本語"
    raw = build_message(replace(BASE, subject=subject))
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.isascii()
    assert b"=?utf-8?" in head
    assert parse(raw)["Subject"] == subject


def test_non_ascii_display_name_is_rfc2047_encoded_and_decodes() -> None:
    raw = build_message(replace(BASE, sender_display_name="Jörg Müller"))
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.isascii()
    from_header = parse(raw)["From"]
    assert from_header.addresses[0].display_name == "Jörg Müller"
    assert from_header.addresses[0].addr_spec == "noreply@lfx.linuxfoundation.org"


def test_display_name_with_specials_is_quoted() -> None:
    raw = build_message(replace(BASE, sender_display_name='Team, "LFX"'))
    assert parse(raw)["From"].addresses[0].display_name == 'Team, "LFX"'


def test_tracking_header_is_one_raw_line_for_a_60_character_group_id() -> None:
    group_id = "g" * 60
    lines = tracking_lines(build_message(replace(BASE, group_id=group_id)))
    assert lines == [f"X-LFX-TRACKING-ID: {group_id}/{EMAIL_ID}".encode()]


def test_tracking_header_percent_encodes_non_ascii_and_percent() -> None:
    raw = build_message(replace(BASE, group_id="café 100%"))
    assert tracking_lines(raw) == [f"X-LFX-TRACKING-ID: caf%C3%A9 100%25/{EMAIL_ID}".encode()]


def test_over_long_group_id_is_shortened_and_email_id_kept() -> None:
    raw = build_message(replace(BASE, group_id="é" * 2000))
    (line,) = tracking_lines(raw)
    assert len(line) <= SMTP_MAX_LINE
    assert line.endswith(f"/{EMAIL_ID}".encode())
    group = line.removeprefix(b"X-LFX-TRACKING-ID: ").rpartition(b"/")[0]
    # Shortened on an escape boundary: every %XX is whole.
    assert group.replace(b"%C3%A9", b"") == b""


def test_crlf_in_subject_adds_no_header() -> None:
    raw = build_message(replace(BASE, subject="Hi\r\nBcc: evil@attacker.example"))
    assert not any(line.lower().startswith(b"bcc:") for line in header_lines(raw))
    assert parse(raw)["Bcc"] is None


def test_crlf_in_display_name_adds_no_header() -> None:
    raw = build_message(replace(BASE, sender_display_name="Name\r\nBcc: evil@attacker.example"))
    assert not any(line.lower().startswith(b"bcc:") for line in header_lines(raw))
    assert parse(raw)["Bcc"] is None


def test_crlf_in_group_id_adds_no_header() -> None:
    raw = build_message(replace(BASE, group_id="g\r\nBcc: evil@attacker.example"))
    assert not any(line.lower().startswith(b"bcc:") for line in header_lines(raw))
    (line,) = tracking_lines(raw)
    assert line.endswith(f"/{EMAIL_ID}".encode())


def test_long_display_name_with_an_address_in_it_adds_no_sender() -> None:
    # The stdlib drops the quotes of a display name it folds: this one used to
    # put ceo@evil.example into From, past the From allowlist.
    name = "Support Team of the Linux Foundation Events and Training <ceo@evil.example>, x"
    raw = build_message(replace(BASE, sender_display_name=name))
    from_header = parse(raw)["From"]
    assert [a.addr_spec for a in from_header.addresses] == ["noreply@lfx.linuxfoundation.org"]
    assert b"ceo@evil.example" not in raw


def test_very_long_display_name_is_folded_into_short_lines() -> None:
    raw = build_message(replace(BASE, sender_display_name="x" * 3000))
    assert max(len(line) for line in header_lines(raw)) <= 78
    assert parse(raw)["From"].addresses[0].addr_spec == "noreply@lfx.linuxfoundation.org"


def test_short_ascii_display_name_stays_readable() -> None:
    assert b"From: LFX Self Serve <noreply@lfx.linuxfoundation.org>" in header_lines(
        build_message(BASE)
    )


def test_empty_display_name_gives_a_bare_from_address() -> None:
    raw = build_message(replace(BASE, sender_display_name=""))
    assert b"From: noreply@lfx.linuxfoundation.org" in header_lines(raw)


def test_group_id_that_looks_like_an_encoded_word_is_written_raw() -> None:
    raw = build_message(replace(BASE, group_id="=?utf-8?q?abc?="))
    assert tracking_lines(raw) == [f"X-LFX-TRACKING-ID: =?utf-8?q?abc?=/{EMAIL_ID}".encode()]


def part_headers(raw: bytes) -> list[EmailMessage]:
    return list(parse(raw).iter_parts())


def test_short_ascii_subject_is_written_as_typed() -> None:
    assert b"Subject: Hello" in header_lines(build_message(BASE))


def test_long_ascii_subject_folds_at_spaces_without_encoding() -> None:
    subject = ("Your weekly digest of LFX activity " * 5).strip()
    raw = build_message(replace(BASE, subject=subject))
    assert b"=?" not in raw.partition(b"\r\n\r\n")[0]
    assert max(len(line) for line in header_lines(raw)) <= 78
    assert parse(raw)["Subject"] == subject


def test_subject_that_fills_the_first_line_is_not_folded_after_the_colon() -> None:
    subject = "0" * 70
    assert parse(build_message(replace(BASE, subject=subject)))["Subject"] == subject


def test_subject_that_looks_like_an_encoded_word_arrives_as_typed() -> None:
    subject = "=?utf-8?q?not_decoded?="
    assert parse(build_message(replace(BASE, subject=subject)))["Subject"] == subject


def test_display_name_that_looks_like_an_encoded_word_arrives_as_typed() -> None:
    name = "=?utf-8?b?YWJj?="
    raw = build_message(replace(BASE, sender_display_name=name))
    assert parse(raw)["From"].addresses[0].display_name == name


def test_long_non_ascii_subject_keeps_every_space() -> None:
    # The stdlib's folder lost the space between two encoded words here.
    subject = "Grüße aus Köln und überall " * 6
    raw = build_message(replace(BASE, subject=subject))
    assert max(len(line) for line in header_lines(raw)) <= 78
    assert parse(raw)["Subject"] == subject


def test_unicode_line_breaks_in_subject_are_stripped() -> None:
    # The stdlib raised on these; the contract strips them.
    subject = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x00h"
    assert parse(build_message(replace(BASE, subject=subject)))["Subject"] == "abcdefgh"


def test_lone_surrogate_in_subject_becomes_replacement_character() -> None:
    raw = build_message(replace(BASE, subject="a\ud800b"))
    assert parse(raw)["Subject"] == "a\ufffdb"


def test_ascii_body_in_short_lines_is_7bit() -> None:
    plain, _ = part_headers(build_message(BASE))
    assert plain["Content-Transfer-Encoding"] == "7bit"


def test_mostly_ascii_body_with_a_long_line_is_quoted_printable() -> None:
    _, html = part_headers(build_message(replace(BASE, html="<p>" + "x" * 2000 + "</p>")))
    assert html["Content-Transfer-Encoding"] == "quoted-printable"


def test_mostly_non_ascii_body_is_base64() -> None:
    plain, _ = part_headers(build_message(replace(BASE, text="日本語のテキスト\n" * 20)))
    assert plain["Content-Transfer-Encoding"] == "base64"


def test_every_kind_of_line_break_in_a_body_travels_as_crlf() -> None:
    raw = build_message(replace(BASE, text="a\rb\nc\r\nd"))
    assert b"\r\n\r\na\r\nb\r\nc\r\nd\r\n--" in raw


def test_no_final_line_break_is_added_to_a_body() -> None:
    plain, _ = part_headers(build_message(replace(BASE, text="no newline")))
    assert plain.get_content() == "no newline"


def test_lone_surrogate_in_group_id_is_percent_encoded_as_replacement_character() -> None:
    raw = build_message(replace(BASE, group_id="g\ud800"))
    assert tracking_lines(raw) == [f"X-LFX-TRACKING-ID: g%EF%BF%BD/{EMAIL_ID}".encode()]
