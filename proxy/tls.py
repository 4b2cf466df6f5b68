"""The client-facing TLS context, rebuilt when the certificate or key file changes."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from proxy.config import TLSConfig

log = logging.getLogger("credsidecar.proxy")


class TLSFiles:
    """The client-facing TLS context, rebuilt when the certificate or key file changes.

    A renewal (the agent renders a new bundle) is picked up at the next handshake
    without a restart; a file that does not load keeps the previous context in use.
    """

    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._context: ssl.SSLContext | None = None

    def _files(self) -> list[Path]:
        return [p for p in (self.config.cert, self.config.key) if p is not None]

    def context(self) -> ssl.SSLContext:
        try:
            stamp = tuple(
                (st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, self._files())
            )
        except OSError as exc:
            if self._context is None:
                raise
            log.warning("proxy_tls_unreadable", extra={"error": exc.strerror})
            return self._context
        if stamp != self._stamp:
            try:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                key = str(self.config.key) if self.config.key is not None else None
                ctx.load_cert_chain(str(self.config.cert), key)
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise
                # half-replaced or broken files: keep serving with what worked
                log.warning("proxy_tls_reload_failed", extra={"error": str(exc)})
                return self._context
            self._stamp = stamp
            self._context = ctx
            log.info("proxy_tls_loaded", extra={"cert": str(self.config.cert)})
            return ctx
        assert self._context is not None  # a stamp is only recorded with a context
        return self._context
