"""JWT signing keys, TLS certificates and command-made API keys, rotated for real."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from devservers import AUDIT, OpenBaoServer, make_test_pki
from procgroups import forking_command, none_left, see_grandchild
from rotatehelpers import config, kv_record, looping, rotation

from agent.rotate.jwtkeys import load_public, thumbprint

# ------------------------------------------------------------------------------ jwt


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
async def test_jwks_holds_current_and_previous_key_until_grace(
    vault: Any, openbao: OpenBaoServer, unique: str, events: Any, until: Any, algorithm: str
) -> None:
    store = f"secret/data/rot-jwt-{unique}-{algorithm}"
    cfg = config("jwt", "jwt-keys", store, every=3600.0, grace=1.5, algorithm=algorithm)
    rot, published = rotation(cfg, vault)
    assert (await rot.rotate_now()).ok
    first = dict(published.last.data)
    assert json.loads(first["jwks"])["keys"][0]["kid"] == first["kid"]

    assert (await rot.rotate_now()).ok
    second = dict(published.last.data)
    keys = json.loads(second["jwks"])["keys"]
    assert [k["kid"] for k in keys] == [second["kid"], first["kid"]]
    assert second["kid"] != first["kid"]
    for key in keys:
        assert key["kid"] == thumbprint(key)  # RFC 7638: stable, derived from the key
        assert key["alg"] == algorithm

    # a token signed with the previous key still verifies against the JWKS
    old_private = serialization.load_pem_private_key(first["private_key"].encode(), None)
    message = b"header.payload"
    old_public = load_public(next(k for k in keys if k["kid"] == first["kid"]))
    if algorithm == "ES256":
        assert isinstance(old_private, ec.EllipticCurvePrivateKey)
        old_public.verify(
            old_private.sign(message, ec.ECDSA(hashes.SHA256())), message, ec.ECDSA(hashes.SHA256())
        )
    else:
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        assert isinstance(old_private, rsa.RSAPrivateKey)
        signature = old_private.sign(message, padding.PKCS1v15(), hashes.SHA256())
        old_public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())

    # the store keeps the new private key, and only the public half of the previous one
    record = kv_record(openbao, store)
    assert record["current"]["private_key"] == second["private_key"]
    assert "private_key" not in record["previous"]

    async with looping(rot):
        await until(lambda: len(json.loads(published.last.data["jwks"])["keys"]) == 1, 30)
    assert json.loads(published.last.data["jwks"])["keys"][0]["kid"] == second["kid"]
    assert published.last.data["private_key"] == second["private_key"]
    assert events.named("rotation_retired", secret="jwt", version=1)


# ------------------------------------------------------------------------------ tls


def make_ca(directory: Path) -> tuple[Path, Path]:
    paths = make_test_pki(directory)
    return paths["ca"], paths["ca_key"]


def check_bundle(bundle: str, ca_pem: bytes | None = None) -> x509.Certificate:
    """The bundle's key matches its certificate, which the bundle's chain issued."""
    key = serialization.load_pem_private_key(bundle.encode(), None)
    certs = x509.load_pem_x509_certificates(bundle.encode())
    leaf, chain = certs[0], certs[1:]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert leaf.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    leaf.verify_directly_issued_by(chain[0])
    if ca_pem is not None:
        assert chain[0] == x509.load_pem_x509_certificate(ca_pem)
    return leaf


async def test_local_ca_certificate_renews_at_a_fraction_of_its_lifetime(
    vault: Any, unique: str, tmp_path: Path, until: Any
) -> None:
    ca_cert, ca_key = make_ca(tmp_path)
    cfg = config(
        "tls",
        "tls-cert",
        f"secret/data/rot-tls-{unique}",
        ca_cert=ca_cert,
        ca_key=ca_key,
        common_name="app.local",
        ttl=6.0,
        renew_fraction=0.4,
        every=3600.0,
        grace=1.0,
    )
    rot, published = rotation(cfg, vault)
    async with looping(rot):
        await until(lambda: published.values, 30, "the first certificate")
        first = published.values[0]
        leaf = check_bundle(first.data["bundle"], ca_cert.read_bytes())
        assert leaf.subject.rfc4514_string() == "CN=app.local"
        assert first.expires_at == pytest.approx(leaf.not_valid_after_utc.timestamp())
        assert first.data["serial"] == format(leaf.serial_number, "x")
        await until(lambda: len(published.values) >= 2, 30, "a renewed certificate")
    second = published.values[1]
    assert second.data["serial"] != first.data["serial"]
    check_bundle(second.data["bundle"], ca_cert.read_bytes())
    # renewed at ~40% of 6 s: well before the first one expired
    assert second.issued_at < (first.expires_at or 0)


async def test_vault_pki_certificate(vault: Any, openbao: OpenBaoServer, unique: str) -> None:
    mount = f"pki-rot-{unique}"
    root = openbao.client()
    root.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "24h"})
    try:
        ca = root.write(f"{mount}/root/generate/internal", common_name="rot test root", ttl="24h")
        root.write(
            f"{mount}/roles/web", allowed_domains="localhost", allow_bare_domains=True, max_ttl="1h"
        )
        cfg = config(
            "tls",
            "tls-cert",
            f"secret/data/rot-pki-{unique}",
            pki=f"{mount}/issue/web",
            params={"common_name": "localhost", "ttl": "10m"},
        )
        rot, published = rotation(cfg, vault)
        assert (await rot.rotate_now()).ok
        AUDIT.secret(published.last.data["private_key"])
        leaf = check_bundle(published.last.data["bundle"], ca["data"]["certificate"].encode())
        assert leaf.subject.rfc4514_string() == "CN=localhost"
        # due at 2/3 of the lifetime, not after `every`
        record = rot.record
        assert record is not None
        lifetime = leaf.not_valid_after_utc.timestamp() - leaf.not_valid_before_utc.timestamp()
        due = rot.rotator.due_at(record)
        assert due == pytest.approx(leaf.not_valid_before_utc.timestamp() + lifetime * 2 / 3)
    finally:
        root.sys.disable_secrets_engine(mount)


# ------------------------------------------------------------------------------ command

PROVIDER = textwrap.dedent(
    """
    # a stand-in API-key provider: create/verify/revoke keys kept in a JSON file
    import json, os, secrets, sys, time
    action, db = sys.argv[1], sys.argv[2]
    request = json.load(sys.stdin)
    keys = json.load(open(db)) if os.path.exists(db) else {"live": [], "calls": []}
    def save():  # whole or not at all: the test reads the file while this runs
        with open(db + ".tmp", "w") as f:
            json.dump(keys, f)
        os.replace(db + ".tmp", db)
    keys["calls"].append({"action": action, "argv": sys.argv[1:], "stdin_keys": sorted(request)})
    if action == "create":
        if os.environ.get("SLOW"):
            time.sleep(30)
        key = "k-" + secrets.token_hex(16)
        keys["live"].append(key)
        print(json.dumps({"api_key": key, "id": len(keys["live"])}))
    elif action == "verify":
        ok = request["new"]["api_key"] in keys["live"] and not os.path.exists(db + ".reject")
        save()
        sys.exit(0 if ok else 3)
    elif action == "revoke":
        if os.path.exists(db + ".norevoke"):
            sys.exit(4)
        keys["live"].remove(request["old"]["api_key"])
    save()
    """
)


def provider(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "provider.py"
    script.write_text(PROVIDER)
    return script, tmp_path / "keys.json"


def command_config(tmp_path: Path, unique: str, **kw: Any) -> Any:
    script, db = provider(tmp_path)

    def cmd(action: str) -> tuple[str, ...]:
        return (sys.executable, str(script), action, str(db))

    return config(
        "apikey",
        "command",
        f"secret/data/rot-cmd-{unique}",
        create=cmd("create"),
        verify=cmd("verify"),
        revoke=cmd("revoke"),
        every=3600.0,
        grace=1.0,
        **kw,
    ), db


async def test_command_creates_verifies_and_revokes_after_grace(
    vault: Any, unique: str, tmp_path: Path, until: Any, events: Any
) -> None:
    cfg, db = command_config(tmp_path, unique)
    rot, published = rotation(cfg, vault)
    assert (await rot.rotate_now()).ok
    first = published.last.data["api_key"]
    assert (await rot.rotate_now()).ok
    second = published.last.data["api_key"]
    assert first != second
    state = json.loads(db.read_text())
    assert state["live"] == [first, second]  # both valid during grace
    # a restarted sidecar (a new process, another owner) resumes the pending retire
    restarted, adopted = rotation(cfg, vault, owner="restarted")
    async with looping(restarted):
        # the revoke command changes the file before the rotator logs its event
        await until(
            lambda: (
                json.loads(db.read_text())["live"] == [second]
                and events.named("rotation_retired", secret="apikey", version=1)
            ),
            30,
            "revoke of k1",
        )
    assert adopted.values[0].data["api_key"] == second
    assert events.named("adopted", secret="apikey", version="2")
    # keys travel on stdin only: never in argv
    for call in json.loads(db.read_text())["calls"]:
        assert not any(first in a or second in a for a in call["argv"])
    revoke = [c for c in json.loads(db.read_text())["calls"] if c["action"] == "revoke"]
    assert revoke[0]["stdin_keys"] == ["name", "old"]


async def test_command_verify_failure_revokes_the_new_key(
    vault: Any, unique: str, tmp_path: Path, events: Any
) -> None:
    cfg, db = command_config(tmp_path, unique)
    rot, published = rotation(cfg, vault)
    assert (await rot.rotate_now()).ok
    kept = published.last.data["api_key"]
    (tmp_path / "keys.json.reject").write_text("")
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "exited with 3" in (outcome.error or "")
    assert json.loads(db.read_text())["live"] == [kept]  # the new key was revoked again
    assert published.last.data["api_key"] == kept and len(published.values) == 1
    assert events.named("rotation_rolled_back", secret="apikey", version=2, undone=True)


async def test_command_timeout(vault: Any, unique: str, tmp_path: Path) -> None:
    script, db = provider(tmp_path)
    slow = (
        "/usr/bin/env",
        "SLOW=1",
        sys.executable,
        str(script),
        "create",
        str(db),
    )
    cfg = config("apikey", "command", f"secret/data/rot-slow-{unique}", create=slow, timeout=0.5)
    rot, published = rotation(cfg, vault)
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "timed out after 0.5s" in (outcome.error or "")
    assert published.values == []


async def test_a_failed_retire_is_retried_with_backoff(
    vault: Any, unique: str, tmp_path: Path, until: Any, events: Any
) -> None:
    cfg, db = command_config(tmp_path, unique, retry_initial=0.3, retry_max=0.6)
    rot, published = rotation(cfg, vault)
    assert (await rot.rotate_now()).ok
    assert (await rot.rotate_now()).ok
    blocker = tmp_path / "keys.json.norevoke"
    blocker.write_text("")
    async with looping(rot):
        await until(lambda: len(events.named("rotation_failed", step="retire")) >= 2, 30)
        assert len(json.loads(db.read_text())["live"]) == 2  # the old key is still valid
        blocker.unlink()
        await until(lambda: events.named("rotation_retired", secret="apikey", version=1), 30)
    failed = events.named("rotation_failed", step="retire")
    assert all(f.retry_in >= 0.3 for f in failed)  # backed off, not a busy loop
    assert json.loads(db.read_text())["live"] == [published.last.data["api_key"]]


async def test_a_command_rotation_is_contained(vault: Any, unique: str, events: Any) -> None:
    """Issue 8, finding 7, on a real store: too much output is an error naming the
    command (not read whole), and a timeout leaves none of the command's processes."""
    flood = (sys.executable, "-c", "import sys\nfor _ in range(128): sys.stdout.write('x' * 65536)")
    cfg = config("flood", "command", f"secret/data/rot-flood-{unique}", create=flood)
    rot, published = rotation(cfg, vault)
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and published.values == []
    assert f"command {sys.executable!r}: stdout exceeds 1048576 bytes" in (outcome.error or "")

    marker = f"rotate-grandchild-{unique}"
    forker = forking_command(marker)
    cfg = config("stray", "command", f"secret/data/rot-stray-{unique}", create=forker, timeout=3.0)
    rot, published = rotation(cfg, vault)
    task = asyncio.create_task(rot.rotate_now())
    await see_grandchild(marker, task)
    outcome = await task
    assert outcome.result == "failed" and "timed out after 3s" in (outcome.error or "")
    assert await none_left(marker)
