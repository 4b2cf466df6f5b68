"""Standalone proxy: ``python -m proxy -c FILE`` (the ``proxy:`` section of FILE).

The product entry is ``credsidecar run -c FILE``; this one needs no agent and no
Vault: credentials come from ``credentials: {file: ...}``. Runs under uvloop when
installed; SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from proxy.config import ProxyConfigError, parse_proxy_config
from proxy.credentials import FileCredentialProvider
from proxy.server import ProxyServer

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"level": record.levelname.lower(), "event": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        return json.dumps(out, default=str)


async def _serve(server: ProxyServer, shutdown_timeout: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop(timeout=shutdown_timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    parser.add_argument("-c", "--config", required=True, type=Path)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    try:
        raw = yaml.safe_load(args.config.read_text()) or {}
        section = raw.get("proxy", raw) if isinstance(raw, dict) else raw
        config = parse_proxy_config(section, args.config.parent)
    except (OSError, yaml.YAMLError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    except ProxyConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    if config.credentials.file is None:
        print("proxy.credentials: standalone mode needs {file: PATH}", file=sys.stderr)
        return 2
    server = ProxyServer(config, FileCredentialProvider(config.credentials.file))
    try:
        import uvloop

        uvloop.run(_serve(server, args.shutdown_timeout))
    except ImportError:
        asyncio.run(_serve(server, args.shutdown_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
