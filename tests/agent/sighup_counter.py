"""A stand-in application for notify/exec tests: records what happens to it.

Run as a script: ``sighup_counter.py RECORD_FILE [--term-exit N] [--ignore-term] [--env NAME]
[MARKER...]`` appends ``started <pid>`` once its handlers are installed and ``hup <pid>``
for every SIGHUP; exits with N on SIGTERM (or ignores SIGTERM). With ``--env NAME`` it
first writes the variable's value to ``RECORD_FILE.<pid>.env``. Extra MARKER arguments only make
its command line unique for ``process:`` regex tests.

Imported by tests: :func:`command` builds that argv, :class:`Record` reads the file.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def command(record: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(record), *extra]


class Record:
    """What the stand-in application wrote, read with generous wait-until loops."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self, kind: str) -> list[int]:
        """Pids of the lines of one kind (``started`` or ``hup``), in order."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [int(pid) for k, pid in (line.split() for line in text.splitlines()) if k == kind]

    def env(self, pid: int) -> str:
        """The ``--env`` variable as process ``pid`` saw it."""
        return Path(f"{self.path}.{pid}.env").read_text()

    def count(self, kind: str) -> int:
        return len(self.lines(kind))

    async def wait_for(self, kind: str, count: int, within: float = 30.0) -> list[int]:
        from waiting import wait_until  # a test helper: not needed when run as the app

        await wait_until(lambda: self.count(kind) >= count, within, f"{count} {kind!r} lines")
        return self.lines(kind)


def main() -> None:
    record = sys.argv[1]
    term_exit = 0
    if "--term-exit" in sys.argv:
        term_exit = int(sys.argv[sys.argv.index("--term-exit") + 1])

    def log(kind: str) -> None:
        with open(record, "a") as f:
            f.write(f"{kind} {os.getpid()}\n")

    signal.signal(signal.SIGHUP, lambda *_: log("hup"))
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(term_exit))
    if "--env" in sys.argv:
        value = os.environ.get(sys.argv[sys.argv.index("--env") + 1], "<unset>")
        Path(f"{record}.{os.getpid()}.env").write_text(value)
    log("started")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
