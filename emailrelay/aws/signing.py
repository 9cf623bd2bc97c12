"""What is taken from botocore: the standard credential chain and SigV4 signing.

botocore ships no type hints, so every call into it lives here, behind small
typed shapes. Everything in this module may block (reading config files,
fetching credentials from STS or instance metadata): call it from a worker
thread, except :func:`sign_request`, which is pure computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import botocore.session  # type: ignore[import-untyped]
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

__all__ = [
    "CredentialSource",
    "DefaultChain",
    "FrozenCredentials",
    "load_default_chain",
    "sign_request",
]


class FrozenCredentials(Protocol):
    """One consistent set of keys (botocore's ``ReadOnlyCredentials``)."""

    @property
    def access_key(self) -> str: ...

    @property
    def secret_key(self) -> str: ...

    @property
    def token(self) -> str | None: ...


class CredentialSource(Protocol):
    """Anything that hands out current keys: botocore's ``Credentials`` and
    ``RefreshableCredentials`` both do. ``get_frozen_credentials`` may block
    while it refreshes (STS, instance metadata), so it is called in a thread.
    """

    def get_frozen_credentials(self) -> FrozenCredentials: ...


@dataclass(frozen=True)
class DefaultChain:
    """What botocore's default session found: credentials and profile region."""

    credentials: CredentialSource | None
    profile_region: str | None


def load_default_chain() -> DefaultChain:
    """Resolve botocore's standard credential chain. Blocking.

    Environment keys, the shared credentials and config files (``AWS_PROFILE``,
    SSO, ``credential_process``), a web identity token file (EKS IRSA:
    ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``), container credentials
    (ECS, EKS Pod Identity) and instance metadata, in botocore's order.
    Temporary credentials come back as ``RefreshableCredentials``, which renew
    themselves before they expire.
    """
    session = botocore.session.get_session()
    credentials = session.get_credentials()
    region = session.get_config_variable("region")
    return DefaultChain(
        credentials=credentials,
        profile_region=region if isinstance(region, str) and region else None,
    )


def sign_request(
    credentials: FrozenCredentials,
    region: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    service: str = "sqs",
) -> dict[str, str]:
    """The headers of a POST of ``body`` to ``url``, signed with SigV4 for
    ``service`` (the signing name: ``sqs``, ``ses`` for the SES v2 API).

    Returns ``headers`` plus ``X-Amz-Date``, ``Authorization`` and, for
    temporary credentials, ``X-Amz-Security-Token``. The body sent must be
    exactly ``body``. The ``Host`` header is derived from ``url`` the same way
    HTTP clients derive it (lower case, default port omitted).
    """
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    SigV4Auth(credentials, service, region).add_auth(request)
    return {str(name): str(value) for name, value in request.headers.items()}
