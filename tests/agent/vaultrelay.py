"""An HTTP relay in front of the real OpenBao that can rewrite one field of an answer.

A fake only for the fault: every request goes to OpenBao and every answer comes from
it; while a rewrite is set, the JSON answers to matching paths get one field replaced
(``"lease_duration": "3 seconds"``), as a broken proxy or plugin might. Threads, so
it serves sync tests (the agent as a subprocess) and async ones alike.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass(frozen=True)
class Rewrite:
    """Replace ``field`` (a dotted path into the JSON answer) for paths containing ``path``."""

    path: str
    field: str
    value: Any


class RewritingRelay:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.rewrite: Rewrite | None = None
        self.rewritten = 0  # answers changed so far
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None  # requests carry tokens: never print them

            def _relay(self) -> None:
                relay.forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_LIST = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        request = urllib.request.Request(
            self.target + handler.path, data=body, headers=headers, method=handler.command
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, reply, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, reply, kind = exc.code, exc.read(), exc.headers
        reply = self._maybe_rewrite(handler.path, reply)
        handler.send_response(status)
        handler.send_header("Content-Type", kind.get("Content-Type", "application/json"))
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def _maybe_rewrite(self, path: str, reply: bytes) -> bytes:
        rule = self.rewrite
        if rule is None or rule.path not in path or not reply:
            return reply
        try:
            data = json.loads(reply)
        except ValueError:
            return reply
        *parents, last = rule.field.split(".")
        node = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            return reply
        node[last] = rule.value
        self.rewritten += 1
        return json.dumps(data).encode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
