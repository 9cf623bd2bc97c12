"""Where to send SQS requests: the signing region and the endpoint URL.

Pure functions of a queue URL and an environment mapping, so the rules can be
tested without touching botocore or the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from emailrelay.aws.endpoints import resolve_region as _resolve_region
from emailrelay.aws.endpoints import service_endpoint_url

__all__ = ["region_from_queue_url", "resolve_endpoint_url", "resolve_region"]

# sqs.<region>.amazonaws.com[.cn], and the legacy <region>.queue.amazonaws.com[.cn].
_QUEUE_HOST = re.compile(
    r"^(?:sqs\.(?P<region>[a-z0-9-]+)|(?P<legacy>[a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?$"
)


def region_from_queue_url(queue_url: str) -> str | None:
    """The region named by an AWS queue URL's host, or None for any other host."""
    host = (urlsplit(queue_url).hostname or "").lower()
    match = _QUEUE_HOST.match(host)
    if match is None:
        return None
    return match.group("region") or match.group("legacy")


def resolve_region(
    queue_url: str,
    environ: Mapping[str, str],
    configured_region: str | None = None,
) -> str | None:
    """The region to sign for, in the order the AWS SDKs use.

    ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then ``configured_region`` (the
    region of the active profile in the shared config file), then the region in
    the queue URL's host. None when nothing names one.
    """
    return _resolve_region(environ, configured_region, region_from_queue_url(queue_url))


def resolve_endpoint_url(region: str, environ: Mapping[str, str]) -> str:
    """The SQS endpoint, honouring the AWS SDKs' endpoint override variables.

    ``AWS_ENDPOINT_URL_SQS``, then ``AWS_ENDPOINT_URL``, unless
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true; else the regional endpoint
    ``https://sqs.<region>.amazonaws.com`` (``.amazonaws.com.cn`` in China).
    """
    return service_endpoint_url("SQS", "sqs", region, environ)
