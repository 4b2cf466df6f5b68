"""credsidecar PostgreSQL proxy: swaps upstream credentials without dropping queries.

This package never imports ``agent``; it gets credentials through
:class:`proxy.credentials.CredentialProvider`.
"""
