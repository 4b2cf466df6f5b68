"""``credsidecar`` command line. Only this module and ``__main__`` call ``sys.exit``.

Exit codes: 0 ok, 1 runtime failure (also: a rotation refused or failed, no agent
running), 2 invalid configuration or usage.

``rotate``, ``refresh`` and ``status`` talk to the running agent through its admin
socket. When no agent runs, ``rotate`` says so and rotates in this process through the
same shared store and the same rules (grace included), so running replicas elsewhere
adopt the result; ``refresh`` and ``status`` have nothing to act on and fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from agent import __version__
from agent.config import Config, load_config, parse_config_text
from agent.errors import ConfigError, RenderError, SidecarError

if TYPE_CHECKING:
    from agent.rotate.manager import Outcome

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
    rotate = sub.add_parser("rotate", help="rotate a credential under rotate: now")
    rotate.add_argument("name", help="the name under rotate:")
    _config_source(rotate)
    rotate.add_argument(
        "--now",
        action="store_true",
        help="even inside the previous credential's grace: retire it early, accepting "
        "that its in-flight consumers fail",
    )
    refresh = sub.add_parser("refresh", help="make the running agent check its sources now")
    refresh.add_argument("secret", nargs="?", help="one secret (default: all)")
    _config_source(refresh)
    status = sub.add_parser("status", help="print the running agent's status (JSON)")
    _config_source(status)
    sub.add_parser("version", help="print the version and the proxy's build (compiled or pure)")
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
    variable = args.config_env
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
    for variable in config.exec.env_template if config.exec is not None else ():
        try:
            Template(variable)
        except RenderError as exc:
            problems.append(str(exc))  # "template exec.env_template.NAME line 1: ..."
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


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    print(f"credsidecar: {message}", file=sys.stderr)
    sys.exit(code)


def _rotate(config: Config, name: str, now: bool) -> None:
    from agent.adminclient import AdminClient, NoAgent, rotate_path

    if name not in config.rotate:
        _fail(f"nothing to rotate named {name!r} under rotate:", EXIT_CONFIG)
    limit = config.rotate[name].claim_timeout + 60.0  # a rotation may wait out a claim
    try:
        status, body = AdminClient(config).request(
            "POST", rotate_path(name), limit, **({"now": "true"} if now else {})
        )
    except NoAgent as exc:
        print(
            f"credsidecar: {exc}; rotating {name} in this process (through the shared store, "
            "under the same grace rules: running replicas adopt the result)",
            file=sys.stderr,
        )
        _report(name, _rotate_here(config, name, now))
    except SidecarError as exc:
        _fail(f"rotation of {name} failed: {exc}")
    if status == 503:
        _fail(f"rotation of {name} failed: {body.get('error')}")
    _report(name, _outcome(body))


def _rotate_here(config: Config, name: str, now: bool) -> Outcome:
    from agent.rotate.once import rotate_once

    try:
        return _run_loop(rotate_once(config, name, now))
    except SidecarError as exc:
        _fail(f"rotation of {name} failed: {exc}")


def _outcome(body: dict[str, Any]) -> Outcome:
    from agent.rotate.manager import Outcome

    return Outcome(
        result=body.get("result", "failed"),
        version=int(body.get("version") or 0),
        error=body.get("error"),
        not_before=body.get("not_before"),
    )


def _report(name: str, outcome: Outcome) -> NoReturn:
    if outcome.ok:
        print(f"credsidecar: rotated {name} to version {outcome.version}")
        sys.exit(EXIT_OK)
    if outcome.result == "in_grace":
        _fail(f"rotation of {name} refused: {outcome.error}")
    reason = outcome.error or "another replica is rotating it right now"
    _fail(f"rotation of {name} failed: {reason}")


def _refresh(config: Config, secret: str | None) -> None:
    from agent.adminclient import AdminClient

    query = {"secret": secret} if secret is not None else {}
    try:
        status, body = AdminClient(config).request("POST", "/refresh", 10.0, **query)
    except SidecarError as exc:
        _fail(f"refresh failed: {exc}")
    if status == 404:
        _fail(str(body.get("error")), EXIT_CONFIG)
    if status != 202:
        _fail(f"refresh failed: HTTP {status}: {body.get('error')}")
    print(f"credsidecar: refreshing {', '.join(body.get('refreshing') or []) or 'nothing'}")
    sys.exit(EXIT_OK)


def _status(config: Config) -> None:
    from agent.adminclient import AdminClient

    try:
        _, body = AdminClient(config).request("GET", "/status", 10.0)
    except SidecarError as exc:
        _fail(f"status failed: {exc}")
    print(json.dumps(body, indent=2, sort_keys=True))
    sys.exit(EXIT_OK)


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
        from proxy import build

        print(f"credsidecar {__version__}")
        print(f"proxy build: {build.describe()}")
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

    if args.command == "refresh":
        _refresh(config, args.secret)
    if args.command == "status":
        _status(config)
    logs.setup(config.log_level)
    if args.command == "rotate":
        _rotate(config, args.name, args.now)
    if args.once:
        failures = _run_loop(_once(config))
        for failure in failures:
            print(f"credsidecar: {failure}", file=sys.stderr)
        sys.exit(EXIT_FAILURE if failures else EXIT_OK)
    # the runtime logs why it ended as its last line ("stopped", with code and error)
    sys.exit(_run_loop(_run(config)))
