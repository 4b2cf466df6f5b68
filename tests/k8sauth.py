"""Kubernetes service-account logins for tests, without Kubernetes.

OpenBao's kubernetes auth method validates a token by calling the TokenReview API.
:class:`TokenReviewServer` serves that one endpoint (a fake of Kubernetes, never of
OpenBao): it checks the JWT's signature with the test's RSA key, as the API server
would, and answers with the service account the claims name.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    header = {"alg": "RS256", "typ": "JWT", "kid": "test"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def fresh_claims(iss: str, sub: str, aud: str | list[str]) -> dict[str, Any]:
    """Registered claims for a token issued now, valid for five minutes."""
    now = int(time.time())
    return {"iss": iss, "sub": sub, "aud": aud, "iat": now, "nbf": now - 5, "exp": now + 300}


def service_account_claims(namespace: str, name: str) -> dict[str, Any]:
    """What a projected service-account token of ``namespace/name`` says."""
    return {
        **fresh_claims(
            "https://kubernetes.default.svc",
            f"system:serviceaccount:{namespace}:{name}",
            ["https://kubernetes.default.svc"],
        ),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": "6f1f4d0a-0000-4000-8000-000000000001"},
        },
    }


def verify_jwt(key: rsa.RSAPublicKey, token: str) -> dict[str, Any] | None:
    try:
        head, body, sig = token.split(".")
        key.verify(
            base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)),
            f"{head}.{body}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except Exception:  # any failure: not authenticated
        return None
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims


def self_signed_pem(key: rsa.RSAPrivateKey) -> str:
    """A CA certificate for the method's config; unused over plain http, but required."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-kubernetes-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def review_answer(key: rsa.RSAPublicKey, token: str) -> dict[str, Any]:
    """The TokenReview the API server would return for ``token``."""
    claims = verify_jwt(key, token)
    status: dict[str, Any] = {"authenticated": False}
    if claims:
        sa = claims["kubernetes.io"]
        status = {
            "authenticated": True,
            "user": {
                "username": claims["sub"],
                "uid": sa["serviceaccount"]["uid"],
                "groups": ["system:serviceaccounts"],
            },
            "audiences": claims.get("aud", []),
        }
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


class TokenReviewServer:
    """The TokenReview endpoint on 127.0.0.1, in a thread (sync and async tests alike)."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key
        self.reviews: list[str] = []  # "ok" / "refused", in order
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                answer = review_answer(outer.key.public_key(), body["spec"]["token"])
                outer.reviews.append("ok" if answer["status"]["authenticated"] else "refused")
                data = json.dumps(answer).encode()
                self.send_response(200 if self.path == REVIEW_PATH else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> TokenReviewServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(10)

    def configure(self, openbao: Any, mount: str) -> None:
        """Enable kubernetes auth at ``mount`` on ``openbao``, validating against us."""
        root = openbao.client()
        root.sys.enable_auth_method("kubernetes", path=mount)
        root.auth.kubernetes.configure(
            kubernetes_host=self.address,
            kubernetes_ca_cert=self_signed_pem(self.key),
            disable_local_ca_jwt=True,
            mount_point=mount,
        )
