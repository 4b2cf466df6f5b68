"""Load an implementation by ``"module:Class"`` name.

Credential sources and rotators are looked up this way so that a config pays
(in import time and memory) only for the kinds it uses.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_class(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
