"""The region to sign for and a service's endpoint URL, as the AWS SDKs choose them.

Pure functions of an environment mapping, so the rules can be tested without
touching botocore or the network.
"""

from __future__ import annotations

from collections.abc import Mapping

from emailrelay.config import TRUE_WORDS

__all__ = ["env_value", "resolve_region", "service_endpoint_url"]


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """An environment variable, with an empty or blank value read as unset."""
    value = environ.get(name, "").strip()
    return value or None


def resolve_region(
    environ: Mapping[str, str],
    configured_region: str | None = None,
    fallback: str | None = None,
) -> str | None:
    """The region to sign for, in the order the AWS SDKs use.

    ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then ``configured_region``
    (the region of the active profile in the shared config file), then
    ``fallback`` (what the caller can tell from elsewhere, such as an SQS
    queue URL). None when nothing names one.
    """
    return (
        env_value(environ, "AWS_REGION")
        or env_value(environ, "AWS_DEFAULT_REGION")
        or (configured_region.strip() if configured_region else None)
        or fallback
    )


def service_endpoint_url(
    service_env_name: str, host_prefix: str, region: str, environ: Mapping[str, str]
) -> str:
    """A service's endpoint, honouring the AWS SDKs' endpoint override variables.

    ``AWS_ENDPOINT_URL_<service_env_name>`` (``SQS``, ``SESV2``), then
    ``AWS_ENDPOINT_URL``, unless ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is
    true; else the regional endpoint ``https://<host_prefix>.<region>.amazonaws.com``
    (``.amazonaws.com.cn`` in China).
    """
    ignore = (env_value(environ, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() in TRUE_WORDS
    if not ignore:
        override = env_value(environ, f"AWS_ENDPOINT_URL_{service_env_name}") or env_value(
            environ, "AWS_ENDPOINT_URL"
        )
        if override is not None:
            return override
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://{host_prefix}.{region}.{suffix}"
