"""The address rules of the contract: what parses, the two allowlist rules, redaction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emailrelay.addresses import (
    _parse_with_stdlib,
    domain_is_listed,
    domain_is_within,
    parse_mailbox,
    redact,
    strip_line_breaks,
)

# parse_mailbox


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("a@b.example", "a@b.example"),
        ("Name <a@b.example>", "a@b.example"),
        ('"Quoted, Name" <a@b.example>', "a@b.example"),
        ("<a@b.example>", "a@b.example"),
        ("user@localhost", "user@localhost"),
        ("user@example.com", "user@example.com"),
        ("user@mail.test", "user@mail.test"),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
    ],
)
def test_single_mailbox_parses_to_its_bare_address(value: str, address: str) -> None:
    mailbox = parse_mailbox(value)
    assert mailbox is not None
    assert mailbox.address == address


def test_display_name_is_kept_apart_from_the_address() -> None:
    mailbox = parse_mailbox("Jane Doe <jane@example.com>")
    assert mailbox is not None
    assert mailbox.display_name == "Jane Doe"
    assert (mailbox.local_part, mailbox.domain) == ("jane", "example.com")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plainword",
        "a@",
        "@b.example",
        "a@b.example, c@d.example",
        "Group: a@b.example;",
        "a@b.example trailing",
        "a b@c.example",
        "a@b..example",
        "<>",
        "user@bücher.example",
        "jörg@example.com",
    ],
)
def test_anything_but_one_mailbox_is_unparseable(value: str) -> None:
    assert parse_mailbox(value) is None


def test_non_ascii_display_name_is_fine() -> None:
    mailbox = parse_mailbox("Jörg Müller <jm@example.com>")
    assert mailbox is not None
    assert mailbox.display_name == "Jörg Müller"


# allowlists


def test_from_rule_is_exact_membership() -> None:
    assert domain_is_listed("lfx.linuxfoundation.org", ("lfx.linuxfoundation.org",))


def test_from_rule_ignores_case() -> None:
    assert domain_is_listed("LFX.LinuxFoundation.ORG", ("lfx.linuxfoundation.org",))


def test_from_rule_does_not_allow_subdomains() -> None:
    assert not domain_is_listed("mail.lfx.linuxfoundation.org", ("lfx.linuxfoundation.org",))


def test_from_rule_with_empty_allowlist_allows_none() -> None:
    assert not domain_is_listed("lfx.linuxfoundation.org", ())


def test_within_rule_allows_the_domain_itself() -> None:
    assert domain_is_within("linuxfoundation.org", ("linuxfoundation.org",))


def test_within_rule_allows_a_subdomain() -> None:
    assert domain_is_within("lists.linuxfoundation.org", ("linuxfoundation.org",))


def test_within_rule_allows_a_deep_subdomain_in_any_case() -> None:
    assert domain_is_within("A.B.LinuxFoundation.Org", ("linuxfoundation.org",))


def test_within_rule_needs_a_label_boundary() -> None:
    assert not domain_is_within("evillinuxfoundation.org", ("linuxfoundation.org",))


def test_within_rule_refuses_a_parent_domain() -> None:
    assert not domain_is_within("foundation.org", ("linuxfoundation.org",))


def test_within_rule_with_empty_allowlist_allows_none() -> None:
    assert not domain_is_within("linuxfoundation.org", ())


# redaction and line breaks


def test_redact_keeps_two_characters_and_the_domain() -> None:
    assert redact("jane.doe@example.com") == "ja***@example.com"


def test_redact_never_returns_a_short_address_whole() -> None:
    assert "ab@example.com" not in redact("ab@example.com")


def test_redact_of_a_non_address_hides_it() -> None:
    assert redact("not-an-address") == "***"


def test_strip_line_breaks_removes_cr_and_lf() -> None:
    assert strip_line_breaks("a\r\nb\rc\nd") == "abcd"


@pytest.mark.parametrize(
    "boundary", ["\x00", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_strip_line_breaks_removes_nul_and_every_splitlines_boundary(boundary: str) -> None:
    stripped = strip_line_breaks(f"a{boundary}b")
    assert stripped == "ab"
    assert stripped.splitlines() == ["ab"]


# the fast path for bare addresses agrees with the stdlib parser

_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"


@given(
    st.from_regex(
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,70}(\.[a-z0-9_-]{1,8}){0,2}@[A-Za-z0-9-]{1,70}(\.[A-Za-z0-9-]{1,70}){0,4}",
        fullmatch=True,
    )
)
def test_bare_address_fast_path_parses_as_the_stdlib_does(value: str) -> None:
    assert parse_mailbox(value) == _parse_with_stdlib(value)


@given(st.text(alphabet=_ATEXT + '.@ <>"(),;:[]\\é', max_size=40))
def test_any_short_text_parses_as_the_stdlib_does(value: str) -> None:
    assert parse_mailbox(value) == _parse_with_stdlib(value)
