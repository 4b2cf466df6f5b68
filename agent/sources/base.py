"""What every credential source provides, and what the runtime gives it.

A source obtains the first value in :meth:`Source.start` (or adopts one from the
ledger), then keeps it fresh in :meth:`Source.run`, calling ``context.publish``
with every new value. The runtime renders and notifies; sources never touch files.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.config import SecretConfig
from agent.secret import SecretValue

if TYPE_CHECKING:
    from agent.ledger import Ledger
    from agent.vault.client import VaultClient

Publish = Callable[[SecretValue], Awaitable[None]]


@dataclass
class SourceContext:
    publish: Publish
    vault: VaultClient | None  # None when the config has only file secrets
    ledger: Ledger | None


class Source(ABC):
    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        self.config = config
        self.context = context
        self.current: SecretValue | None = None
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    async def start(self) -> SecretValue:
        """Obtain (or adopt) the first value; raise a SidecarError if impossible."""

    @abstractmethod
    async def run(self) -> None:
        """Keep the value fresh until cancelled; publish every new value."""

    def wake(self) -> None:
        """Check now instead of at the next scheduled time (``POST /refresh``)."""
        self._wake.set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken early by :meth:`wake`."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    async def close(self, revoke: bool) -> None:  # noqa: B027 - optional hook
        """Release what the source holds; revoke leases only when asked."""
