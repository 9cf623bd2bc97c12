"""MIME building, proven by round trips: arbitrary requests in, the stdlib's
parsers on the bytes out.

The oracle is the modern parser (``policy.default``) wherever it decodes
correctly. One place it does not: Python 3.11's modern parser inserts a space
between two encoded words of a display name (CPython gh-128110, fixed upstream
by PR 130749) and turns tabs and whitespace runs inside an encoded word into
one space. So display names are proven in two halves: exactly, through the
stdlib's RFC 2047 decoder (``email.header.decode_header``, which drops the
whitespace between encoded words as RFC 2047 section 6.2 says) for every name;
and exactly through the modern parser for every name it can represent.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from email.header import decode_header, make_header
from email.utils import getaddresses, parseaddr
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st

from emailrelay.addresses import strip_line_breaks
from emailrelay.mail.message import (
    FOLD_AT,
    SMTP_MAX_LINE,
    build_message,
    tracking_header_value,
)
from tests.support.messages import BASE, EMAIL_ID, header_lines, parse, tracking_lines

FEW = settings(max_examples=100, deadline=None)

TRICKY = st.sampled_from(
    [
        "=?utf-8?q?abc?=",
        "=?utf-8?b?YWJj?=",
        "=?",
        "?=",
        '"',
        "\\",
        ",",
        "<ceo@evil.example>",
        "@",
        ";",
        "(",
        ")",
        " ",
        "  ",
        "\t",
        "x" * 90,
        "é",
        "日本語",
        "😀",
        "\r\n",
        "\r",
        "\n",
        "\x00",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x85",
        "\u2028",
        "\u2029",
        "\u3000",
        "\xa0",
        "_",
        "=",
        "?",
    ]
)
"""Fragments that broke or could break a header: encoded-word look-alikes,
specials, whitespace runs, every line break Python knows, long runs."""

HEADER_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(TRICKY, st.text(max_size=8)), max_size=30).map("".join),
)

LINE_ENDINGS = st.sampled_from(["\r\n", "\r", "\n", "\n\n", "\r\r\n"])
BODY_TEXT = st.one_of(
    st.text(max_size=400),
    st.lists(
        st.one_of(
            LINE_ENDINGS,
            TRICKY,
            st.text(max_size=20),
            st.sampled_from(["y" * 1200, "é" * 700, ".", "\n.\n", "--=_", "From ", " \n", "=\n"]),
        ),
        max_size=40,
    ).map("".join),
)


def canonical_body(text: str) -> str:
    """The contract's body normalisation: CR, LF and CRLF are line breaks, written CRLF."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


def unfolded(raw: bytes, name: bytes) -> str:
    """The raw value of one header, unfolded (CRLF removed), undecoded."""
    head = raw.partition(b"\r\n\r\n")[0]
    (value,) = re.findall(rb"^" + name + rb": ?([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M | re.I)
    return value.replace(b"\r\n", b"").decode("ascii")


def rfc2047_display_name(raw: bytes) -> str:
    name, _ = parseaddr(unfolded(raw, b"From"))
    return str(make_header(decode_header(name))) if "=?" in name else name


def modern_can_represent(name: str) -> bool:
    """Names Python 3.11's modern parser reads back exactly from what RFC 5322
    and RFC 2047 allow: printable ASCII short enough to be a quoted string on
    the first line, or text that fits one encoded word (42 octets of UTF-8 fit
    in B and in Q whenever Q is chosen) with no tab and no run of whitespace."""
    quoted = f'From: "{name}" <{BASE.sender.address}>'
    plain = name.isascii() and name.replace("\t", " ").isprintable() and "=?" not in name
    if plain and len(quoted) + name.count('"') + name.count("\\") <= FOLD_AT:
        return True
    fits_one_word = len(name.encode()) <= 42
    return fits_one_word and "\t" not in name and not re.search(r" \s", name)


@FEW
@given(subject=HEADER_TEXT)
def test_subject_arrives_as_typed(subject: str) -> None:
    raw = build_message(replace(BASE, subject=subject))
    assert parse(raw)["Subject"] == strip_line_breaks(subject)


@FEW
@given(subject=st.text(min_size=100, max_size=2000))
def test_long_subject_folds_into_short_lines_and_arrives_as_typed(subject: str) -> None:
    raw = build_message(replace(BASE, subject=subject))
    assert all(len(line) <= FOLD_AT for line in header_lines(raw) if not line.startswith(b"X-"))
    assert parse(raw)["Subject"] == strip_line_breaks(subject)


@FEW
@given(name=HEADER_TEXT)
def test_from_yields_exactly_the_sender_address(name: str) -> None:
    raw = build_message(replace(BASE, sender_display_name=name))
    modern = parse(raw)["From"]
    assert [a.addr_spec for a in modern.addresses] == [BASE.sender.address]
    legacy = getaddresses([unfolded(raw, b"From")])
    assert [addr for _, addr in legacy] == [BASE.sender.address]


@FEW
@given(name=HEADER_TEXT)
def test_display_name_decodes_exactly_per_rfc_2047(name: str) -> None:
    raw = build_message(replace(BASE, sender_display_name=name))
    assert rfc2047_display_name(raw) == strip_line_breaks(name)


@FEW
@given(name=HEADER_TEXT.map(strip_line_breaks).filter(modern_can_represent))
def test_display_name_arrives_as_typed_through_the_modern_parser(name: str) -> None:
    raw = build_message(replace(BASE, sender_display_name=name))
    assert parse(raw)["From"].addresses[0].display_name == name


@FEW
@given(name=st.text(max_size=3000))
def test_display_name_lines_stay_short(name: str) -> None:
    raw = build_message(replace(BASE, sender_display_name=name))
    from_lines = unfolded_lines(raw, b"From")
    assert all(len(line) <= FOLD_AT for line in from_lines)


def unfolded_lines(raw: bytes, name: bytes) -> list[bytes]:
    lines = header_lines(raw)
    start = next(i for i, line in enumerate(lines) if line.startswith(name + b":"))
    end = start + 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return lines[start:end]


@FEW
@given(text=BODY_TEXT, html=BODY_TEXT)
def test_both_bodies_arrive_exactly_in_canonical_form(text: str, html: str) -> None:
    message = parse(build_message(replace(BASE, text=text, html=html)))
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = message.iter_parts()
    assert (plain.get_content_type(), rich.get_content_type()) == ("text/plain", "text/html")
    assert (plain.get_content(), rich.get_content()) == (canonical_body(text), canonical_body(html))


@FEW
@given(subject=HEADER_TEXT, name=HEADER_TEXT, group_id=HEADER_TEXT, text=BODY_TEXT, html=BODY_TEXT)
def test_every_line_is_crlf_terminated_and_at_most_998_octets_and_no_header_line_ends_in_space(
    subject: str, name: str, group_id: str, text: str, html: str
) -> None:
    raw = build_message(
        replace(
            BASE, subject=subject, sender_display_name=name, group_id=group_id, text=text, html=html
        )
    )
    assert raw.endswith(b"\r\n")
    lines = raw[:-2].split(b"\r\n")
    assert all(len(line) <= SMTP_MAX_LINE for line in lines)
    assert not any(b"\r" in line or b"\n" in line for line in lines)
    assert not any(line.endswith((b" ", b"\t")) for line in header_lines(raw))


@FEW
@given(group_id=HEADER_TEXT)
def test_tracking_header_is_one_raw_line_that_decodes_to_the_group(group_id: str) -> None:
    raw = build_message(replace(BASE, group_id=group_id))
    (line,) = tracking_lines(raw)
    value = tracking_header_value(group_id, EMAIL_ID)
    assert line == f"X-LFX-TRACKING-ID: {value}".encode("ascii")
    assert line.decode("ascii").isprintable()
    group, _, email_id = value.rpartition("/")
    assert email_id == EMAIL_ID
    assert unquote(group, errors="strict") == strip_line_breaks(group_id)


@FEW
@given(group_id=st.text(min_size=300, max_size=3000))
def test_over_long_tracking_header_stays_one_line_with_the_email_id(group_id: str) -> None:
    (line,) = tracking_lines(build_message(replace(BASE, group_id=group_id)))
    assert len(line) <= SMTP_MAX_LINE
    assert line.endswith(f"/{EMAIL_ID}".encode())
    assert re.fullmatch(rb"X-LFX-TRACKING-ID: ([ -$&-~]|%[0-9A-F]{2})*/[-0-9a-f]+", line)


@FEW
@given(name=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_configuration_set_is_written_raw_on_one_line(name: str) -> None:
    raw = build_message(replace(BASE, configuration_set=name))
    assert f"X-SES-CONFIGURATION-SET: {name}".encode() in header_lines(raw)


def test_parsed_message_has_no_defects() -> None:
    message = email.message_from_bytes(
        build_message(replace(BASE, subject="Grüße " * 30, sender_display_name="Jörg " * 20)),
        policy=email.policy.default,
    )
    assert all(not part.defects for part in message.walk())
