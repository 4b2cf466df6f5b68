"""Sans-I/O PostgreSQL protocol: framing, the two state machines, authentication.

Nothing in this package does I/O or imports asyncio/socket (a test checks), so every
part is tested with byte strings.
"""

from proxy.protocol.backend import ServerConnection
from proxy.protocol.errors import (
    AuthenticationFailed,
    ClientProtocolViolation,
    ProtocolViolation,
    ServerProtocolViolation,
)
from proxy.protocol.frontend import ClientConnection

__all__ = [
    "AuthenticationFailed",
    "ClientConnection",
    "ClientProtocolViolation",
    "ProtocolViolation",
    "ServerConnection",
    "ServerProtocolViolation",
]
