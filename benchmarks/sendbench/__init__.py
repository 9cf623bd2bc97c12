"""The parts of ``benchmarks/bench_send.py``, each a module with one job.

Every part that is measured runs in a process of its own, so its CPU time
can be read from ``/proc`` and no two parts share a GIL or an event loop:

- ``sink``: the SMTP server (aiosmtpd) with per-message latency;
- ``loadgen``: the callers (plain nats-py on asyncio), N requests, C in flight;
- ``responder`` and ``ceilings``: the ceilings (a trivial responder under the
  relay's trio-asyncio hand-off; the SMTP pool alone; the KV writes of one send);
- ``procs``: starting, timing and measuring those processes and nats-server;
- ``verify`` and ``report``: pure checks and the table, tested over fakes.
"""
