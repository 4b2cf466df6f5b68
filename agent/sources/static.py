"""Static database roles (``database/static-creds/<role>``).

Vault rotates the password itself every ``rotation_period``; the answer's ``ttl``
says when the next rotation is due, so the source reads again just after it and
publishes the new password. The version is Vault's ``last_vault_rotation``.
"""

from __future__ import annotations

from agent.secret import SecretValue
from agent.sources.polling import PollingSource
from agent.vault.responses import Answer

SLOP = 0.5  # read this long after the rotation is due: Vault needs a moment to do it
MIN_RECHECK = 1.0  # not rotated yet when we looked: look again this soon


class StaticDatabaseSource(PollingSource):
    operation = "static_creds"

    async def fetch(self) -> SecretValue:
        response = await self.vault.read(self.config.path, self.operation)
        data = Answer(self.operation, self.config.path, response).block("data")
        fields = {"password": data.string("password")}
        if (username := data.optional_string("username")) is not None:
            fields["username"] = username
        now = self.context.clock()
        ttl = data.number("ttl")
        period = data.number("rotation_period")
        expires_at = None  # a role rotated only on demand has no schedule
        if period > 0:
            # ttl 0 means the rotation is overdue (Vault's queue is late): due now,
            # so next_check looks again shortly instead of in the default 300 s
            expires_at = now + max(ttl, 0.0)
        return SecretValue(
            name=self.name,
            data=fields,
            version=data.optional_string("last_vault_rotation") or "",
            issued_at=now,
            expires_at=expires_at,
            lease_duration=period or None,
        )

    def next_check(self, value: SecretValue, now: float) -> float:
        if self.config.refresh is not None and value.expires_at is None:
            return self.config.refresh
        remaining = value.remaining(now)
        if remaining is None:
            return 300.0
        return max(remaining + SLOP, MIN_RECHECK if remaining <= 0 else 0.0)
