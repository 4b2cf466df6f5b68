"""Password authentication, both directions, sans I/O.

:class:`UpstreamAuthenticator` answers a server's ``Authentication*`` requests as a
client (SCRAM-SHA-256 through ``scramp``, MD5, cleartext). :class:`ScramVerifier`
checks a client's SCRAM-SHA-256 exchange against a stored verifier; it is written out
here because libpq sends an empty ``n=`` user name in client-first, which scramp's
server rejects. Nothing here logs or puts a password in an exception message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

import scramp

from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.errors import AuthenticationFailed, ClientProtocolViolation

SCRAM = "SCRAM-SHA-256"
DEFAULT_SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
DEFAULT_ITERATIONS = 4096


def md5_password(username: str, password: str, salt: bytes) -> bytes:
    """The MD5 password message payload: ``md5`` + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + username).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


class UpstreamAuthenticator:
    """Turns each authentication request of the server into the reply to send."""

    def __init__(self, username: str, password: str, *, cleartext_allowed: bool) -> None:
        self._username = username
        self._password = password
        self._cleartext_allowed = cleartext_allowed
        self._scram: scramp.ScramClient | None = None
        self.method: str | None = None

    def respond(self, request: ev.AuthenticationRequest) -> ev.PasswordMessage | None:
        """The message to send back, or ``None`` when nothing is owed (SASL final)."""
        code = request.code
        if code == m.AUTH_CLEARTEXT:
            if not self._cleartext_allowed:
                raise AuthenticationFailed(
                    "upstream asked for a cleartext password over an unencrypted connection;"
                    " refused (set upstream.allow_cleartext to permit)",
                    "28000",
                )
            self.method = "password"
            return ev.PasswordMessage(self._password.encode() + b"\0")
        if code == m.AUTH_MD5:
            if len(request.payload) != 4:
                raise AuthenticationFailed("upstream sent a malformed MD5 salt", "08P01")
            self.method = "md5"
            return ev.PasswordMessage(md5_password(self._username, self._password, request.payload))
        if code == m.AUTH_SASL:
            mechanisms = [x for x in request.payload.split(b"\0") if x]
            if SCRAM.encode() not in mechanisms:
                raise AuthenticationFailed(
                    f"upstream offers no supported SASL mechanism: {mechanisms!r}", "28000"
                )
            self.method = "scram-sha-256"
            # PostgreSQL ignores the SCRAM user name (the startup user counts)
            self._scram = scramp.ScramClient([SCRAM], self._username or "-", self._password)
            first = self._scram.get_client_first().encode()
            return ev.PasswordMessage(m.cstr(SCRAM) + len(first).to_bytes(4, "big") + first)
        if code == m.AUTH_SASL_CONTINUE and self._scram is not None:
            try:
                self._scram.set_server_first(request.payload.decode())
                return ev.PasswordMessage(self._scram.get_client_final().encode())
            except (scramp.ScramException, UnicodeDecodeError) as exc:
                raise AuthenticationFailed(f"SCRAM exchange failed: {exc}", "08P01") from None
        if code == m.AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(request.payload.decode())
            except (scramp.ScramException, UnicodeDecodeError):
                raise AuthenticationFailed(
                    "upstream server's SCRAM signature is invalid", "28000"
                ) from None
            return None
        raise AuthenticationFailed(f"unsupported authentication request code {code}", "28000")


# --- server side: verifying a client ----------------------------------------------


@dataclass(frozen=True)
class ScramSecret:
    """A SCRAM-SHA-256 verifier, as PostgreSQL stores it in ``pg_authid``."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    known: bool = True  # False: a mock for a user that does not exist (always fails)

    @classmethod
    def parse(cls, text: str) -> ScramSecret:
        """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts)."""
        try:
            scheme, params, keys = text.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            if scheme != SCRAM:
                raise ValueError(scheme)
            return cls(
                int(iterations),
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except ValueError:
            raise ValueError("not a SCRAM-SHA-256 verifier") from None

    @classmethod
    def from_password(cls, password: str, iterations: int = DEFAULT_ITERATIONS) -> ScramSecret:
        salt, stored, server, iters = scramp.ScramMechanism(SCRAM).make_auth_info(
            password, iteration_count=iterations, salt=os.urandom(DEFAULT_SALT_LEN)
        )
        return cls(int(iters), bytes(salt), bytes(stored), bytes(server))

    @classmethod
    def mock(cls, key: bytes, user: str, salt_len: int, iterations: int) -> ScramSecret:
        """What an unknown ``user`` is answered with, like PostgreSQL's ``scram_mock_salt``:
        derived from a secret ``key`` and the name, so every attempt sees the same salt,
        and shaped (salt length, iterations) like the real verifiers."""

        def derive(label: bytes, size: int) -> bytes:
            # SHAKE with the key in front is a PRF (no length extension)
            return hashlib.shake_256(key + label + user.encode()).digest(size)

        return cls(
            iterations,
            derive(b"salt\0", salt_len),
            derive(b"stored\0", 32),
            derive(b"server\0", 32),
            known=False,
        )


def _attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ClientProtocolViolation("malformed SCRAM attribute")
        out.setdefault(part[0], part[2:])
    return out


class ScramVerifier:
    """One SCRAM-SHA-256 exchange against ``secret``; a mock one (an unknown user) gets
    the full exchange too, failing only at the end, so no answer tells who exists."""

    def __init__(self, secret: ScramSecret) -> None:
        self._secret = secret
        self._first_bare = ""
        self._server_first = ""
        self._gs2 = ""
        self._nonce = ""

    def mechanisms(self) -> bytes:
        return m.cstr(SCRAM) + b"\0"

    def client_first(self, payload: bytes) -> bytes:
        """SASLInitialResponse body -> server-first-message."""
        mechanism, offset = m.read_cstr(payload, 0, ClientProtocolViolation)
        if mechanism != SCRAM:
            raise AuthenticationFailed(f"unsupported SASL mechanism {mechanism!r}", "28000")
        length = m.parse_int32(payload, offset, ClientProtocolViolation)
        data = payload[offset + 4 :]
        if length != len(data):
            raise ClientProtocolViolation("SASLInitialResponse length mismatch")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ClientProtocolViolation("SCRAM message is not UTF-8") from None
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):
            raise AuthenticationFailed("SCRAM channel binding is not supported here", "28000")
        self._gs2 = f"{parts[0]},{parts[1]},"
        self._first_bare = parts[2]
        client_nonce = _attrs(self._first_bare).get("r", "")
        if not client_nonce:
            raise ClientProtocolViolation("SCRAM client-first without a nonce")
        self._nonce = client_nonce + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(self._secret.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._secret.iterations}"
        return self._server_first.encode()

    def client_final(self, payload: bytes) -> bytes:
        """SASLResponse body -> server-final-message; raises 28P01 on a wrong password."""
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise ClientProtocolViolation("SCRAM message is not UTF-8") from None
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ClientProtocolViolation("SCRAM client-final without a proof")
        attrs = _attrs(without_proof)
        expected_c = base64.b64encode(self._gs2.encode()).decode()
        if attrs.get("c") != expected_c or attrs.get("r") != self._nonce:
            raise AuthenticationFailed("SCRAM channel binding or nonce mismatch", "28P01")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise ClientProtocolViolation("SCRAM proof is not base64") from None
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(self._secret.stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise AuthenticationFailed("password authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key)
        if not (ok and self._secret.known):
            raise AuthenticationFailed("password authentication failed")
        server_sig = hmac.digest(self._secret.server_key, auth_message, "sha256")
        return b"v=" + base64.b64encode(server_sig)
