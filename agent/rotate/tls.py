"""TLS certificates from Vault PKI (``pki: pki/issue/<role>``) or, for development,
a local CA (``ca_cert`` + ``ca_key``), renewed at ``renew_fraction`` of their lifetime.

Besides ``certificate``, ``private_key`` and ``chain``, the value has ``bundle``:
key, certificate and chain in one PEM. Rendered to one file it is replaced in one
``os.replace``, so a reader never sees a certificate with another one's key; the
proxy's client-facing TLS can load that single file when it changes.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import VaultError
from agent.rotate.base import Fields, RotationError, Rotator
from agent.rotate.store import Record


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _fields(cert_pem: str, key_pem: str, chain: list[str]) -> Fields:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    chain_pem = "".join(c if c.endswith("\n") else c + "\n" for c in chain)
    cert_text = cert_pem if cert_pem.endswith("\n") else cert_pem + "\n"
    key_text = key_pem if key_pem.endswith("\n") else key_pem + "\n"
    return {
        "certificate": cert_text,
        "private_key": key_text,
        "chain": chain_pem,
        "bundle": key_text + cert_text + chain_pem,
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
    }


class TlsCertRotator(Rotator):
    async def create(self, record: Record) -> Fields:
        if self.config.pki is not None:
            return await self._from_pki()
        return await asyncio.to_thread(self._from_local_ca)

    async def _from_pki(self) -> Fields:
        vault = self.context.vault
        assert vault is not None and self.config.pki is not None
        try:
            response = await vault.write(self.config.pki, dict(self.config.params), "pki_issue")
        except VaultError as exc:
            raise RotationError(str(exc)) from None
        data = response.get("data") or {}
        if "certificate" not in data or "private_key" not in data:
            raise RotationError(f"pki_issue {self.config.pki}: no certificate in the answer")
        chain = list(
            data.get("ca_chain") or ([data["issuing_ca"]] if data.get("issuing_ca") else [])
        )
        return _fields(data["certificate"], data["private_key"], chain)

    def _from_local_ca(self) -> Fields:
        assert self.config.ca_cert is not None and self.config.ca_key is not None
        try:
            ca_pem = self.config.ca_cert.read_bytes()
            ca_key = serialization.load_pem_private_key(self.config.ca_key.read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise RotationError(f"local CA {self.config.ca_cert}: unreadable ({exc})") from None
        ca = x509.load_pem_x509_certificate(ca_pem)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = self.config.common_name or "localhost"
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))
            .not_valid_after(now + datetime.timedelta(seconds=self.config.ttl))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return _fields(_pem(cert), key_pem, [ca_pem.decode()])

    async def verify(self, new: Mapping[str, Any]) -> None:
        """The key matches the certificate, the first chain entry issued it, and it is valid now."""
        cert = x509.load_pem_x509_certificate(str(new["certificate"]).encode())
        key = serialization.load_pem_private_key(str(new["private_key"]).encode(), None)
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, public) != key.public_key().public_bytes(
            der, public
        ):
            raise RotationError("the private key does not match the certificate")
        chain = x509.load_pem_x509_certificates(str(new["chain"]).encode()) if new["chain"] else []
        if chain:
            try:
                cert.verify_directly_issued_by(chain[0])
            except (ValueError, TypeError) as exc:
                raise RotationError(f"the chain did not issue the certificate: {exc}") from None
            except Exception as exc:  # cryptography's InvalidSignature
                raise RotationError(f"bad certificate signature ({type(exc).__name__})") from None
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise RotationError("the new certificate is not valid now")

    def keep_previous(self, current: Mapping[str, Any]) -> Fields:
        return {"serial": current.get("serial"), "not_after": current.get("not_after")}

    def expires_at(self, record: Record) -> float | None:
        value = (record.current or {}).get("not_after")
        return float(value) if value is not None else None

    def due_at(self, record: Record) -> float:
        scheduled = super().due_at(record)
        current = record.current or {}
        if not scheduled or "not_after" not in current:
            return scheduled
        start, end = float(current["not_before"]), float(current["not_after"])
        return min(scheduled, start + self.config.renew_fraction * (end - start))
