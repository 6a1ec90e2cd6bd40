"""Finding the channels: the `streamplex.channels` entry-point group of every installed distribution.

The built-in channels are registered there by this project's own pyproject.toml, and a channel shipped in
another distribution the same way (docs/channels.md#your-own-channel): the core never imports a channel
package by name. One broken or clashing entry point is logged and left out; the others are served.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from streamplex.server.channel import Channel, Services

GROUP = "streamplex.channels"
OWN = "streamplex"  # this project's distribution: its channels win a clash with another distribution's

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Found:
    """A channel class and the distribution that registered it."""

    cls: type[Channel]
    dist: str
    value: str


def _dist(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def _load(ep: EntryPoint) -> type[Channel] | None:
    """The Channel subclass `ep` names, or None (logged) if it cannot be one."""
    where = f"channel entry point {ep.name!r} = {ep.value!r} (distribution {_dist(ep)})"
    try:
        obj = ep.load()
    except Exception:
        log.exception("%s is left out: loading it failed", where)
        return None
    if not (inspect.isclass(obj) and issubclass(obj, Channel)):
        log.error("%s is left out: it is not a subclass of streamplex.server.channel.Channel", where)
        return None
    if inspect.isabstract(obj):
        log.error("%s is left out: %s is abstract (it must implement stream)", where, obj.__qualname__)
        return None
    missing = [a for a in ("name", "summary", "Params") if not hasattr(obj, a)]
    if missing:
        log.error("%s is left out: %s sets no %s", where, obj.__qualname__, ", ".join(missing))
        return None
    if obj.name != ep.name:
        log.error("%s is left out: the class's name is %r; the entry point must be named after it", where, obj.name)
        return None
    return obj


def discover(eps: Iterable[EntryPoint] | None = None) -> dict[str, type[Channel]]:
    """Every valid channel of the entry-point group, by name. Two distributions registering one name: this
    project's own channel is kept, and between two others neither is (the clash is logged either way)."""
    by_name: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP) if eps is None else eps:
        by_name.setdefault(ep.name, []).append(ep)
    found: dict[str, type[Channel]] = {}
    for name, candidates in sorted(by_name.items()):
        unique = list({(ep.value, _dist(ep)): ep for ep in candidates}.values())  # one distribution seen twice on sys.path
        if len(unique) > 1:
            own = [ep for ep in unique if _dist(ep) == OWN]
            listed = "; ".join(f"{ep.value} from {_dist(ep)}" for ep in unique)
            if len(own) != 1:
                log.error("channel %r is registered by more than one distribution (%s): none of them is served", name, listed)
                continue
            log.error("channel %r is registered by more than one distribution (%s): the built-in one is served", name, listed)
            unique = own
        cls = _load(unique[0])
        if cls is not None:
            found[name] = cls
    return found


def instantiate(classes: dict[str, type[Channel]], services: Services) -> dict[str, Channel]:
    """One instance of each channel class; a constructor that raises is logged and its channel left out."""
    channels: dict[str, Channel] = {}
    for name, cls in classes.items():
        try:
            channels[name] = cls(services)
        except Exception:
            log.exception("channel %r (%s.%s) is left out: its constructor failed", name, cls.__module__, cls.__qualname__)
    return channels
