"""AWS Secrets Manager: the ``aws-secretsmanager`` source and the client the rotation
store (``agent/rotate/awsstore.py``) shares.

``secret_id`` (a name or ARN) is read at ``version_stage`` (AWSCURRENT) every
``refresh`` (default 5 min). A SecretString holding a JSON object gives its fields as
``secrets.<name>.<field>``; any other string is ``value``, and a binary secret is
``binary`` (base64). The version is AWS's VersionId. Credentials come from the standard
AWS chain (environment, web identity / IRSA, container and instance profiles); a
failure keeps the last good value and is retried with backoff.

aiobotocore (botocore on aiohttp) is imported here only, so configs without AWS never
load it.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from agent.awsconfig import AwsConfig
from agent.config import SecretConfig
from agent.errors import SidecarError
from agent.secret import SecretValue
from agent.sources.base import SourceContext
from agent.sources.polling import PollingSource, refresh_delay

DEFAULT_REFRESH = 300.0
_CLIENT_CONFIG = AioConfig(
    connect_timeout=5,
    read_timeout=15,
    retries={"mode": "standard", "max_attempts": 3},  # botocore's own backoff for throttling
)


class AwsError(SidecarError):
    """An AWS call failed; ``code`` is AWS's error code (or the client's error type)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class SecretsManager:
    """One Secrets Manager client, opened on first use and closed by :meth:`close`."""

    def __init__(self, aws: AwsConfig | None) -> None:
        self.aws = aws or AwsConfig()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def call(self, operation: str, what: str, **params: Any) -> dict[str, Any]:
        """``operation`` (e.g. ``get_secret_value``); AwsError naming ``what`` on failure."""
        try:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client(
                        "secretsmanager",
                        region_name=self.aws.region,
                        endpoint_url=self.aws.endpoint_url,
                        config=_CLIENT_CONFIG,
                    )
                )
                self._stack = stack
            answer: dict[str, Any] = await getattr(self._client, operation)(**params)
            return answer
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "ClientError")
            # AWS messages name the secret and the action, never a secret value
            message = str(error.get("Message") or "")[:200]
            raise AwsError(f"{what}: {code}: {message}".rstrip(": "), code) from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise AwsError(
                f"{what}: {str(exc)[:200] or type(exc).__name__}", type(exc).__name__
            ) from None

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(BotoCoreError, OSError):
                await stack.aclose()


def secret_fields(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a GetSecretValue answer (see the module docstring)."""
    if answer.get("SecretString") is not None:
        text = str(answer["SecretString"])
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        return dict(data) if isinstance(data, dict) else {"value": text}
    if answer.get("SecretBinary") is not None:
        return {"binary": base64.b64encode(bytes(answer["SecretBinary"])).decode()}
    raise SidecarError("the secret version has no value")


class SecretsManagerSource(PollingSource):
    operation = "aws_get_secret"
    uses_vault = False
    failure = SidecarError
    failed_event = "source_failed"

    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self.aws = SecretsManager(config.aws)

    async def fetch(self) -> SecretValue:
        what = f"{self.operation} {self.config.path} ({self.config.version_stage})"
        answer = await self.aws.call(
            "get_secret_value",
            what,
            SecretId=self.config.path,
            VersionStage=self.config.version_stage,
        )
        try:
            data = secret_fields(answer)
        except SidecarError as exc:
            raise SidecarError(f"{what}: {exc}") from None
        return SecretValue(name=self.name, data=data, version=str(answer.get("VersionId", "")))

    def next_check(self, value: SecretValue, now: float) -> float:
        return refresh_delay(self.config, value, now, DEFAULT_REFRESH)

    async def close(self, revoke: bool) -> None:
        await self.aws.close()
