"""The one way the agent runs a command (notify commands, rotation commands).

Each command:

- runs without a shell, with the environment of :mod:`agent.childenv` (no credentials
  of ours), and its stderr discarded (it could echo a secret, and is not ours to log);
- runs in its own process group (``start_new_session``), so that its timeout, an
  overflow or our cancellation kills everything it started, not only the direct child;
- gets its input on stdin (never in argv, which every user sees through ``ps``);
- has its stdout read in bounded chunks up to ``max_output`` bytes: more is an error
  naming the command, and the output is never held in memory whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field

from agent.childenv import EnvPolicy, child_environment
from agent.errors import SidecarError

DEFAULT_MAX_OUTPUT = 1024 * 1024  # 1 MiB
_CHUNK = 64 * 1024


class CommandError(SidecarError):
    """A command could not start, failed, timed out or wrote too much. Names the command."""


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    timeout: float
    env: EnvPolicy = field(default_factory=EnvPolicy)
    max_output: int = DEFAULT_MAX_OUTPUT

    @property
    def name(self) -> str:
        return self.argv[0]


def exit_status(returncode: int) -> int:
    """A shell-style exit status: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


async def run(command: Command, stdin: bytes | None = None, *, capture: bool = False) -> bytes:
    """Run ``command``; its stdout when ``capture`` (else discarded), or CommandError."""
    what = command.name
    try:
        proc = await asyncio.create_subprocess_exec(
            *command.argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=child_environment(command.env),
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except OSError as exc:
        raise CommandError(f"command {what!r}: cannot start ({exc.strerror or exc})") from None
    try:
        async with asyncio.timeout(command.timeout):
            out = await _communicate(proc, stdin, command.max_output if capture else None)
            code = await proc.wait()
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise CommandError(
            f"command {what!r}: timed out after {command.timeout:g}s (its process group was killed)"
        ) from None
    except _Overflow:
        _kill_group(proc)
        await proc.wait()
        raise CommandError(
            f"command {what!r}: stdout exceeds {command.max_output} bytes (max_output); "
            "it was killed"
        ) from None
    except BaseException:  # cancelled (shutdown): leave nothing running behind us
        _kill_group(proc)
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())
        raise
    if code != 0:
        raise CommandError(f"command {what!r}: exited with {exit_status(code)}")
    return out


class _Overflow(Exception):
    pass


async def _communicate(
    proc: asyncio.subprocess.Process, stdin: bytes | None, limit: int | None
) -> bytes:
    writer = None
    if stdin is not None:
        writer = asyncio.create_task(_feed(proc, stdin), name=f"stdin-{proc.pid}")
    try:
        return await _read_capped(proc, limit) if limit is not None else b""
    finally:
        if writer is not None:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    # a command that exits without reading its input is not our error
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    proc.stdin.close()


async def _read_capped(proc: asyncio.subprocess.Process, limit: int) -> bytes:
    assert proc.stdout is not None
    out = bytearray()
    while chunk := await proc.stdout.read(_CHUNK):
        out += chunk
        if len(out) > limit:
            raise _Overflow
    return bytes(out)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (its pgid is its pid: it leads its session).

    Also after the leader exited: a grandchild may still hold stdout or keep running.
    The kernel does not hand out a pid that is still some group's id, so the signal
    reaches that group or, once all of it is gone, nobody (short of the pid counter
    wrapping around between the leader's exit and this call).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
