"""Replacing a function of ipex-llm's shared model code wherever its models call it.

ipex-llm's model modules (``ipex_llm.transformers.models.<architecture>``) import their
helpers from its ``common`` module by name, so a replacement goes into ``common`` (which
modules imported later take it from) and into each model module already imported. ipex-llm
is no longer maintained upstream (2.2.0 is pinned): what is replaced here will not move.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

_MODELS_PACKAGE = "ipex_llm.transformers.models"
_COMMON_MODULE = f"{_MODELS_PACKAGE}.common"


class CommonFunction:
    """The function ``name`` of ipex-llm's common module, and ``replacement`` for it."""

    def __init__(self, name: str, replacement: Callable[..., Any]):
        self.name = name
        self.replacement = replacement
        self._original: Callable[..., Any] | None = None

    def original(self) -> Callable[..., Any]:
        """ipex-llm's own function, kept on first use, before anything replaces it."""
        if self._original is None:
            self._original = getattr(importlib.import_module(_COMMON_MODULE), self.name)
            assert self._original is not self.replacement
        return self._original

    def install(self) -> None:
        """Make ipex-llm's models call the replacement (idempotent)."""
        self._swap(self.original(), self.replacement)

    def uninstall(self) -> None:
        """Give ipex-llm's models their own function back (for comparisons)."""
        self._swap(self.replacement, self.original())

    def _swap(self, old: Callable[..., Any], new: Callable[..., Any]) -> None:
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith(_MODELS_PACKAGE) and \
                    getattr(module, self.name, None) is old:
                setattr(module, self.name, new)
