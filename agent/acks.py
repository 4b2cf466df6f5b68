"""Tickets for "the application was told": what a notify target owes, and what it paid.

A target (a notifier, the exec child) issues a ticket per trigger and, after a
delivery that succeeded, marks every ticket issued before that delivery began as
covered. The render pipeline keeps the tickets of the writes it made, and a superseded
credential is revoked only once they are covered: the application was told of its
successor. A delivery that fails covers nothing; the next one that succeeds does.
"""

from __future__ import annotations

import asyncio


class Acks:
    def __init__(self) -> None:
        self.issued = 0  # tickets handed out (one per trigger)
        self.covered = 0  # every ticket up to this one was delivered
        self._progress = asyncio.Event()

    def issue(self) -> int:
        """A ticket for the trigger being made now."""
        self.issued += 1
        return self.issued

    def cover(self, upto: int) -> None:
        """A delivery that began when ``upto`` tickets were out has succeeded."""
        if upto > self.covered:
            self.covered = upto
            # wake every waiter, then arm a fresh event for the next delivery
            self._progress.set()
            self._progress = asyncio.Event()

    async def wait(self, ticket: int) -> None:
        """Return once ``ticket`` is covered."""
        while self.covered < ticket:
            await self._progress.wait()
