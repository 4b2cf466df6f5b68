"""Any other secret store through a command (``kind: command``).

The command runs every ``refresh`` (default 5 min, and on ``POST /refresh``) through
:mod:`agent.commands`: no shell, no stdin, its own process group, a ``timeout``, the
environment of ``env:`` without our credentials. Its stdout must be one JSON object (at
most ``max_output`` bytes, 1 MiB): its fields become ``secrets.<name>.<field>``; a list of
``{"key" (or "name"), "value"}`` entries (what some CLIs export) counts as the object
``{key: value, ...}``. stdout and
stderr are never logged (they hold the secret, or may echo it). A failure keeps the
last good value and is retried with backoff. The version counts changes (1, 2, ...),
so no fingerprint of the value ever appears in logs or ``/status``.
"""

from __future__ import annotations

import json

from agent import commands
from agent.errors import SidecarError
from agent.secret import SecretValue
from agent.sources.polling import PollingSource, refresh_delay

DEFAULT_REFRESH = 300.0


def as_fields(parsed: object) -> dict[str, object] | None:
    """A JSON object as is; a list of key/value entries as the object they spell."""
    if isinstance(parsed, dict):
        return parsed
    if isinstance(parsed, list) and parsed and all(isinstance(e, dict) for e in parsed):
        fields = {}
        for entry in parsed:
            key = entry.get("key", entry.get("name"))
            if not isinstance(key, str) or "value" not in entry:
                return None
            fields[key] = entry["value"]
        return fields
    return None


class CommandSource(PollingSource):
    operation = "command"
    uses_vault = False
    failure = SidecarError
    failed_event = "source_failed"

    async def fetch(self) -> SecretValue:
        cfg = self.config
        assert cfg.command is not None
        command = commands.Command(cfg.command, cfg.timeout, cfg.env, cfg.max_output)
        out = await commands.run(command, capture=True)
        try:
            data = as_fields(json.loads(out))
        except ValueError:
            data = None
        if data is None:
            # never quote it: it is (or contains) the secret
            raise commands.CommandError(f"command {cfg.command[0]!r}: stdout is not a JSON object")
        old = self.current
        version = 1 if old is None else int(old.version) + (old.data != data)
        return SecretValue(name=self.name, data=data, version=str(version))

    def next_check(self, value: SecretValue, now: float) -> float:
        return refresh_delay(self.config, value, now, DEFAULT_REFRESH)
