"""The exec child's templated variables (``exec.env_template``, Vault Agent's
``env_template``): rendered by the pipeline, staged here, read by the child at each start.

A process's environment is fixed when it starts, so a changed value reaches the
application only through a restart: :class:`agent.supervise.Child` compares what is
staged with what its running process got, and restarts it when they differ. The
values are secrets: they are never logged, never passed in argv, and only the child's
environment holds them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from agent.config import EnvTemplateConfig
from agent.errors import RenderError


class ExecEnv:
    def __init__(self, templates: Sequence[EnvTemplateConfig]) -> None:
        self.templates = tuple(templates)
        self._values: dict[str, str] = {}
        self._complete = asyncio.Event()  # every variable rendered at least once

    def stage(self, cfg: EnvTemplateConfig, data: bytes) -> bool:
        """Stage a rendered value; whether it differs from the one staged before.
        Raises RenderError when it cannot be an environment value."""
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RenderError(f"template {cfg.name}: the value is not UTF-8 text") from None
        if "\0" in value:  # execve would cut the value there
            raise RenderError(f"template {cfg.name}: the value holds a NUL byte")
        changed = self._values.get(cfg.variable) != value
        self._values[cfg.variable] = value
        if not self.missing():
            self._complete.set()
        return changed

    def missing(self) -> list[str]:
        return [t.variable for t in self.templates if t.variable not in self._values]

    def snapshot(self) -> dict[str, str]:
        """The variables for a child starting now (all staged by one pass: never a mix)."""
        return dict(self._values)

    async def complete(self) -> None:
        """Return once every variable was rendered (a child never starts without one)."""
        await self._complete.wait()
