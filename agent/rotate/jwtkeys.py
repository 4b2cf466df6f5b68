"""JWT signing keys: a new EC or RSA key each period; the JWKS carries the current
and the previous public key until ``grace`` has passed, so tokens signed with the
previous key still verify. Key ids are RFC 7638 thumbprints: stable and distinct.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.rotate.base import Fields, RotationError, Rotator
from agent.rotate.store import Record

_CURVES = {"ES256": (ec.SECP256R1(), hashes.SHA256()), "ES384": (ec.SECP384R1(), hashes.SHA384())}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint(n: int, size: int | None = None) -> str:
    return _b64url(n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big"))


def public_jwk(key: Any) -> dict[str, str]:
    """The public JWK (RFC 7517/7518) of a private or public EC/RSA key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[public.curve.name]
        return {
            "kty": "EC",
            "crv": crv,
            "x": _uint(numbers.x, size),
            "y": _uint(numbers.y, size),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rn = public.public_numbers()
        return {"kty": "RSA", "n": _uint(rn.n), "e": _uint(rn.e)}
    raise RotationError(f"unsupported key type {type(public).__name__}")


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without whitespace."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def load_public(jwk: Mapping[str, str]) -> Any:
    if jwk["kty"] == "EC":
        curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}[jwk["crv"]]
        x, y = (int.from_bytes(_unb64url(jwk[k]), "big") for k in ("x", "y"))
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    n, e = (int.from_bytes(_unb64url(jwk[k]), "big") for k in ("n", "e"))
    return rsa.RSAPublicNumbers(e, n).public_key()


class JwtKeysRotator(Rotator):
    def _generate(self) -> Any:
        if self.config.algorithm == "RS256":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return ec.generate_private_key(_CURVES[self.config.algorithm][0])

    async def create(self, record: Record) -> Fields:
        key = self._generate()
        jwk = public_jwk(key)
        kid = thumbprint(jwk)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        alg = self.config.algorithm
        return {"private_key": pem, "kid": kid, "algorithm": alg, "jwk": {**jwk, "kid": kid}}

    async def verify(self, new: Mapping[str, Any]) -> None:
        """Sign with the private key, check with the published JWK: the pair must match."""
        key = serialization.load_pem_private_key(str(new["private_key"]).encode(), None)
        public = load_public(new["jwk"])
        message = b"credsidecar rotation check"
        try:
            if isinstance(key, rsa.RSAPrivateKey):
                signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
                public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                digest = _CURVES[self.config.algorithm][1]
                public.verify(key.sign(message, ec.ECDSA(digest)), message, ec.ECDSA(digest))
            else:
                raise RotationError(f"unsupported key type {type(key).__name__}")
        except InvalidSignature:
            raise RotationError("the public JWK does not match the private key") from None
        if thumbprint(new["jwk"]) != new["kid"]:
            raise RotationError("the kid is not the key's thumbprint")

    def keep_previous(self, current: Mapping[str, Any]) -> Fields:
        # only the public half is kept: the previous key verifies, it never signs again
        return {k: v for k, v in current.items() if k != "private_key"}

    def view(self, record: Record) -> Fields:
        current = dict(record.current or {})
        keys = [{**current["jwk"], "alg": current["algorithm"], "use": "sig"}] if current else []
        if record.previous and not record.retired:
            prev = record.previous
            keys.append({**prev["jwk"], "alg": prev["algorithm"], "use": "sig"})
        return {
            "private_key": current.get("private_key"),
            "kid": current.get("kid"),
            "algorithm": current.get("algorithm"),
            "jwks": json.dumps({"keys": keys}, sort_keys=True),
            "kids": [k["kid"] for k in keys],
        }
