"""What every AWS client of the relay resolves once at start: credentials from
botocore's chain, the profile's region and the CA certificates to trust."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import anyio.to_thread

from emailrelay.aws.signing import CredentialSource, FrozenCredentials, load_default_chain

__all__ = ["AwsSetup", "AwsSetupError", "current_credentials", "load_aws_setup"]


class AwsSetupError(Exception):
    """No usable AWS configuration: the message says what to set."""


@dataclass(frozen=True)
class AwsSetup:
    credentials: CredentialSource
    profile_region: str | None
    verify: ssl.SSLContext | bool


NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE, or a web identity (AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE, "
    "as EKS IRSA does)"
)


async def load_aws_setup(environ: Mapping[str, str]) -> AwsSetup:
    """Credentials from botocore's standard chain (environment, profile, web
    identity token file as with EKS IRSA, container and instance metadata),
    which reads the process environment; ``AWS_CA_BUNDLE`` from ``environ``
    replaces the CA certificates to trust, as in botocore.

    Raises :class:`AwsSetupError` when no credentials can be found. Resolving
    the chain reads files, so it runs in a worker thread."""
    try:
        chain = await anyio.to_thread.run_sync(load_default_chain)
    except Exception as exc:
        raise AwsSetupError(
            f"cannot load the AWS configuration: {type(exc).__name__}: {exc}"
        ) from exc
    if chain.credentials is None:
        raise AwsSetupError(NO_CREDENTIALS)
    verify: ssl.SSLContext | bool = True
    ca_bundle = environ.get("AWS_CA_BUNDLE", "").strip()
    if ca_bundle:
        verify = await anyio.to_thread.run_sync(_ssl_context_with, ca_bundle)
    return AwsSetup(chain.credentials, chain.profile_region, verify)


async def current_credentials(source: CredentialSource) -> FrozenCredentials:
    """The keys to sign with now. Refreshing temporary credentials is blocking
    network I/O (STS, metadata), so it runs in a worker thread; static keys,
    and temporary ones not yet due for refresh, are read at once (a thread
    hop per signed request would cost more than the signing). Any failure
    propagates as it is, for the client to word."""
    refresh_needed = getattr(source, "refresh_needed", None)
    if refresh_needed is None or not refresh_needed():
        return source.get_frozen_credentials()
    return await anyio.to_thread.run_sync(source.get_frozen_credentials, abandon_on_cancel=True)


def _ssl_context_with(ca_bundle: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_bundle)
