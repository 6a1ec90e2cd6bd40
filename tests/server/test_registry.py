"""Channel discovery by entry points, from real distribution metadata (dist-info folders) and real modules on a temporary path."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint, distributions, entry_points
from pathlib import Path

import pytest

import streamplex.channels
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Channel, Services
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.registry import GROUP, discover, instantiate

ROOT = Path(__file__).resolve().parents[2]

MODULE = """
from collections.abc import AsyncIterator
from typing import Any

from streamplex.server.channel import Channel, ParamsModel, StreamContext


class Params(ParamsModel):
    text: str = ""


class Good(Channel):
    name = "{name}"
    summary = "a test channel"
    Params = Params

    async def stream(self, params: Any, ctx: StreamContext) -> AsyncIterator[Any]:
        yield params.text


class Misnamed(Good):
    name = "other"


class Abstract(Channel):
    name = "abstract"
    summary = "no stream"
    Params = Params


class Fails(Good):
    name = "fails"

    def __init__(self, services: Any) -> None:
        raise RuntimeError("no GPU here")


NOT_A_CHANNEL = object()
"""


def _dist(root: Path, dist: str, module: str, eps: dict[str, str], channel: str = "good") -> list[EntryPoint]:
    """A distribution `dist` installed under `root`: its module and its dist-info with `eps` in the group."""
    (root / f"{module}.py").write_text(MODULE.replace("{name}", channel))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()))
    return [ep for d in distributions(path=[str(root)]) if d.metadata["Name"] == dist for ep in d.entry_points if ep.group == GROUP]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.endswith("_mod")]:
        del sys.modules[name]


def test_the_built_in_channels_are_all_registered_by_the_project() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    defined = {}
    for info in pkgutil.iter_modules(streamplex.channels.__path__):
        module = importlib.import_module(f"streamplex.channels.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Channel) and not inspect.isabstract(obj) and obj.__module__ == module.__name__:
                defined[obj.name] = f"{module.__name__}:{obj.__qualname__}"
    assert declared == defined, "every channel class of channels/ is listed in pyproject.toml's entry points (then run scripts/setup)"
    installed = {ep.name: ep.value for ep in entry_points(group=GROUP) if ep.dist is not None and ep.dist.name == "streamplex"}
    assert installed == declared, "the installed metadata is stale: run scripts/setup"
    found = discover()
    assert set(declared) <= set(found)
    assert all(found[name].__module__ == f"streamplex.channels.{name}" for name in declared)


def test_a_valid_channel_is_found_under_its_name(site: Path) -> None:
    eps = _dist(site, "good-dist", "good_mod", {"good": "good_mod:Good"})
    found = discover(eps)
    assert list(found) == ["good"] and issubclass(found["good"], Channel) and found["good"].__module__ == "good_mod"


@pytest.mark.parametrize(
    ("eps", "logged"),
    [
        ({"good": "good_mod:Missing"}, "loading it failed"),
        ({"good": "no_such_module:Good"}, "loading it failed"),
        ({"good": "good_mod:NOT_A_CHANNEL"}, "not a subclass of streamplex.server.channel.Channel"),
        ({"abstract": "good_mod:Abstract"}, "Abstract is abstract"),
        ({"renamed": "good_mod:Misnamed"}, "the class's name is 'other'"),
    ],
)
def test_a_broken_entry_point_is_logged_and_left_out(site: Path, caplog: pytest.LogCaptureFixture, eps: dict[str, str], logged: str) -> None:
    broken = _dist(site, "broken-dist", "good_mod", eps)
    fine = _dist(site, "fine-dist", "fine_mod", {"fine": "fine_mod:Good"}, channel="fine")
    with caplog.at_level(logging.ERROR, "streamplex.server.registry"):
        found = discover(broken + fine)
    assert list(found) == ["fine"]
    (record,) = caplog.records
    assert logged in record.getMessage() and "broken-dist" in record.getMessage()


def test_two_distributions_claiming_a_name_serve_neither(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    one = _dist(site, "one-dist", "one_mod", {"good": "one_mod:Good"})
    two = _dist(site, "two-dist", "two_mod", {"good": "two_mod:Good"})
    with caplog.at_level(logging.ERROR, "streamplex.server.registry"):
        assert discover(one + two) == {}
    (record,) = caplog.records
    assert "more than one distribution" in record.getMessage() and "one-dist" in record.getMessage() and "two-dist" in record.getMessage()


def test_a_built_in_name_stays_built_in(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = [ep for ep in entry_points(group=GROUP) if ep.name == "text"]
    clash = _dist(site, "clash-dist", "clash_mod", {"text": "clash_mod:Good"}, channel="text")
    with caplog.at_level(logging.ERROR, "streamplex.server.registry"):
        found = discover(own + clash)
    assert found["text"].__module__ == "streamplex.channels.text"
    assert "the built-in one is served" in caplog.text and "clash-dist" in caplog.text


def test_one_distribution_seen_twice_is_one(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    eps = _dist(site, "good-dist", "good_mod", {"good": "good_mod:Good"})
    with caplog.at_level(logging.ERROR, "streamplex.server.registry"):
        assert list(discover(eps + eps)) == ["good"]
    assert not caplog.records


def test_a_constructor_that_raises_leaves_only_its_channel_out(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    eps = _dist(site, "good-dist", "good_mod", {"good": "good_mod:Good", "fails": "good_mod:Fails"})
    classes = discover(eps)
    assert sorted(classes) == ["fails", "good"]
    services = Services(settings=Settings(), feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "node"), stats=dict)
    with caplog.at_level(logging.ERROR, "streamplex.server.registry"):
        channels = instantiate(classes, services)
    assert list(channels) == ["good"]
    assert "'fails'" in caplog.text and "no GPU here" in caplog.text
