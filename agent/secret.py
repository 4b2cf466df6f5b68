"""The value a source publishes: the secret's fields plus non-secret lease metadata."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SecretValue:
    """One version of one secret.

    ``data`` holds the secret fields (never logged). Everything else is metadata
    that may appear in logs, ``/status`` and metrics.
    """

    name: str
    data: Mapping[str, Any] = field(repr=False)
    version: str  # lease id, KV version, certificate serial, file mtime: not secret
    issued_at: float = field(default_factory=time.time)  # wall clock, epoch seconds
    expires_at: float | None = None  # when the credential stops working; None = no expiry
    lease_id: str | None = None
    lease_duration: float | None = None
    renewable: bool = False

    def remaining(self, now: float | None = None) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)

    def template_view(self) -> dict[str, Any]:
        """What templates see as ``secrets.<name>``: the fields plus ``lease`` metadata."""
        view: dict[str, Any] = {
            "lease": {
                "id": self.lease_id,
                "duration": self.lease_duration,
                "renewable": self.renewable,
                "issued_at": self.issued_at,
                "expires_at": self.expires_at,
                "version": self.version,
            }
        }
        view.update(self.data)
        return view

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows: never the values, only names of fields and metadata."""
        return {
            "version": self.version,
            "fields": sorted(self.data),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "lease_id": self.lease_id,
            "renewable": self.renewable,
        }
