"""The channels: one module each, discovered at start (a new channel is one file here)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from channels.base import Channel


def discover() -> dict[str, type[Channel]]:
    """Every Channel subclass defined in this package's modules, by name."""
    found: dict[str, type[Channel]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Channel) and not inspect.isabstract(obj) and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))
