"""The AWS Secrets Manager rotation store on moto's server, through the real AWS client:
AWSPENDING -> verify -> AWSCURRENT (AWSPREVIOUS kept), replicas racing through the
ClientRequestToken, a failed verification that leaves AWSCURRENT alone, a publish
interrupted before AWSCURRENT moved."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from devservers import AUDIT, MotoServer
from rotatehelpers import Published, config, step_until

from agent.awsconfig import AwsConfig
from agent.config import parse_config
from agent.errors import ConfigError
from agent.rotate.awsstore import RECORD_LABEL, SecretsManagerStore
from agent.rotate.base import RotatorContext, create_rotator
from agent.rotate.config import RotateConfig
from agent.rotate.manager import Rotation

pytestmark = pytest.mark.usefixtures("aws_env")

CREATE = "import json, secrets; print(json.dumps({'api_key': 'key-' + secrets.token_hex(12)}))"
# verify runs while the new key is AWSPENDING and AWSCURRENT is still the old one
VERIFY = """
import json, sys, botocore.session
new = json.load(sys.stdin)["new"]
sm = botocore.session.Session().create_client(
    "secretsmanager", region_name="us-east-1", endpoint_url=sys.argv[1])
pending = sm.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSPENDING")
current = sm.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSCURRENT")
ok = json.loads(pending["SecretString"]) == new and json.loads(current["SecretString"]) != new
sys.exit(0 if ok and sys.argv[3] == "pass" else 1)
"""


def stages(moto: MotoServer, name: str) -> dict[str, list[str]]:
    return dict(moto.client().describe_secret(SecretId=name)["VersionIdsToStages"])


def at(moto: MotoServer, name: str, stage: str) -> dict[str, Any]:
    answer = moto.client().get_secret_value(SecretId=name, VersionStage=stage)
    return dict(json.loads(answer["SecretString"]), version_id=answer["VersionId"])


def aws_rotation(
    cfg: RotateConfig, moto: MotoServer, owner: str = "replica"
) -> tuple[Rotation, Published, SecretsManagerStore]:
    store = SecretsManagerStore(cfg.store, AwsConfig("us-east-1", moto.endpoint_url))
    rotator = create_rotator(cfg, RotatorContext(vault=None, lookup=lambda _: None))
    published = Published()
    return Rotation(cfg, rotator, store, published, owner), published, store


def command_config(name: str, secret: str, moto: MotoServer, verdict: str, **kw: Any) -> Any:
    verify = (sys.executable, "-c", VERIFY, moto.endpoint_url, secret, verdict)
    return config(
        name,
        "command",
        secret,
        store_kind="aws_secretsmanager",
        create=(sys.executable, "-c", CREATE),
        verify=verify,
        every=3600.0,
        **kw,
    )


async def test_a_rotation_follows_the_staging_labels(
    moto: MotoServer, unique: str, events: Any, until: Any
) -> None:
    name = f"app/api-{unique}"
    initial = moto.client().create_secret(Name=name, SecretString=json.dumps({"api_key": "boot"}))
    cfg = command_config("api", name, moto, "pass", grace=0.5)
    rot, published, store = aws_rotation(cfg, moto)
    try:
        first = await rot.rotate_now()
        assert first.ok and first.version == 1, first
        key1 = published.last.data["api_key"]
        AUDIT.secret(key1)
        current = at(moto, name, "AWSCURRENT")
        assert current["api_key"] == key1  # what AWS-native consumers read
        # the fields alone, as ESO and the SDKs read them (AWS's default stage is AWSCURRENT;
        # moto's default does not follow UpdateSecretVersionStage, so it is named here)
        plain = moto.client().get_secret_value(SecretId=name, VersionStage="AWSCURRENT")
        assert json.loads(plain["SecretString"]) == {"api_key": key1}
        assert at(moto, name, "AWSPREVIOUS")["version_id"] == initial["VersionId"]
        labels = stages(moto, name)
        assert labels[current["version_id"]] == ["AWSCURRENT"]  # AWSPENDING was taken off
        record = [v for v, s in labels.items() if RECORD_LABEL in s]
        assert len(record) == 1 and record[0] != current["version_id"]

        second = await rot.rotate_now()
        assert second.ok and second.version == 2
        key2 = published.last.data["api_key"]
        AUDIT.secret(key2)
        assert at(moto, name, "AWSCURRENT")["api_key"] == key2
        assert at(moto, name, "AWSPREVIOUS")["version_id"] == current["version_id"]

        # a replica that starts now adopts the record from AWS alone
        other, adopted, other_store = aws_rotation(cfg, moto, "newcomer")
        try:
            assert (await other.step()).result == "not_due"
            assert adopted.last.data["api_key"] == key2 and adopted.last.version == "2"
        finally:
            await other_store.aclose()

        await step_until(
            until,
            rot,
            lambda: rot.record is not None and rot.record.retired,
            "the previous key retired",
        )
        assert events.named("rotation_retired", secret="api", version=1)
    finally:
        await store.aclose()


async def test_racing_replicas_rotate_once(moto: MotoServer, unique: str, events: Any) -> None:
    name = f"race-{unique}"
    moto.client().create_secret(Name=name, SecretString="{}")
    cfg = config("race", "jwt-keys", name, store_kind="aws_secretsmanager", every=3600.0)
    replicas = [aws_rotation(cfg, moto, f"replica-{i}") for i in range(3)]
    try:
        outcomes = await asyncio.gather(*(r.step() for r, _, _ in replicas))
        results = [o.result for o in outcomes]
        assert results.count("rotated") == 1 and set(results) <= {"rotated", "busy", "not_due"}
        assert len(events.named("rotation_started", secret="race")) == 1
        await asyncio.gather(*(r.step() for r, _, _ in replicas))
        kids = {p.last.data["kid"] for _, p, _ in replicas}
        assert len(kids) == 1
        assert at(moto, name, "AWSCURRENT")["kid"] in kids
    finally:
        for _, _, store in replicas:
            await store.aclose()


async def test_a_failed_verification_leaves_awscurrent_untouched(
    moto: MotoServer, unique: str, events: Any
) -> None:
    name = f"broken-{unique}"
    moto.client().create_secret(Name=name, SecretString=json.dumps({"api_key": "boot"}))
    before = at(moto, name, "AWSCURRENT")
    rot, published, store = aws_rotation(command_config("broken", name, moto, "fail"), moto)
    try:
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and "exited with 1" in (outcome.error or ""), outcome
        assert at(moto, name, "AWSCURRENT") == before and not published.values
        assert not any("AWSPENDING" in s for s in stages(moto, name).values())
        assert rot.record is not None and rot.record.claim is None  # the next try may start
        assert events.named("rotation_failed", secret="broken", version=1)
    finally:
        await store.aclose()


async def test_an_interrupted_publish_is_finished_by_the_next_read(
    moto: MotoServer, unique: str
) -> None:
    name = f"crash-{unique}"
    initial = moto.client().create_secret(Name=name, SecretString="{}")
    cfg = config("crash", "jwt-keys", name, store_kind="aws_secretsmanager", every=3600.0)
    rot, published, store = aws_rotation(cfg, moto)
    try:
        assert (await rot.rotate_now()).ok
        new = at(moto, name, "AWSCURRENT")["version_id"]
        # the state a crash between the record write and the AWSCURRENT move leaves
        moto.client().update_secret_version_stage(
            SecretId=name,
            VersionStage="AWSCURRENT",
            MoveToVersionId=initial["VersionId"],
            RemoveFromVersionId=new,
        )
        fresh = SecretsManagerStore(name, AwsConfig("us-east-1", moto.endpoint_url))
        try:
            record = await fresh.read()
        finally:
            await fresh.aclose()
        assert record.version == 1 and record.current is not None
        assert record.current["kid"] == published.last.data["kid"]
        assert at(moto, name, "AWSCURRENT")["version_id"] == new
    finally:
        await store.aclose()


async def test_an_empty_secret_is_refused_with_a_reason(moto: MotoServer, unique: str) -> None:
    moto.client().create_secret(Name=f"empty-{unique}")
    cfg = config("empty", "jwt-keys", f"empty-{unique}", store_kind="aws_secretsmanager")
    rot, published, store = aws_rotation(cfg, moto)
    try:
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and "no AWSCURRENT value" in (outcome.error or "")
        assert not published.values
    finally:
        await store.aclose()


def test_config_of_an_aws_store_needs_no_vault(tmp_path: Path) -> None:
    store = {"aws_secretsmanager": "app/jwt", "region": "eu-west-1"}
    cfg = parse_config(
        {"rotate": {"jwt": {"kind": "jwt-keys", "store": store}}}, base_dir=tmp_path, env={}
    )
    rot = cfg.rotate["jwt"]
    assert (rot.store_kind, rot.store, rot.aws) == (
        "aws_secretsmanager",
        "app/jwt",
        AwsConfig("eu-west-1", None),
    )
    assert cfg.vault is None and not cfg.needs_vault()
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "rotate": {
                    "jwt": {
                        "kind": "jwt-keys",
                        "store": {"aws_secretsmanager": "x", "region": "mars", "cas": 1},
                    }
                }
            },
            base_dir=tmp_path,
            env={},
        )
    assert any(p.startswith("rotate.jwt.store.region: ") for p in info.value.problems)
    assert any(p.startswith("rotate.jwt.store.cas: unknown key") for p in info.value.problems)


def test_credsidecar_rotate_with_an_aws_store_needs_no_vault(
    moto: MotoServer, unique: str, tmp_path: Path
) -> None:
    import os
    import subprocess

    name = f"cli-{unique}"
    moto.client().create_secret(Name=name, SecretString="{}")
    store = {"aws_secretsmanager": name, "region": "us-east-1", "endpoint_url": moto.endpoint_url}
    config = {"rotate": {"jwt": {"kind": "jwt-keys", "store": store}}, "state_dir": str(tmp_path)}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    out = subprocess.run(
        [sys.executable, "-m", "agent", "rotate", "jwt", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    (tmp_path / "rotate.log").write_text(out.stderr + out.stdout)
    AUDIT.log(tmp_path / "rotate.log")
    assert out.returncode == 0, out.stderr
    assert "rotated jwt to version 1" in out.stdout
    current = at(moto, name, "AWSCURRENT")
    assert current["kid"] and current["algorithm"] == "ES256"
    AUDIT.secret(current["private_key"].splitlines()[1])
