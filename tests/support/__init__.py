"""What the tests share, one module per kind of thing.

- ``servers/``: the real servers the tests start (``nats``, ``smtp``, ``sqs``, ``relay``).
- ``nats_client``: ``SyncNats``, a blocking NATS client for test code.
- ``send_requests``: the one valid send request, and bodies padded to NATS's limit.
- ``handlers``: the three handlers wired over in-memory stores and a recording sender.
- ``fakes``: in-memory stand-ins for the key-value port and bucket host.
- ``jetstream_kv``: real JetStream buckets behind the relay's own adapter, from trio.
- ``tracking_calls``: send / status / analytics calls and record access over NATS.
- ``waiting``: waiting on conditions with deadlines; free loopback ports.
"""
