"""decode_batch_get_reply: one message of a JetStream ``multi_last`` batch
direct get (ADR-31), decoded without a server. The batch get itself is proven
against nats-server in test_store.py."""

from __future__ import annotations

from emailrelay.bridge.nats import BatchEnd, decode_batch_get_reply
from emailrelay.store.kv import Entry


def test_a_message_is_its_subjects_last_entry() -> None:
    headers = {"Nats-Subject": "$KV.b.k1", "Nats-Sequence": "42"}
    assert decode_batch_get_reply(headers, b"v") == ("$KV.b.k1", Entry(value=b"v", revision=42))


def test_a_deleted_key_is_absent() -> None:
    headers = {"Nats-Subject": "$KV.b.k1", "Nats-Sequence": "7", "KV-Operation": "DEL"}
    assert decode_batch_get_reply(headers, b"") is None


def test_a_purged_key_is_absent() -> None:
    headers = {"Nats-Subject": "$KV.b.k1", "Nats-Sequence": "7", "KV-Operation": "PURGE"}
    assert decode_batch_get_reply(headers, b"") is None


def test_status_204_ends_the_batch() -> None:
    assert decode_batch_get_reply({"Status": "204"}, b"") == BatchEnd("204")


def test_status_404_ends_a_batch_that_found_nothing() -> None:
    assert decode_batch_get_reply({"Status": "404"}, b"") == BatchEnd("404")


def test_a_failure_status_ends_the_batch_with_it() -> None:
    assert decode_batch_get_reply({"Status": "503"}, b"") == BatchEnd("503")
