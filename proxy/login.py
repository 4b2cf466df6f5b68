"""Logging a client in: the startup packets, the TLS answer, client authentication.

The functions work on a :class:`~proxy.session.ClientSession` in its ``LOGIN`` state,
reading through its setup-phase link; the session decides what happens next.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from proxy.clientauth import peer_allowed, peer_uid
from proxy.errors import ClientFatal
from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.auth import ScramVerifier
from proxy.protocol.errors import (
    AuthenticationFailed,
    ClientProtocolViolation,
    UnsupportedParameter,
)
from proxy.protocol.frontend import ClientConnection
from proxy.protocol.messages import remember
from proxy.protocol.parameters import client_settings
from proxy.transport import Link

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.session import ClientSession

TOO_MANY = m.error_response("53300", "sorry, too many clients already (max_client_conn)")
REFUSE_WITHIN = 2.0  # seconds a refused connection may take to send its startup packet


async def next_event(session: ClientSession) -> ev.ClientEvent:
    proto = session.proto
    while (event := proto.next_event()) is None:
        proto.receive_data(await session.link.recv())
    return event


def startup_now(session: ClientSession) -> m.StartupMessage | m.CancelRequest | m.SSLRequest | None:
    """The startup packets received so far, answered where that needs no wait: SSLRequest
    refused (no TLS configured, or a unix socket) and GSSENCRequest refused, a
    CancelRequest served. Returns the StartupMessage, the CancelRequest, an SSLRequest to
    accept (a handshake to await: :func:`accept_tls`), or None when more bytes are needed."""
    proto = session.proto
    while (event := proto.next_event()) is not None:
        if isinstance(event, m.SSLRequest):
            if _offers_tls(session):
                return event
            session.link.write(proto.send(ev.SSL_REFUSED))
        elif isinstance(event, m.GSSENCRequest):
            session.link.write(proto.send(ev.SSL_REFUSED))
        elif isinstance(event, m.CancelRequest):
            session.server.cancel(event)
            return event
        elif isinstance(event, m.StartupMessage):
            return event
    return None


async def startup(session: ClientSession) -> m.StartupMessage | m.CancelRequest:
    """The StartupMessage after any SSL/GSSENC negotiation, or a served CancelRequest."""
    while True:
        event = startup_now(session)
        if event is None:
            session.proto.receive_data(await session.link.recv())
        elif isinstance(event, m.SSLRequest):
            await accept_tls(session)
        else:
            return event


def parameters(session: ClientSession, event: m.StartupMessage) -> tuple[str, dict[str, str]]:
    """The database and the settings the client asks for; refuses what it cannot serve
    (08P01 "unsupported startup parameter", as PgBouncer) unless the config says to
    ignore it. The settings dict is shared by every login with the same packet: it is
    never changed in place (proxy/session.py compares it by identity first)."""
    ignored = session.server.ignored_startup_parameters
    kept = _ACCEPTED.get(event)
    if kept is not None and kept[0] is ignored:
        session.user = kept[1]
        return kept[2], kept[3]
    params = dict(event.parameters)
    session.user = params.get("user", "")
    if not session.user:
        raise ClientFatal("28000", "no PostgreSQL user name specified in startup packet")
    if "replication" in params and params["replication"] not in ("false", "0", "off"):
        raise ClientFatal("08P01", "replication connections are not supported by the proxy")
    unsupported = [k for k in params if k.startswith("_pq_.")]
    if event.protocol & 0xFFFF or unsupported:
        unsupported.sort()
        for key in unsupported:
            del params[key]
        session.link.write(session.proto.send(ev.NegotiateProtocolVersion(0, tuple(unsupported))))
    try:
        settings = client_settings(params, ignored)
    except UnsupportedParameter as exc:
        raise ClientFatal(exc.sqlstate, str(exc)) from None
    database = params.get("database") or session.user
    if not (event.protocol & 0xFFFF or unsupported):  # nothing to answer: the same again
        size = sum([len(k) + len(v) for k, v in event.parameters.items()])
        remember(_ACCEPTED, event, (ignored, session.user, database, settings), size)
    return database, settings


# startup packets accepted, with what they gave: the ignored names they were read
# with, the user, the database and the settings
_ACCEPTED: Final[dict[m.StartupMessage, tuple[frozenset[str], str, str, dict[str, str]]]] = {}


def _offers_tls(session: ClientSession) -> bool:
    return session.server.tls is not None and not session.unix


async def accept_tls(session: ClientSession) -> None:
    """'S' to an SSLRequest, then the handshake; the link talks TLS from then on."""
    link = session.link
    tls = session.server.tls
    assert tls is not None  # startup_now returns an SSLRequest only when there is TLS
    ctx = tls.context()
    if session.proto.buffered:
        # bytes after SSLRequest, before the handshake: plaintext injection (CVE-2021-23214)
        raise ClientProtocolViolation("data received before the TLS handshake")
    link.write(session.proto.send(ev.SSL_ACCEPTED))
    assert link.transport is not None
    # the TLS transport asks the accepted one, which it lets go of once closed: a
    # log line after that (the client left mid-query) would miss the address
    session.keep_peer_address()
    transport = await asyncio.get_running_loop().start_tls(
        link.transport, link, ctx, server_side=True
    )
    link.use(transport)


def authenticated_now(session: ClientSession) -> bool:
    """Client auth that needs no message from the client (trust, peer): True when it
    passed, raises AuthenticationFailed when not; False when the client must answer
    (SCRAM: :func:`authenticate`)."""
    method = session.server.client_auth_method
    if method == "trust":
        return True
    if method == "peer":
        link = session.link
        sock = link.transport.get_extra_info("socket") if link.transport else None
        if not session.unix or sock is None:
            raise AuthenticationFailed("peer authentication (unix socket only) failed", "28000")
        if not peer_allowed(peer_uid(sock), session.server.config.client_auth.peer_uids()):
            raise AuthenticationFailed("peer authentication failed", "28000")
        return True
    return False


async def authenticate(session: ClientSession) -> None:
    """Client auth per ``client_auth.method``; raises AuthenticationFailed."""
    if authenticated_now(session):
        return
    link = session.link
    users = session.server.users
    assert users is not None
    proto = session.proto
    verifier = ScramVerifier(users.lookup(session.user))
    link.write(proto.send(ev.AuthenticationRequest(m.AUTH_SASL, verifier.mechanisms())))
    first = await next_event(session)
    assert isinstance(first, ev.PasswordMessage)
    server_first = verifier.client_first(first.payload)
    link.write(proto.send(ev.AuthenticationRequest(m.AUTH_SASL_CONTINUE, server_first)))
    final = await next_event(session)
    assert isinstance(final, ev.PasswordMessage)
    server_final = verifier.client_final(final.payload)
    link.write(m.authentication(m.AUTH_SASL_FINAL, server_final))


async def refuse_too_many(server: ProxyServer, link: Link) -> None:
    """A connection past max_client_conn: 53300 after its startup packet (as PostgreSQL
    does; clients trust no error sent before TLS is settled), 'N' to SSL, within
    :data:`REFUSE_WITHIN`; a CancelRequest is still served."""
    proto = ClientConnection()
    try:
        async with asyncio.timeout(REFUSE_WITHIN):
            while True:
                event = proto.next_event()
                if event is None:
                    proto.receive_data(await link.recv())
                elif isinstance(event, m.SSLRequest | m.GSSENCRequest):
                    link.write(proto.send(ev.SSL_REFUSED))
                elif isinstance(event, m.CancelRequest):
                    server.cancel(event)
                    return
                else:
                    break
    except (ClientProtocolViolation, TimeoutError, ConnectionError):
        pass
    finally:
        link.write(TOO_MANY)
        link.close()
