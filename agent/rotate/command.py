"""Any provider's API keys through user commands (no shell, with a timeout).

``create`` prints the new credential as a JSON object on stdout; ``verify`` and
``revoke`` are optional. Each command gets its input as JSON on stdin, never in
argv (visible to every user through ``ps``) or the environment:
create ``{"name", "current"}``, verify ``{"name", "new"}``, revoke ``{"name", "old"}``.
They run through :mod:`agent.commands`: own process group, bounded stdout
(``max_output``), the environment of ``env:`` without our credentials.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent import commands
from agent.rotate.base import Fields, RotationError, Rotator
from agent.rotate.store import Record


class CommandRotator(Rotator):
    async def _run(self, argv: tuple[str, ...], stdin: Mapping[str, Any]) -> bytes:
        cfg = self.config
        command = commands.Command(argv, cfg.timeout, cfg.env, cfg.max_output)
        data = json.dumps({"name": cfg.name, **stdin}).encode()
        try:
            return await commands.run(command, data, capture=True)
        except commands.CommandError as exc:
            raise RotationError(str(exc)) from None

    async def create(self, record: Record) -> Fields:
        assert self.config.create is not None
        out = await self._run(self.config.create, {"current": record.current})
        try:
            fields = json.loads(out)
        except ValueError:
            fields = None
        if not isinstance(fields, dict) or not fields:
            # never quote the output: it is (or contains) the new key
            raise RotationError(f"command {self.config.create[0]}: stdout is not a JSON object")
        return fields

    async def verify(self, new: Mapping[str, Any]) -> None:
        if self.config.verify is not None:
            await self._run(self.config.verify, {"new": dict(new)})

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        if self.config.revoke is None:
            return False
        await self._run(self.config.revoke, {"old": dict(new)})
        return True

    async def retire(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        if self.config.revoke is not None:
            await self._run(self.config.revoke, {"old": dict(previous)})
