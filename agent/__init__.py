"""credsidecar agent: obtains, renews and renders credentials and tells the application."""

__version__ = "0.1.0"
