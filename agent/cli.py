"""``credsidecar`` command line. Only this module and ``__main__`` call ``sys.exit``.

Exit codes: 0 ok, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent import __version__
from agent.config import Config, load_config, parse_config_text
from agent.errors import ConfigError, RenderError, SidecarError

T = TypeVar("T")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credsidecar",
        description="Keep an application's credentials fresh: obtain, renew, render, notify.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run until SIGTERM/SIGINT (or render once with --once)")
    _config_source(run)
    run.add_argument("--once", action="store_true", help="render every template once and exit")
    check = sub.add_parser("check", help="validate the config and templates, then exit")
    _config_source(check)
    rotate = sub.add_parser("rotate", help="rotate a credential under rotate: now, then exit")
    rotate.add_argument("name", help="the name under rotate:")
    rotate.add_argument("-c", "--config", required=True, help="YAML config file")
    sub.add_parser("version", help="print the version")
    injector = sub.add_parser("injector", help="serve the Kubernetes mutating admission webhook")
    injector.add_argument("--listen", help="host:port (default 0.0.0.0:8443)")
    injector.add_argument("--tls-cert", help="PEM certificate (re-read when it changes)")
    injector.add_argument("--tls-key", help="PEM private key (re-read when it changes)")
    injector.add_argument("-c", "--config", help="YAML settings file (flags win)")
    injector.add_argument("--image", help="the credsidecar image to inject")
    injector.add_argument("--vault-address", help="Vault address for pods that name none")
    return parser


def _config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", help="YAML config file")
    # the injector passes a pod's generated config this way: no ConfigMap needed
    source.add_argument("--config-env", metavar="NAME", help="read the config from $NAME")


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is a dependency everywhere but Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platform without uvloop
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _load(args: argparse.Namespace) -> Config:
    variable = getattr(args, "config_env", None)  # `rotate` reads files only
    if variable is None:
        config = load_config(args.config)
    else:
        text = os.environ.get(variable)
        if text is None:
            raise ConfigError([f"the environment variable {variable} is not set"])
        config = parse_config_text(text, f"${variable}", Path.cwd())
    problems = _deep_check(config)
    if problems:
        raise ConfigError(problems)
    return config


def _deep_check(config: Config) -> list[str]:
    """Checks beyond the YAML shape: templates compile, the proxy section is valid."""
    from agent.render import Template

    problems = []
    for index, template in enumerate(config.templates):
        try:
            Template(template)
        except RenderError as exc:
            problems.append(f"templates[{index}]: {exc}")
    return problems


async def _run(config: Config) -> int:
    from agent.runtime import Runtime, install_signal_handlers

    runtime = Runtime(config)
    stop = asyncio.Event()
    install_signal_handlers(stop, runtime)
    return await runtime.run(stop)


async def _once(config: Config) -> list[str]:
    from agent.runtime import Runtime

    return await Runtime(config).run_once()


def _rotate(config: Config, name: str) -> None:
    from agent.rotate.once import rotate_once

    if name not in config.rotate:
        print(f"credsidecar: nothing to rotate named {name!r} under rotate:", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        outcome = _run_loop(rotate_once(config, name))
    except SidecarError as exc:
        print(f"credsidecar: rotation of {name} failed: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    if outcome.ok:
        print(f"credsidecar: rotated {name} to version {outcome.version}")
        sys.exit(EXIT_OK)
    reason = outcome.error or "another replica is rotating it right now"
    print(f"credsidecar: rotation of {name} failed: {reason}", file=sys.stderr)
    sys.exit(EXIT_FAILURE)


def _injector(args: argparse.Namespace) -> None:
    from agent import logs
    from agent.injector.settings import load_settings

    flags = {
        "listen": args.listen,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "image": args.image,
        "vault_address": args.vault_address,
    }
    try:
        settings = load_settings(Path(args.config) if args.config else None, flags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"credsidecar injector: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    logs.setup("info")

    async def serve() -> None:
        from agent.injector.server import serve

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        _run_loop(serve())
    except (OSError, ValueError) as exc:  # cannot listen, unreadable TLS files
        print(f"credsidecar injector: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    sys.exit(EXIT_OK)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"credsidecar {__version__}")
        sys.exit(EXIT_OK)
    if args.command == "injector":
        _injector(args)

    from agent import logs

    origin = args.config or f"${args.config_env}"  # exactly one of them is given
    try:
        config = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{origin}: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    if args.command == "check":
        print(f"{origin}: ok ({len(config.secrets)} secrets, {len(config.templates)} templates)")
        sys.exit(EXIT_OK)

    logs.setup(config.log_level)
    if args.command == "rotate":
        _rotate(config, args.name)
    if args.once:
        failures = _run_loop(_once(config))
        for failure in failures:
            print(f"credsidecar: {failure}", file=sys.stderr)
        sys.exit(EXIT_FAILURE if failures else EXIT_OK)
    code = EXIT_FAILURE
    try:
        code = _run_loop(_run(config))
    except* SidecarError as group:
        for error in group.exceptions:
            print(f"credsidecar: {error}", file=sys.stderr)
    sys.exit(code)
