"""Any provider's API keys through user commands (no shell, with a timeout).

``create`` prints the new credential as a JSON object on stdout; ``verify`` and
``revoke`` are optional. Each command gets its input as JSON on stdin, never in
argv (visible to every user through ``ps``) or the environment:
create ``{"name", "current"}``, verify ``{"name", "new"}``, revoke ``{"name", "old"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from agent.rotate.base import Fields, RotationError, Rotator
from agent.rotate.store import Record


async def run_command(argv: tuple[str, ...], stdin: Mapping[str, Any], limit: float) -> bytes:
    """Run ``argv`` with ``stdin`` as JSON; its stdout, or RotationError naming the command."""
    what = argv[0]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # may echo a key; not ours to log
        )
    except OSError as exc:
        raise RotationError(f"command {what}: cannot start ({exc.strerror})") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(json.dumps(stdin).encode()), limit)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RotationError(f"command {what}: timed out after {limit:g}s") from None
    if proc.returncode != 0:
        raise RotationError(f"command {what}: exited with {proc.returncode}")
    return out


class CommandRotator(Rotator):
    async def _run(self, argv: tuple[str, ...], stdin: Mapping[str, Any]) -> bytes:
        return await run_command(argv, {"name": self.config.name, **stdin}, self.config.timeout)

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
