"""The floor for any Python proxy: a uvloop relay that copies bytes and nothing else.

Each client connection gets its own upstream connection and every chunk read on one
side is written to the other, with no parsing, pooling or login of its own (the
client logs in to PostgreSQL through it). No real proxy can do less work per query,
so ``benchmarks/proxy.py`` measures it beside the proxy and PgBouncer: the gap between
this row and PgBouncer is what Python and the event loop cost, not our protocol work.

Usage: ``python benchmarks/relay.py LISTEN_PORT UPSTREAM_PORT`` (both on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Side(asyncio.Protocol):
    """One end of a client/upstream pair; forwards what it reads to the other end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def pair(client: Side) -> None:
        try:
            _, upstream = await loop.create_connection(Side, "127.0.0.1", upstream_port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        upstream.peer, client.peer = client, upstream
        assert upstream.transport is not None
        for data in client.early:
            upstream.transport.write(data)
        client.early.clear()

    def accept() -> Side:
        client = Side()
        task = loop.create_task(pair(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(accept, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
