"""Optional dependencies, imported where they are used: ``import selfattn`` and ``attention()`` need torch alone.

    safe_open = need("safetensors", "models", "reading weights").safe_open
"""
from __future__ import annotations

import importlib
from types import ModuleType


def need(module: str, extra: str, what: str) -> ModuleType:
    """``module``, imported; if it is not installed, a ModuleNotFoundError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # something inside the module is missing: its own message says what
        raise ModuleNotFoundError(f"{what} needs {e.name}: pip install 'selfattn[{extra}]'", name=e.name) from None
