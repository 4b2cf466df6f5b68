"""credsidecar PostgreSQL proxy: swaps upstream credentials without dropping queries.

This package never imports ``agent``. Public interface::

    from proxy.config import parse_proxy_config, ProxyConfig, ProxyConfigError
    from proxy.credentials import (
        Credentials, CredentialProvider, StaticCredentialProvider, FileCredentialProvider,
    )
    from proxy.server import ProxyServer

    config = parse_proxy_config(raw_proxy_section, base_dir)  # ProxyConfigError(.problems)
    provider = StaticCredentialProvider()        # agent: provider.update(user, password)
    # or FileCredentialProvider(config.credentials.file)   # JSON {"username", "password"}
    server = ProxyServer(config, provider)       # registry=None: proxy.metrics.REGISTRY
    await server.start()                         # also starts the provider
    server.status()                              # pools, generations, clients; no secrets
    await server.stop(timeout=10.0)              # graceful; 57P01 past the deadline

Standalone: ``python -m proxy -c FILE`` (uvloop, file credentials).

Layout: ``protocol/`` is sans-I/O (framing, the client and server state machines,
authentication, the request pipeline that renames prepared statements);
``server.py`` accepts clients and runs sessions; ``upstream.py`` opens and logs in
server connections; ``pool.py`` keeps them per (database, startup options), tagged
with the credential generation they logged in with; ``credentials.py`` says where
credentials come from. Logs go to the ``credsidecar.proxy`` logger with ``extra``
fields; metrics are prefixed ``credsidecar_proxy_``.
"""

from proxy import build as _build

# before any compiled module is imported: CREDSIDECAR_PURE_PYTHON=1 picks the .py sources
_build.install()
