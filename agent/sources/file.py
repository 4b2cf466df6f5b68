"""Secrets from a local JSON or YAML file (no Vault), watched with watchfiles.

The file's directory is watched (editors and ``mv`` replace the file, which a
watch on the file itself would lose). A file that cannot be read or parsed, such
as one caught half-written, is logged and ignored: the last good value stays. A
slow poll every ``refresh`` (default 60 s) backs the watcher up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.config import SecretConfig
from agent.errors import SidecarError
from agent.logs import event
from agent.secret import SecretValue
from agent.sources.base import Source, SourceContext

DEFAULT_REFRESH = 60.0


class FileSource(Source):
    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self.path = Path(config.path)

    def _parse(self, text: str) -> Any:
        if self.path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as exc:
                # not str(exc): YAML errors quote the offending line, which may be secret
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark else ""
                raise ValueError(f"invalid YAML{where}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON at line {exc.lineno} column {exc.colno}") from None

    def load(self) -> SecretValue:
        """Read and parse the file; SidecarError naming the file and the problem."""
        where = f"secrets.{self.name}: {self.path}"
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except OSError as exc:
            raise SidecarError(f"{where}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SidecarError(f"{where}: not UTF-8 text") from None
        try:
            data = self._parse(text)
        except ValueError as exc:
            raise SidecarError(f"{where}: {exc}") from None
        if not isinstance(data, dict):
            raise SidecarError(f"{where}: must hold a mapping, got {type(data).__name__}")
        return SecretValue(name=self.name, data=data, version=str(st.st_mtime_ns))

    async def start(self) -> SecretValue:
        self.current = self.load()
        event("updated", secret=self.name, version=self.current.version)
        return self.current

    async def _watch(self) -> None:
        from watchfiles import awatch  # only configs with a file secret pay for it

        target = self.path.name
        ready = False
        try:
            async for changes in awatch(
                self.path.parent,
                debounce=100,
                step=20,
                recursive=False,
                rust_timeout=500,
                yield_on_timeout=True,  # the first (empty) yield says the watch is set up
            ):
                if not ready or any(Path(changed).name == target for _, changed in changes):
                    # once watching, look again: a change made before it was set up is caught
                    ready = True
                    self.wake()
        except (OSError, RuntimeError) as exc:
            # e.g. the directory vanished: the periodic poll still notices changes
            event("watch_failed", logging.WARNING, secret=self.name, error=str(exc))

    async def run(self) -> None:
        refresh = self.config.refresh if self.config.refresh is not None else DEFAULT_REFRESH
        watcher = asyncio.create_task(self._watch(), name=f"watch {self.path}")
        try:
            while True:
                await self.sleep(refresh)
                await self._reload()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _reload(self) -> None:
        try:
            value = self.load()
        except SidecarError as exc:
            event("file_invalid", logging.WARNING, secret=self.name, error=str(exc))
            return
        old = self.current
        if old is not None and old.data == value.data:
            return
        self.current = value
        event("updated", secret=self.name, version=value.version)
        await self.context.publish(value)
