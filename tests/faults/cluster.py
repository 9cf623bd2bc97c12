"""Three nats-servers in one cluster: routes on loopback, JetStream on each,
buckets replicated three times (``KV_REPLICAS=3``).

Any node can be killed (``kill -9``) and restarted with its port and store;
:meth:`NatsCluster.stream_leader` asks the JetStream API which node leads a
stream. A relay given one node's URL connects there first: that is "its own
node" (it learns the others from the cluster and reconnects to them).
"""

from __future__ import annotations

import contextlib
import json
from types import TracebackType
from typing import Self

from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.waiting import LOOPBACK, free_ports, wait_until

CLUSTER_NAME = "faults"

LAME_DUCK = """
lame_duck_grace_period: "1s"
lame_duck_duration: "30s"
"""
"""Production's lame duck mode, with a shorter grace (nats-server's default
is 10 s; 30 s is the shortest duration it takes): a node stopped with
:meth:`NatsServer.stop_in_lame_duck_mode` closes its clients one a second
after a 1 s grace."""


class NatsCluster:
    def __init__(self, size: int = 3) -> None:
        route_ports = free_ports(size)
        routes = [f"nats://{LOOPBACK}:{port}" for port in route_ports]
        self.nodes: dict[str, NatsServer] = {}
        for n, port in enumerate(route_ports):
            name = f"n{n + 1}"
            others = ",".join(route for m, route in enumerate(routes) if m != n)
            self.nodes[name] = NatsServer(
                extra_args=(
                    "--server_name",
                    name,
                    "--cluster_name",
                    CLUSTER_NAME,
                    "--cluster",
                    f"nats://{LOOPBACK}:{port}",
                    "--routes",
                    others,
                ),
                startup_timeout=30.0,
                config=LAME_DUCK,
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    def start(self) -> None:
        # A clustered JetStream server is healthy only once it has a quorum.
        for node in self.nodes.values():
            node.start(wait=False)
        for node in self.nodes.values():
            node.wait_healthy()

    def stream_leader(self, client: SyncNats, stream: str, timeout: float = 30.0) -> str:
        """The name of the node leading ``stream`` (JetStream API, stream info), once
        the stream has one (after a node was lost, an election may be under way)."""
        leader: list[str] = []

        def elected() -> bool:
            try:
                reply = client.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
            except Exception:  # the client reconnecting, the API not answering yet
                return False
            name = json.loads(reply).get("cluster", {}).get("leader")
            if name:
                leader[:] = [str(name)]
            return bool(name)

        wait_until(elected, timeout=timeout, interval=0.2, message=f"{stream} has no leader")
        return leader[0]

    def move_leader_off(self, client: SyncNats, stream: str, node: str) -> str:
        """Ask ``stream``'s leader to step down until a node other than ``node``
        leads it (JetStream API, leader stepdown); the new leader's name."""
        leader = self.stream_leader(client, stream)
        for _ in range(10):
            if leader != node:
                return leader
            # The API may not answer while the leader changes.
            with contextlib.suppress(Exception):
                client.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
            wait_until(
                lambda old=leader: self.stream_leader(client, stream) != old,  # type: ignore[misc]
                timeout=15,
                interval=0.2,
                message=f"{stream}: {leader} did not step down",
            )
            leader = self.stream_leader(client, stream)
        raise AssertionError(f"{stream} kept coming back to {node}")

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
