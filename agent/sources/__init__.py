"""One module per credential kind; :func:`create` picks the class for a config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.lazy import load_class

if TYPE_CHECKING:
    from agent.config import SecretConfig
    from agent.sources.base import Source, SourceContext

# kind -> "module:Class"; modules load lazily so a config pays only for what it uses
_KINDS = {
    "database": "agent.sources.database:DatabaseSource",
    "kv": "agent.sources.kv:KvSource",
    "database-static": "agent.sources.static:StaticDatabaseSource",
    "pki": "agent.sources.pki:PkiSource",
    "file": "agent.sources.file:FileSource",
    "command": "agent.sources.command:CommandSource",
    "aws-secretsmanager": "agent.sources.aws:SecretsManagerSource",
}


def create(config: SecretConfig, context: SourceContext) -> Source:
    source_class: type[Source] = load_class(_KINDS[config.kind])
    return source_class(config, context)
