"""``credsidecar rotate NAME`` when no agent answers on the admin socket: one forced
rotation in this process.

Logs in like the agent, obtains only the secrets the rotation needs (the admin
login of a PostgreSQL kind), rotates through the same claim/publish protocol and
the same grace rules as the running sidecars, which then adopt the result from the
store. The previous credential is retired after its grace by whichever sidecar runs
then (the record keeps ``retire_at``); only ``--now`` retires it here, early.
"""

from __future__ import annotations

from agent.config import Config
from agent.errors import SidecarError
from agent.rotate.manager import Outcome, RotationManager
from agent.secret import SecretValue
from agent.sources import create as create_source
from agent.sources.base import SourceContext
from agent.vault.client import VaultClient


async def _ignore(_: SecretValue) -> None:
    """Nothing renders here: the sidecars adopt the published result."""


async def rotate_once(config: Config, name: str, now: bool = False) -> Outcome:
    cfg = config.rotate[name]
    if config.vault is None and config.needs_vault():
        raise SidecarError("rotation needs vault: (the store is KV v2)")
    vault = VaultClient(config.vault) if config.vault is not None else None
    manager: RotationManager | None = None
    try:
        if vault is not None:
            await vault.login()
        values: dict[str, SecretValue] = {}
        if cfg.admin is not None:
            context = SourceContext(publish=_ignore, vault=vault, ledger=None)
            source = create_source(config.secrets[cfg.admin.secret], context)
            values[source.name] = await source.start()
            await source.close(revoke=False)
        manager = RotationManager({name: cfg}, vault, values.get, _ignore)
        return await manager.rotate_now(name, now)
    finally:
        if manager is not None:
            await manager.aclose()
        if vault is not None:
            await vault.close()
