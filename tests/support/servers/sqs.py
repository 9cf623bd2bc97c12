"""A real SQS API: moto's server (``moto[server]``) on 127.0.0.1, in a thread of the tests.

Queues are created, filled and inspected with boto3 from the test side only;
the code under test talks to :attr:`SqsServer.endpoint_url` over HTTP like it
would to AWS. moto keeps one backend per account and region, picked from the
request's SigV4 credential scope, so clients must sign for :attr:`region`.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3  # type: ignore[import-untyped]
from moto.server import ThreadedMotoServer

from tests.support.waiting import LOOPBACK, wait_for_port, wait_for_port_closed

# Dummy keys: moto accepts any, and explicit keys keep boto3 off the credential chain.
ACCESS_KEY_ID = "AKIDEXAMPLETESTONLY"
SECRET_ACCESS_KEY = "test-secret-not-real"


def relay_aws_env(endpoint_url: str, tmp: Path, region: str = "us-east-1") -> dict[str, str | None]:
    """A relay's AWS environment: dummy keys, a region, ``endpoint_url`` as its SQS
    endpoint, and no config file, credentials file or metadata service to fall back on."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": region,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_SQS": endpoint_url,
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
    }


def relay_eventing_env(
    queue_url: str,
    endpoint_url: str,
    tmp: Path,
    *,
    max_receives: int | None = None,
    region: str = "us-east-1",
) -> dict[str, str | None]:
    """A relay's settings for polling ``queue_url`` at ``endpoint_url`` (SES events on,
    with :func:`relay_aws_env`); add them to ``relay_defaults``."""
    env = {
        "SES_EVENTING_ENABLED": "true",
        "SES_ENGAGEMENT_SQS_QUEUE_URL": queue_url,
        **relay_aws_env(endpoint_url, tmp, region),
    }
    if max_receives is not None:
        env["SES_EVENT_MAX_RECEIVES"] = str(max_receives)
    return env


class SqsServer:
    """moto's server on a free loopback port, serving SQS (and every other mocked service)."""

    def __init__(self, region: str = "us-east-1") -> None:
        self.region = region
        # Port 0: the OS picks a free port when the server binds, with no race.
        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        self._port: int | None = None
        self._boto: Any = None

    @property
    def endpoint_url(self) -> str:
        if self._port is None:
            raise RuntimeError("SqsServer is not started")
        return f"http://{LOOPBACK}:{self._port}"

    def start(self) -> None:
        self._server.start()
        _, self._port = self._server.get_host_and_port()
        wait_for_port(LOOPBACK, self._port)
        self._boto = boto3.client(
            "sqs",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def stop(self) -> None:
        if self._port is None:
            return
        if self._boto is not None:
            self._boto.close()
        self._server.stop()
        wait_for_port_closed(LOOPBACK, self._port)
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def create_queue(self, name: str, visibility_timeout: int = 1) -> str:
        """A new standard queue; its URL. moto's default visibility timeout is 30 s."""
        reply = self._boto.create_queue(
            QueueName=name, Attributes={"VisibilityTimeout": str(visibility_timeout)}
        )
        return str(reply["QueueUrl"])

    def send(self, queue_url: str, body: str) -> str:
        """Send one message; its MessageId."""
        return str(self._boto.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"])

    def queue_depth(self, queue_url: str) -> int:
        """Messages still in the queue: visible plus in flight (received, not deleted)."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        reply = self._boto.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
        return sum(int(reply["Attributes"][name]) for name in names)
