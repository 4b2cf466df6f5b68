"""``credsidecar`` command line. Only this module and ``__main__`` call ``sys.exit``.

Exit codes: 0 ok, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from agent import __version__
from agent.config import Config, load_config
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
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument("--once", action="store_true", help="render every template once and exit")
    check = sub.add_parser("check", help="validate the config and templates, then exit")
    check.add_argument("-c", "--config", required=True, help="YAML config file")
    rotate = sub.add_parser("rotate", help="rotate a credential under rotate: now, then exit")
    rotate.add_argument("name", help="the name under rotate:")
    rotate.add_argument("-c", "--config", required=True, help="YAML config file")
    sub.add_parser("version", help="print the version")
    return parser


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is a dependency everywhere but Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platform without uvloop
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _load(path: str) -> Config:
    config = load_config(path)
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


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"credsidecar {__version__}")
        sys.exit(EXIT_OK)

    from agent import logs

    try:
        config = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    if args.command == "check":
        print(
            f"{args.config}: ok ({len(config.secrets)} secrets, {len(config.templates)} templates)"
        )
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
