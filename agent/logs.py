"""Structured JSON-line logging.

Call :func:`event` with an event name and non-secret fields. Secret values are
never passed here; callers log names, versions and lease ids only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger("credsidecar")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # type and message only: tracebacks can carry locals' reprs
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(out, default=str)


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hvac/urllib3 debug lines can include request bodies (tokens); keep them quiet
    for noisy in ("urllib3", "hvac", "asyncio", "watchfiles", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: ``event("renewed", secret="db", ttl=6)``."""
    log.log(level, name, extra=fields)
