"""A long-polling Amazon SQS client: httpx for I/O, botocore for SigV4 and credentials.

Knows nothing of emailrelay. ``async with await SqsClient.from_environment(queue_url)
as sqs:`` then ``await sqs.receive_messages()`` and ``await sqs.delete_messages(done)``;
every failure of a call is an :class:`SqsError`.
"""

from emailrelay.aws.signing import CredentialSource, FrozenCredentials

from .client import SqsClient, SqsError, SqsMessage
from .endpoints import region_from_queue_url, resolve_endpoint_url, resolve_region

__all__ = [
    "CredentialSource",
    "FrozenCredentials",
    "SqsClient",
    "SqsError",
    "SqsMessage",
    "region_from_queue_url",
    "resolve_endpoint_url",
    "resolve_region",
]
