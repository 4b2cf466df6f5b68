"""PKI certificates (``pki/issue/<role>`` with ``params``).

A certificate cannot be renewed, so the source issues a new one at
``renew_fraction`` of the current one's lifetime. ``expires_at`` is the
certificate's notAfter, read from the certificate itself; the version is its serial.
"""

from __future__ import annotations

import logging

from agent.errors import VaultError
from agent.logs import event
from agent.secret import SecretValue
from agent.sources.polling import PollingSource
from agent.vault.responses import Answer


def not_after(pem: str) -> float:
    """The certificate's notAfter as epoch seconds."""
    from cryptography import x509  # only configs with a pki secret pay for it

    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.not_valid_after_utc.timestamp()


class PkiSource(PollingSource):
    operation = "pki_issue"
    updated_event = "issued"
    wake_fetches = False  # a refresh request must not mint a certificate that is not due

    async def fetch(self) -> SecretValue:
        params = dict(self.config.params)
        response = await self.vault.write(self.config.path, params, self.operation)
        answer = Answer(self.operation, self.config.path, response).block("data")
        try:
            expires_at = not_after(answer.string("certificate"))
        except ValueError:
            where = f"{self.operation} {self.config.path}"
            raise VaultError(f"{where}: unreadable certificate") from None
        data = answer.raw
        fields = {
            k: data[k]
            for k in ("certificate", "private_key", "private_key_type", "issuing_ca", "ca_chain")
            if k in data
        }
        now = self.context.clock()
        return SecretValue(
            name=self.name,
            data=fields,
            version=answer.optional_string("serial_number") or "",
            issued_at=now,
            expires_at=expires_at,
            lease_duration=max(0.0, expires_at - now),
        )

    def next_check(self, value: SecretValue, now: float) -> float:
        assert value.expires_at is not None
        lifetime = value.expires_at - value.issued_at
        return max(0.0, value.issued_at + self.config.renew_fraction * lifetime - now)

    async def close(self, revoke: bool) -> None:
        if not revoke or self.current is None or "/issue/" not in self.config.path:
            return
        mount = self.config.path.split("/issue/")[0]
        try:
            await self.vault.write(
                f"{mount}/revoke", {"serial_number": self.current.version}, "pki_revoke"
            )
        except VaultError as exc:
            event("revoke_failed", logging.WARNING, secret=self.name, error=str(exc))
            return
        event("revoked", secret=self.name, version=self.current.version)
