"""KV secrets (``secret/data/app``): polled every ``refresh`` (default 5 min).

KV v2 answers carry a version number, which becomes the value's version; a KV v1
path has none, so a change of the data itself counts as a new version.
"""

from __future__ import annotations

from typing import Any

from agent.errors import VaultNotFound
from agent.secret import SecretValue
from agent.sources.polling import PollingSource, refresh_delay

DEFAULT_REFRESH = 300.0


class KvSource(PollingSource):
    operation = "kv_read"
    updated_event = "kv_updated"

    async def fetch(self) -> SecretValue:
        response = await self.vault.read(self.config.path, self.operation)
        body: Any = response.get("data")
        if not isinstance(body, dict):
            raise VaultNotFound(f"{self.operation} {self.config.path}: no data")
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and "data" in body:  # KV v2
            fields = body["data"]
            if not isinstance(fields, dict):  # the current version is deleted or destroyed
                raise VaultNotFound(f"{self.operation} {self.config.path}: current version deleted")
            version = str(metadata.get("version", ""))
        else:
            fields, version = body, "kv1"
        return SecretValue(name=self.name, data=dict(fields), version=version)

    def next_check(self, value: SecretValue, now: float) -> float:
        return refresh_delay(self.config, value, now, DEFAULT_REFRESH)
