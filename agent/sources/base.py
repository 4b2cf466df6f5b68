"""What every credential source provides, and what the runtime gives it.

A source obtains the first value in :meth:`Source.start` (or adopts one from the
ledger), then keeps it fresh in :meth:`Source.run`, calling ``context.publish``
with every new value. The runtime renders and notifies; sources never touch files.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.config import SecretConfig
from agent.secret import SecretValue

if TYPE_CHECKING:
    from agent.ledger import Ledger
    from agent.vault.client import VaultClient

Publish = Callable[[SecretValue], Awaitable[None]]
Revoked = Callable[[str, str], None]  # (secret name, version): that credential is dead


def _nobody_cares(name: str, version: str) -> None:
    return None


@dataclass
class SourceContext:
    publish: Publish
    vault: VaultClient | None  # None when the config has only file secrets
    ledger: Ledger | None
    # a credential of this source stopped working (revoked by us or someone else):
    # readiness turns false for any destination that still holds it
    revoked: Revoked = _nobody_cares
    clock: Callable[[], float] = field(default=time.time)  # wall clock; tests inject one


class Source(ABC):
    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        self.config = config
        self.context = context
        self.current: SecretValue | None = None
        self._wake = asyncio.Event()
        self._refresh = False  # the wake was a refresh request, not a nudge

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
        self._refresh = True
        self._wake.set()

    def nudge(self) -> None:
        """Re-plan now (something the schedule depends on changed); fetches nothing."""
        self._wake.set()

    def delivered(self, version: str, at: float) -> None:  # noqa: B027 - optional hook
        """Every consumer got ``version`` at ``at``: rendered everywhere, the app told.

        Until then a source keeps what that version superseded (no revocation).
        """

    async def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken early by :meth:`wake` (a refresh)."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            pass
        finally:
            self._wake.clear()
        refresh, self._refresh = self._refresh, False
        return refresh

    async def close(self, revoke: bool) -> None:  # noqa: B027 - optional hook
        """Release what the source holds; revoke leases only when asked."""
