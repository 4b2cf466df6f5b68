"""Tasks a component started outside a TaskGroup (from callbacks or requests) and owns.

``spawn()`` keeps a task until it ends; ``aclose()`` cancels what is left and awaits it,
so no task outlives its owner and none is left without someone awaiting it (the set
pattern of the asyncio docs, with the cleanup that a TaskGroup would do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel every task still running and wait for all of them to end. A
        cancellation of ``aclose`` itself propagates (gather re-raises it)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
