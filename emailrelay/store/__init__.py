"""JetStream KV: tracking records and group indexes, written revision-checked."""
