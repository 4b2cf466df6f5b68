"""PKI certificates against real OpenBao: issue, re-issue at the renew fraction."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from devservers import OpenBaoServer


@pytest.fixture
def pki_mount(openbao: OpenBaoServer, unique: str) -> Any:
    mount = f"pki-{unique}"
    root = openbao.client()
    root.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "24h"})
    root.secrets.pki.generate_root(
        "internal", "Test Root CA", extra_params={"ttl": "24h"}, mount_point=mount
    )
    root.secrets.pki.create_or_update_role(
        "web",
        {"allowed_domains": "example.test", "allow_subdomains": True, "max_ttl": "1h"},
        mount_point=mount,
    )
    yield mount
    root.sys.disable_secrets_engine(mount)


async def test_certificate_issued_and_reissued_before_it_expires(
    vault: Any, pki_mount: str, run: Any, make_source: Any, events: Any
) -> None:
    source, published = make_source(
        "tls",
        "pki",
        f"{pki_mount}/issue/web",
        vault=vault,
        # re-issued at half its life: 5 s of slack for a loaded machine (4 s left 2 s: too few)
        params={"common_name": "app.example.test", "ttl": "10s"},
        renew_fraction=0.5,
    )
    first = await source.start()
    cert = x509.load_pem_x509_certificate(first.data["certificate"].encode())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "app.example.test"
    assert first.expires_at == cert.not_valid_after_utc.timestamp()
    assert "PRIVATE KEY" in first.data["private_key"]
    assert first.version.replace(":", "") == format(cert.serial_number, "x").zfill(
        len(first.version.replace(":", ""))
    )
    async with run(source):
        source.wake()  # a refresh request does not mint a certificate that is not due
        second = await published.wait_for(lambda v: v.version != first.version, 30, "a new cert")
    assert published.values[0] is second
    assert second.issued_at < first.expires_at  # re-issued before the old one expired
    assert second.expires_at > first.expires_at
    assert events.named("issued", secret="tls", version=second.version)


async def test_bad_params_are_an_error_not_a_crash(
    vault: Any, pki_mount: str, make_source: Any
) -> None:
    from agent.errors import VaultError

    source, _ = make_source(
        "tls",
        "pki",
        f"{pki_mount}/issue/web",
        vault=vault,
        params={"common_name": "not-allowed.elsewhere.test"},
    )
    with pytest.raises(VaultError, match="pki_issue"):
        await source.start()
