"""``kind: aws-secretsmanager`` against moto's standalone server through the real AWS
client: fields, stages, binary secrets, refresh, outages and errors; a config of AWS
secrets only runs without Vault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agentproc import run_once
from devservers import AUDIT, FaultRelay, MotoServer

from agent.awsconfig import AwsConfig
from agent.errors import SidecarError

pytestmark = pytest.mark.usefixtures("aws_env")


def aws_source(make_source: Any, endpoint: str, secret_id: str, **kw: Any) -> Any:
    return make_source(
        "aws", "aws-secretsmanager", secret_id, aws=AwsConfig("us-east-1", endpoint), **kw
    )


async def test_json_fields_stages_and_refresh(
    moto: MotoServer, make_source: Any, unique: str, run: Any
) -> None:
    sm = moto.client()
    name = f"app/db-{unique}"
    AUDIT.secret(f"pw-one-{unique}")
    AUDIT.secret(f"pw-two-{unique}")
    first = sm.create_secret(
        Name=name, SecretString=json.dumps({"username": "app", "password": f"pw-one-{unique}"})
    )
    source, published = aws_source(make_source, moto.endpoint_url, name, refresh=0.2)
    try:
        value = await source.start()
        assert value.data == {"username": "app", "password": f"pw-one-{unique}"}
        assert value.version == first["VersionId"]
        async with run(source):
            second = sm.put_secret_value(
                SecretId=name,
                SecretString=json.dumps({"username": "app", "password": f"pw-two-{unique}"}),
            )
            new = await published.wait_for(lambda v: v.version == second["VersionId"])
            assert new.data["password"] == f"pw-two-{unique}"
        await source.close(revoke=False)

        previous, _ = aws_source(make_source, moto.endpoint_url, name, version_stage="AWSPREVIOUS")
        assert (await previous.start()).data["password"] == f"pw-one-{unique}"
        await previous.close(revoke=False)
    finally:
        await source.close(revoke=False)


async def test_plain_and_binary_secrets(moto: MotoServer, make_source: Any, unique: str) -> None:
    sm = moto.client()
    sm.create_secret(Name=f"plain-{unique}", SecretString="just-a-token")
    sm.create_secret(Name=f"bin-{unique}", SecretBinary=b"\x00\x01binary")
    plain, _ = aws_source(make_source, moto.endpoint_url, f"plain-{unique}")
    binary, _ = aws_source(make_source, moto.endpoint_url, f"bin-{unique}")
    try:
        assert (await plain.start()).data == {"value": "just-a-token"}
        assert (await binary.start()).data == {"binary": "AAFiaW5hcnk="}
    finally:
        await plain.close(revoke=False)
        await binary.close(revoke=False)


async def test_errors_name_the_secret_and_an_outage_keeps_the_value(
    moto: MotoServer, make_source: Any, unique: str, events: Any, until: Any, run: Any
) -> None:
    missing, _ = aws_source(make_source, moto.endpoint_url, f"nope-{unique}")
    with pytest.raises(SidecarError, match=rf"nope-{unique}.*ResourceNotFoundException"):
        await missing.start()
    await missing.close(revoke=False)

    sm = moto.client()
    sm.create_secret(Name=f"cut-{unique}", SecretString=json.dumps({"k": "v1"}))
    relay = FaultRelay(moto.port)
    source, published = aws_source(make_source, relay.address, f"cut-{unique}", refresh=0.2)
    try:
        await source.start()
        async with run(source):
            relay.cut()
            await until(lambda: events.named("source_failed", secret="aws"), 60, "a failure")
            assert source.current is not None and source.current.data == {"k": "v1"}
            relay.restore()
            sm.put_secret_value(SecretId=f"cut-{unique}", SecretString=json.dumps({"k": "v2"}))
            await published.wait_for(lambda v: v.data == {"k": "v2"}, 60)
    finally:
        relay.close()
        await source.close(revoke=False)


def test_a_config_of_aws_secrets_runs_without_vault(
    moto: MotoServer, shm: Path, tmp_path: Path, unique: str
) -> None:
    moto.client().create_secret(
        Name=f"solo-{unique}", SecretString=json.dumps({"api_key": f"key-{unique}"})
    )
    AUDIT.secret(f"key-{unique}")
    config = {
        "secrets": {
            "api": {
                "kind": "aws-secretsmanager",
                "secret_id": f"solo-{unique}",
                "region": "us-east-1",
                "endpoint_url": moto.endpoint_url,
            }
        },
        "templates": [
            {"destination": str(shm / "api.txt"), "contents": "{{ secrets.api.api_key }}"}
        ],
        "state_dir": str(shm / "state"),
    }
    out = run_once(config, tmp_path)
    assert out.returncode == 0, out.stderr
    assert (shm / "api.txt").read_text() == f"key-{unique}"
