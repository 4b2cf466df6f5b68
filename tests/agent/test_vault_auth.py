"""Logins (token, token file, AppRole, JWT, Kubernetes), error mapping and token upkeep,
against the session's real OpenBao dev server.

The Kubernetes method validates a service-account token by calling the Kubernetes
TokenReview API; there is no Kubernetes here, so the test serves that one endpoint
itself (``tests/k8sauth.py``, a fake of Kubernetes, not of OpenBao): it checks the JWT's
signature with the test's own RSA key, as the API server would.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from devservers import (
    OpenBaoServer,
    free_port,
    make_test_pki,
)
from k8sauth import TokenReviewServer, fresh_claims, service_account_claims, sign_jwt

from agent import metrics
from agent.config import AuthConfig
from agent.errors import VaultAuthError, VaultNotFound, VaultUnavailable
from agent.leases import Relogin, Renew, Wait

# --------------------------------------------------------------------------- helpers


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- token


async def test_token_login_inline_and_from_file(
    openbao: OpenBaoServer, new_vault: Any, tmp_path: Path
) -> None:
    client = new_vault(openbao.address)
    await client.login()
    assert client.reachable and client.last_error is None
    assert client.token_expires_at is None  # the root token never expires
    await client.close()

    token = openbao.client().auth.token.create(policies=["default"], ttl="1h")["auth"]
    token_file = write_secret_file(tmp_path / "token", token["client_token"])
    client = new_vault(openbao.address, AuthConfig(method="token", token_file=token_file))
    await client.login()
    assert client.token_accessor == token["accessor"]
    assert client.token_expires_at is not None and client.token_expires_at > time.time() + 3000
    # a rotated token file is read again on the next login
    other = openbao.client().auth.token.create(policies=["default"], ttl="1h")["auth"]
    write_secret_file(token_file, other["client_token"])
    await client.login()
    assert client.token_accessor == other["accessor"]
    assert client.token_generation == 1
    await client.close()


async def test_errors_are_mapped_and_never_carry_the_token(
    openbao: OpenBaoServer, new_vault: Any, tmp_path: Path
) -> None:
    bogus = "hvs.not-a-real-token-" + "x" * 10
    client = new_vault(openbao.address, AuthConfig(method="token", token=bogus))
    with pytest.raises(VaultAuthError) as refused:
        await client.login()
    assert bogus not in str(refused.value)
    assert "login" in str(refused.value)
    assert client.reachable  # it answered, it just said no
    await client.close()

    client = new_vault(openbao.address)
    await client.login()
    with pytest.raises(VaultNotFound) as missing:
        await client.read("secret/data/does-not-exist-anywhere")
    assert "secret/data/does-not-exist-anywhere" in str(missing.value)
    with pytest.raises(VaultNotFound):
        await client.renew_lease("database/creds/nothing/abc", 5)
    await client.close()

    before = metrics.vault_errors_total.labels(operation="login", kind="unavailable")._value.get()
    client = new_vault(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VaultUnavailable):
        await client.login()
    assert not client.reachable
    assert client.last_error is not None and "login" in client.last_error
    after = metrics.vault_errors_total.labels(operation="login", kind="unavailable")._value.get()
    assert after == before + 1
    await client.close()

    client = new_vault(
        openbao.address, AuthConfig(method="token", token_file=tmp_path / "absent-token")
    )
    with pytest.raises(VaultAuthError, match="absent-token"):
        await client.login()
    await client.close()


# --------------------------------------------------------------------------- approle


def approle(openbao: OpenBaoServer, mount: str, policies: list[str], **ttl: str) -> tuple[str, str]:
    root = openbao.client()
    root.sys.enable_auth_method("approle", path=mount)
    root.auth.approle.create_or_update_approle(
        "agent", token_policies=policies, mount_point=mount, **ttl
    )
    role_id = root.auth.approle.read_role_id("agent", mount_point=mount)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("agent", mount_point=mount)["data"][
        "secret_id"
    ]
    return role_id, secret_id


async def test_approle_login_from_files(
    openbao: OpenBaoServer, new_vault: Any, unique: str, tmp_path: Path
) -> None:
    mount = f"approle-{unique}"
    role_id, secret_id = approle(openbao, mount, ["default"], token_ttl="60s")
    auth = AuthConfig(
        method="approle",
        role_id_file=write_secret_file(tmp_path / "role_id", role_id),
        secret_id_file=write_secret_file(tmp_path / "secret_id", secret_id),
        mount=mount,
    )
    client = new_vault(openbao.address, auth)
    await client.login()
    assert client.token_expires_at is not None
    assert 50 < client.token_expires_at - time.time() <= 61
    await client.close()

    wrong = AuthConfig(method="approle", role_id=role_id, secret_id="wrong-secret-id", mount=mount)
    client = new_vault(openbao.address, wrong)
    with pytest.raises(VaultAuthError) as refused:
        await client.login()
    assert "wrong-secret-id" not in str(refused.value)
    await client.close()


# --------------------------------------------------------------------------- jwt


async def test_jwt_login_with_a_token_the_test_signed(
    openbao: OpenBaoServer, new_vault: Any, unique: str, tmp_path: Path, rsa_key: Any
) -> None:
    mount = f"jwt-{unique}"
    root = openbao.client()
    root.sys.enable_auth_method("jwt", path=mount)
    root.auth.jwt.configure(
        jwt_validation_pubkeys=[public_pem(rsa_key)], bound_issuer="https://issuer.test", path=mount
    )
    root.auth.jwt.create_role(
        name="agent",
        role_type="jwt",
        user_claim="sub",
        bound_audiences=["credsidecar"],
        allowed_redirect_uris=[],
        token_policies=["default"],
        token_ttl="60s",
        path=mount,
    )
    claims = fresh_claims("https://issuer.test", "app", "credsidecar")
    jwt_file = write_secret_file(tmp_path / "jwt", sign_jwt(rsa_key, claims))
    client = new_vault(
        openbao.address, AuthConfig(method="jwt", role="agent", jwt_file=jwt_file, mount=mount)
    )
    await client.login()
    assert client.token_expires_at is not None
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_secret_file(jwt_file, sign_jwt(other_key, claims))
    with pytest.raises(VaultAuthError):
        await client.login()  # a token signed by someone else is refused
    await client.close()


# --------------------------------------------------------------------------- kubernetes


async def test_kubernetes_login_against_a_token_review_endpoint(
    openbao: OpenBaoServer, new_vault: Any, unique: str, tmp_path: Path, rsa_key: Any
) -> None:
    reviews = TokenReviewServer(rsa_key).start()
    try:
        mount = f"k8s-{unique}"
        await asyncio.to_thread(reviews.configure, openbao, mount)
        openbao.client().auth.kubernetes.create_role(
            "agent",
            bound_service_account_names=["app"],
            bound_service_account_namespaces=["shop"],
            policies=["default"],
            ttl="60s",
            mount_point=mount,
        )
        claims = service_account_claims("shop", "app")
        jwt_file = write_secret_file(tmp_path / "sa-token", sign_jwt(rsa_key, claims))
        auth = AuthConfig(method="kubernetes", role="agent", jwt_file=jwt_file, mount=mount)
        client = new_vault(openbao.address, auth)
        await client.login()
        assert client.token_expires_at is not None
        assert reviews.reviews == ["ok"]

        forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_secret_file(jwt_file, sign_jwt(forged, claims))
        with pytest.raises(VaultAuthError):
            await client.login()
        assert reviews.reviews == ["ok", "refused"]
        await client.close()
    finally:
        reviews.stop()


# --------------------------------------------------------------------------- token upkeep


async def test_token_is_renewed_then_replaced_past_its_max_ttl_without_losing_leases(
    openbao: OpenBaoServer,
    database_mount: Any,
    new_vault: Any,
    unique: str,
    events: Any,
    until: Any,
    run: Any,
    make_source: Any,
    pg_login: Any,
) -> None:
    db = database_mount(ttl="6s", max_ttl="10m")
    policy = f"""
    path "{db}/creds/app" {{ capabilities = ["read"] }}
    path "sys/leases/renew" {{ capabilities = ["update"] }}
    path "sys/leases/lookup" {{ capabilities = ["update"] }}
    path "sys/leases/revoke" {{ capabilities = ["update"] }}
    """
    openbao.client().sys.create_or_update_policy(f"agent-{unique}", policy)
    role_id, secret_id = approle(
        openbao, f"approle-{unique}", [f"agent-{unique}"], token_ttl="6s", token_max_ttl="12s"
    )
    auth = AuthConfig(
        method="approle", role_id=role_id, secret_id=secret_id, mount=f"approle-{unique}"
    )
    client = new_vault(openbao.address, auth)
    await client.login()
    keeper = asyncio.create_task(client.keep_token_fresh())
    source, published = make_source("db", "database", f"{db}/creds/app", vault=client)
    try:
        first = await source.start()
        async with run(source):
            # two re-logins: well past the first token's max TTL of 12 s
            await until(lambda: len(events.named("token_relogin")) >= 2, 60, "two re-logins")
            replaced = events.named("replaced", secret="db")
            assert replaced, "leases of the old token were not replaced before it died"
            current = source.current
            await until(
                lambda: source.current.lease_id != first.lease_id, 30, "a lease of the new token"
            )
            current = source.current
            assert await pg_login(current.data["username"], current.data["password"])
        assert events.named("token_renewed"), "the token was never renewed before re-login"
        assert not events.named("lease_lost"), "a lease died with its token"
        assert not keeper.done()
        assert published.values
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await client.close()


async def test_token_decisions_follow_the_injected_clock_without_sleeping(
    openbao: OpenBaoServer, new_vault: Any, unique: str, clock: Any
) -> None:
    mount = f"approle-{unique}"
    role_id, secret_id = approle(openbao, mount, ["default"], token_ttl="1h", token_max_ttl="4h")
    auth = AuthConfig(method="approle", role_id=role_id, secret_id=secret_id, mount=mount)
    client = new_vault(openbao.address, auth, clock)
    await client.login()  # a real token, scheduled on the fake clock
    try:
        step = client.next_token_step()
        assert isinstance(step, Wait) and 0.5 * 3600 < step.seconds < 0.8 * 3600
        clock.advance(0.8 * 3600)
        assert isinstance(client.next_token_step(), Renew)
        assert client.token_expires_at == pytest.approx(clock.now - 0.8 * 3600 + 3600)
    finally:
        await client.close()

    # a token that cannot be renewed is replaced by a new login when due
    token = openbao.client().auth.token.create(policies=["default"], ttl="1h", renewable=False)
    client = new_vault(
        openbao.address, AuthConfig(method="token", token=token["auth"]["client_token"]), clock
    )
    await client.login()
    try:
        assert isinstance(client.next_token_step(), Wait)
        clock.advance(0.8 * 3600)
        assert isinstance(client.next_token_step(), Relogin)
    finally:
        await client.close()


# --------------------------------------------------------------------------- tls


def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) paths."""
    paths = make_test_pki(tmp_path, "127.0.0.1")
    return paths["ca"], paths["cert"], paths["key"]


async def test_tls_ca_cert_and_skip_verify_are_honoured(
    openbao: OpenBaoServer, tmp_path: Path, relay_class: Any
) -> None:
    import ssl

    from agent.config import VaultConfig
    from agent.vault.client import VaultClient

    ca, cert, key = tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    relay = relay_class(openbao.port, tls=context)
    await relay.start()
    root = AuthConfig(method="token", token="devroot")
    try:
        client = VaultClient(VaultConfig(address=relay.address, auth=root, ca_cert=ca, timeout=5))
        await client.login()
        assert client.reachable
        await client.close()

        # without our CA the server is not trusted: an error, never a silent fallback
        client = VaultClient(VaultConfig(address=relay.address, auth=root, timeout=5))
        with pytest.raises(VaultUnavailable, match="TLS certificate rejected"):
            await client.login()
        await client.close()

        client = VaultClient(
            VaultConfig(address=relay.address, auth=root, tls_skip_verify=True, timeout=5)
        )
        await client.login()
        await client.close()
    finally:
        await relay.cut()


# --------------------------------------------------------------------------- revoked token


async def test_a_revoked_token_is_replaced_by_a_new_login(
    openbao: OpenBaoServer, new_vault: Any, unique: str, events: Any, until: Any
) -> None:
    mount = f"approle-{unique}"
    role_id, secret_id = approle(openbao, mount, ["default"], token_ttl="1h")
    client = new_vault(
        openbao.address,
        AuthConfig(method="approle", role_id=role_id, secret_id=secret_id, mount=mount),
    )
    await client.login()
    keeper = asyncio.create_task(client.keep_token_fresh())
    try:
        first = client.token_accessor
        await asyncio.to_thread(openbao.client().auth.token.revoke_accessor, first)
        with pytest.raises(VaultAuthError):  # the next request notices...
            await client.read("auth/token/lookup-self")
        # ...and the keeper logs in again instead of waiting for the renewal time
        await until(lambda: client.token_accessor != first, 30, "a new token")
        assert (await client.read("auth/token/lookup-self"))["data"]["accessor"] != first
        assert events.named("token_relogin", method="approle")
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await client.close()
