"""How the proxy checks who a client is: trust, SCRAM against a users file, peer.

The users file uses PgBouncer's ``userlist.txt`` format: one ``"name" "secret"`` per
line, the secret a SCRAM-SHA-256 verifier (as in ``pg_authid``) or, for tests and
local setups, a plain password. It is re-read when it changes.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from proxy.protocol.auth import DEFAULT_ITERATIONS, DEFAULT_SALT_LEN, ScramSecret

# per process, like PostgreSQL's mock_auth_nonce: mock salts are stable while we run
# and cannot be told from real ones by anyone who does not know it
_MOCK_KEY = secrets.token_bytes(32)


class UsersFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, ScramSecret] = {}
        self._shape = (DEFAULT_SALT_LEN, DEFAULT_ITERATIONS)

    def lookup(self, user: str) -> ScramSecret:
        """``user``'s verifier, or a mock one shaped like the file's (see ScramSecret.mock)."""
        try:
            st = self.path.stat()
        except OSError:
            self._users, self._stamp = {}, None
        else:
            stamp = (st.st_mtime, st.st_size)
            if stamp != self._stamp:
                self._users = parse_users(self.path.read_text())
                self._shape = _common_shape(self._users.values())
                self._stamp = stamp
        secret = self._users.get(user)
        if secret is not None:
            return secret
        return ScramSecret.mock(_MOCK_KEY, user, *self._shape)


def _common_shape(secrets_: Iterable[ScramSecret]) -> tuple[int, int]:
    """The (salt length, iterations) most verifiers have, for the mock ones to match."""
    shapes = Counter((len(s.salt), s.iterations) for s in secrets_)
    if not shapes:
        return DEFAULT_SALT_LEN, DEFAULT_ITERATIONS
    return shapes.most_common(1)[0][0]


def parse_users(text: str) -> dict[str, ScramSecret]:
    users: dict[str, ScramSecret] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(";") or line.lstrip().startswith("#"):
            continue
        try:
            name, secret = shlex.split(line)[:2]
        except ValueError:
            continue  # a malformed line is skipped; never echo it (it may hold a password)
        if secret.startswith("SCRAM-SHA-256$"):
            try:
                users[name] = ScramSecret.parse(secret)
            except ValueError:
                continue
        else:
            users[name] = ScramSecret.from_password(secret)
    return users


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def peer_allowed(uid: int, allowed_uids: tuple[int, ...]) -> bool:
    """Peer auth admits a uid, not a name: every client user logs in upstream as the
    application's one database identity, so the OS user name proves nothing."""
    return uid in allowed_uids


def secure_socket(path: Path, mode: int, gid: int | None) -> None:
    """Give the unix socket its configured group and mode (0660 by default: the
    filesystem already keeps out users who are neither us nor in our group)."""
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
