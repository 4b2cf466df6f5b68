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
    # stdout goes through a pipe of ours, not asyncio's: we can close our end whenever we
    # stop reading (an overflow), and Process.wait() does not wait for it to drain
    read_end, write_end = os.pipe() if capture else (None, None)
    try:
        proc = await asyncio.create_subprocess_exec(
            *command.argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL if write_end is None else write_end,
            stderr=asyncio.subprocess.DEVNULL,
            env=child_environment(command.env),
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except OSError as exc:
        if read_end is not None:
            os.close(read_end)
        raise CommandError(f"command {what!r}: cannot start ({exc.strerror or exc})") from None
    finally:
        if write_end is not None:
            os.close(write_end)  # the child has its copy
    stdout: _Stdout | None = None
    try:
        async with asyncio.timeout(command.timeout):
            if read_end is not None:
                stdout = await _Stdout.open(read_end)
            out = await _communicate(proc, stdin, stdout, command.max_output)
            code = await proc.wait()
    except TimeoutError:
        await _kill_group(proc)
        raise CommandError(
            f"command {what!r}: timed out after {command.timeout:g}s (its process group was killed)"
        ) from None
    except _Overflow:
        await _kill_group(proc)
        raise CommandError(
            f"command {what!r}: stdout exceeds {command.max_output} bytes (max_output); "
            "it was killed"
        ) from None
    except BaseException:  # cancelled (shutdown): leave nothing running behind us
        with contextlib.suppress(BaseException):
            await asyncio.shield(_kill_group(proc))
        raise
    finally:
        if stdout is not None:
            stdout.close()
        elif read_end is not None:
            os.close(read_end)
    if code != 0:
        raise CommandError(f"command {what!r}: exited with {exit_status(code)}")
    return out


class _Overflow(Exception):
    pass


class _Stdout:
    """The read end of a command's stdout, as a stream we own and close."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.ReadTransport) -> None:
        self.reader, self.transport = reader, transport

    @classmethod
    async def open(cls, fd: int) -> _Stdout:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
        pipe = os.fdopen(fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe
            )
        except BaseException:
            pipe.close()
            raise
        return cls(reader, transport)

    async def read_capped(self, limit: int) -> bytes:
        out = bytearray()
        while chunk := await self.reader.read(_CHUNK):
            out += chunk
            if len(out) > limit:
                raise _Overflow
        return bytes(out)

    def close(self) -> None:
        self.transport.close()


async def _communicate(
    proc: asyncio.subprocess.Process, stdin: bytes | None, stdout: _Stdout | None, limit: int
) -> bytes:
    writer = None
    if stdin is not None:
        writer = asyncio.create_task(_feed(proc, stdin), name=f"stdin-{proc.pid}")
    try:
        out = await stdout.read_capped(limit) if stdout is not None else b""
        if writer is not None:
            await writer  # all of the input is written (or the command stopped reading it)
        return out
    finally:
        if writer is not None and not writer.done():
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


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (its pgid is its pid: it leads its session),
    and reap the leader.

    Also after the leader exited: a grandchild may still hold stdout or keep running.
    The kernel does not hand out a pid that is still some group's id, so the signal
    reaches that group or, once all of it is gone, nobody (short of the pid counter
    wrapping around between the leader's exit and this call).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
