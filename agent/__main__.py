"""``python -m agent`` is ``credsidecar``."""

from agent.cli import main

main()
