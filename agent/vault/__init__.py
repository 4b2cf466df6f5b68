"""Async access to a Vault-API server (HashiCorp Vault or OpenBao): client and logins."""
