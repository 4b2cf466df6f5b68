"""The command line's side of the admin API: one request to the running agent.

It connects to the agent's admin socket (or, when the config has only the TCP
listener, to that with the bearer token) and says clearly when no agent answers.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from agent.admin import AdminError, read_token
from agent.config import Config
from agent.errors import SidecarError

MAX_RESPONSE = 1024 * 1024


class NoAgent(SidecarError):
    """No agent answers on the admin API of this config."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(self, config: Config) -> None:
        if config.admin is None:
            raise AdminError("the admin API is off in this config (admin: {socket: false})")
        self.admin = config.admin

    @property
    def where(self) -> str:
        if self.admin.socket is not None:
            return str(self.admin.socket)
        return f"{self.admin.listen_host}:{self.admin.listen_port}"

    def request(
        self, method: str, path: str, timeout: float, **query: str
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body). Raises NoAgent when nothing answers, AdminError when
        we may not connect."""
        url = path + (f"?{urlencode(query)}" if query else "")
        headers = {}
        conn: http.client.HTTPConnection
        if self.admin.socket is not None:
            conn = _UnixConnection(self.admin.socket, timeout)
        else:
            assert self.admin.listen_host is not None and self.admin.token_file is not None
            conn = http.client.HTTPConnection(
                self.admin.listen_host, self.admin.listen_port, timeout=timeout
            )
            headers["Authorization"] = f"Bearer {read_token(self.admin.token_file)}"
        try:
            conn.request(method, url, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_RESPONSE + 1)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoAgent(
                f"no credsidecar is running with this config (nothing answers at {self.where})"
            ) from None
        except PermissionError:
            raise AdminError(
                f"not permitted to connect to {self.where}: it is owner-only; run this as "
                f"the agent's user (we are uid {os.geteuid()})"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(f"the agent at {self.where} did not answer: {exc}") from None
        finally:
            conn.close()
        if len(raw) > MAX_RESPONSE:
            raise AdminError(f"the agent at {self.where} answered more than {MAX_RESPONSE} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise AdminError(f"the agent at {self.where} answered HTTP {response.status}, not JSON")
        return response.status, body


def rotate_path(name: str) -> str:
    return f"/rotate/{quote(name, safe='')}"
