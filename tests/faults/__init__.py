"""The fault suite (``nox -s faults``): real relays, nats-servers, SMTP and SQS
servers that the tests start, kill and restart, with load running.

The harness lives beside the tests: :mod:`tests.faults.scenario` (one
fault scenario: servers, relays, callers, KV client, and the closing audit;
start there), :mod:`tests.faults.load` (callers with a
10 s timeout, every reply recorded), :mod:`tests.faults.audit` (what the SMTP
server received against what the KV store holds), :mod:`tests.faults.cluster`
(three nats-servers with routes), :mod:`tests.faults.proxy` (an HTTP proxy
that fails on demand, in front of moto) and :mod:`tests.faults.figures` (the
measured figures, printed at the end of the session).
"""
