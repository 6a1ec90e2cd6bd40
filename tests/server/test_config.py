"""Settings: documented in docs/configuration.md, settable by env and by flag."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamplex.server.cli import build_parser
from streamplex.server.config import ROOT, Settings, settings_table


def test_configuration_doc_lists_every_setting() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_table() in doc, "regenerate with: python -m streamplex.server.config"


def test_env_then_flags_override(monkeypatch) -> None:
    monkeypatch.setenv("STREAMPLEX_MAX_STREAMS", "7")
    monkeypatch.setenv("STREAMPLEX_PORT", "9000")
    args = {k: v for k, v in vars(build_parser().parse_args(["--port", "9100", "--no-per-message-deflate"])).items() if v is not None}
    settings = Settings(**args)
    assert (settings.max_streams, settings.port, settings.per_message_deflate) == (7, 9100, False)


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert Settings(trusted_proxies="10.0.0.5, 10.8.0.0/16,2001:db8::/32").trusted_proxies
    for bad in ("*", "STATIC_IP", "10.0.0.0/33"):
        with pytest.raises(ValidationError, match="is not an IP address or network"):
            Settings(trusted_proxies=bad)
