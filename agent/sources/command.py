"""Any other secret store through a command (``kind: command``).

The command runs without a shell every ``refresh`` (default 5 min, and on
``POST /refresh``), in its own process group, with no stdin, our environment minus
Vault tokens, and a ``timeout``. Its stdout must be one JSON object (at most
:data:`MAX_OUTPUT` bytes): its fields become ``secrets.<name>.<field>``; a list of
``{"key" (or "name"), "value"}`` entries (what some CLIs export) counts as the object
``{key: value, ...}``. stdout and
stderr are never logged (they hold the secret, or may echo it). A failure keeps the
last good value and is retried with backoff. The version counts changes (1, 2, ...),
so no fingerprint of the value ever appears in logs or ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

from agent.errors import SidecarError
from agent.secret import SecretValue
from agent.sources.polling import PollingSource, refresh_delay

DEFAULT_REFRESH = 300.0
MAX_OUTPUT = 1024 * 1024  # far above any secret, far below what could hurt our memory
_OURS = ("VAULT_TOKEN", "BAO_TOKEN")  # credentials of the agent itself, never a child's


class CommandError(SidecarError):
    """A secret command failed; the message names the command, never its output."""


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _OURS}


async def run_capped(argv: tuple[str, ...], limit_s: float, limit: int = MAX_OUTPUT) -> bytes:
    """Run ``argv`` (no shell) and return its stdout; CommandError when it cannot start,
    runs past ``limit_s`` seconds, prints more than ``limit`` bytes or exits non-zero. The whole
    process group is killed on the way out, so helpers it started do not linger."""
    what = f"command {argv[0]}"
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=child_environment(),
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandError(f"{what}: cannot start ({exc.strerror})") from None
    assert proc.stdout is not None
    out = bytearray()
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await proc.stdout.read(65536):
                out += chunk
                if len(out) > limit:
                    raise CommandError(f"{what}: printed more than {limit} bytes")
            code = await proc.wait()
    except TimeoutError:
        raise CommandError(f"{what}: timed out after {limit_s:g}s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    if code != 0:
        status = f"signal {-code}" if code < 0 else f"status {code}"
        raise CommandError(f"{what}: exited with {status}")
    return bytes(out)


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
        assert self.config.command is not None
        out = await run_capped(self.config.command, self.config.timeout)
        try:
            data = as_fields(json.loads(out))
        except ValueError:
            data = None
        if data is None:
            # never quote it: it is (or contains) the secret
            raise CommandError(f"command {self.config.command[0]}: stdout is not a JSON object")
        old = self.current
        version = 1 if old is None else int(old.version) + (old.data != data)
        return SecretValue(name=self.name, data=data, version=str(version))

    def next_check(self, value: SecretValue, now: float) -> float:
        return refresh_delay(self.config, value, now, DEFAULT_REFRESH)
