"""One asyncio Protocol for both sides of the proxy.

While a connection is being set up (TLS negotiation, login) it buffers what arrives
(at most :data:`SETUP_INBOX`: then it stops reading until :meth:`Link.recv` takes it)
and :meth:`Link.recv` awaits it; once running it hands every chunk straight to its
:class:`LinkOwner`, so forwarding costs no task switch. Its peer's write buffer filling
up or draining is reported to the owner too (backpressure: the other side stops reading).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

from mypy_extensions import trait

SETUP_INBOX: Final = 65536  # what a connection may have unread while it logs in


@trait
class LinkOwner:
    """What a running link hands its reads, its end and its peer's backpressure to (a
    client session, a server connection). Methods, not callbacks: compiled, each is a
    native call, with no bound method made per connection and no generic call per read."""

    def link_data(self, data: bytes) -> None:
        raise NotImplementedError

    def link_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def link_paused(self, paused: bool) -> None:
        """The peer's write buffer filled up (True) or drained."""
        raise NotImplementedError


class Link(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # transport.write, looked up once per transport: write() runs twice a transaction
        self._send: Callable[[bytes], object] | None = None
        self._inbox = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: Exception | None = None
        self.owner: LinkOwner | None = None  # None: reads wait in the inbox for recv()
        self.closed = False
        self.closing = False  # closed or closing: writes are dropped
        self._inbox_full = False  # reading paused until recv() takes the inbox
        self._lost: asyncio.Future[None] | None = None  # for wait_lost(), made on demand
        # data_received is the owner's link_data, an attribute of the instance (see
        # direct()); a compiled Link has no __dict__ until then, so this is how _let_go knows
        self._direct = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.use(transport)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.link_data(data)
            return
        self._inbox += data
        if len(self._inbox) >= SETUP_INBOX and not self._inbox_full:
            self._inbox_full = True
            self.pause_reading(True)
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self._eof = True
        self._error = exc
        self._wake()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self.owner is not None:
            self.owner.link_lost(exc)
        self._let_go()

    def _let_go(self) -> None:
        """Drop the owner: it holds the link, a cycle. Broken here, reference counting
        frees both at once; left, only the cycle collector would, after a few hundred
        logins' worth of them."""
        self.owner = None
        if self._direct:  # direct()'s shortcut, undone
            self._direct = False
            delattr(self, "data_received")

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.link_paused(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.link_paused(False)

    async def wait_lost(self) -> None:
        """Until the transport has let go of its socket (connection_lost)."""
        if self.closed:
            return
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._lost)  # one waiter cancelled leaves the others waiting

    # --- setup phase ----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> bytes:
        """Bytes received so far (waits for some); raises ConnectionError at EOF."""
        while not self._inbox:
            if self._eof:
                raise ConnectionResetError("connection closed by peer") from self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._inbox)
        self._inbox.clear()
        self._resume_inbox()
        return data

    def _resume_inbox(self) -> None:
        if self._inbox_full:
            self._inbox_full = False
            self.pause_reading(False)

    def run(self, owner: LinkOwner, direct: bool = True) -> None:
        """Hand reads to ``owner`` from now on; anything already buffered is delivered
        first. ``direct``: the transport calls ``owner.link_data`` itself from now on (see
        :meth:`direct`); else every read goes through :meth:`data_received` until then."""
        self.owner = owner
        if direct:
            self.direct()
        if self._inbox:
            data = bytes(self._inbox)
            self._inbox.clear()
            self._resume_inbox()
            owner.link_data(data)
        if self.closed:
            owner.link_lost(self._error)
            self._let_go()

    def direct(self) -> None:
        """The transport calls the owner's ``link_data`` itself, one call less per read:
        transports look data_received up when the protocol is set (uvloop) or at each
        read (asyncio), and both see this instance attribute. Setting the protocol
        costs what a few reads save, so a client session asks for it only once its
        connection has lived a few reads (a connection per query never does)."""
        if self.owner is None or self.closing:
            return
        self.data_received = self.owner.link_data  # type: ignore[method-assign]
        self._direct = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.set_protocol(self)

    def use(self, transport: asyncio.BaseTransport | None) -> None:
        """Talk through ``transport``: the accepted one, or the TLS one of start_tls
        (None if the connection closed during the handshake)."""
        if transport is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self._send = self.transport.write

    def write(self, data: bytes) -> None:
        # our own flag, not transport.is_closing(): that is a method call more on every
        # write, and this runs twice a transaction
        send = self._send
        if send is None or self.closing:
            return
        try:
            send(data)
        except RuntimeError:
            # uvloop: the transport closed itself (a socket error), connection_lost is
            # on the way; asyncio's transports drop such writes themselves
            self.closing = True

    def close(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.close()

    def pause_reading(self, paused: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.abort()
