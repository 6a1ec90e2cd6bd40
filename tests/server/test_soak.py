"""A CI-sized soak (bench/soak.py): connection churn over the real protocol, then the server is back to its baseline."""

from __future__ import annotations

from pathlib import Path

from bench.soak import report, soak
from tests.serverproc import start_server


async def test_churn_returns_to_baseline(tmp: Path) -> None:
    # Abruptly dropped sessions stay resumable for the resume window: keep it well inside settle_s.
    srv = start_server(tmp, resume_window=3)
    try:
        result = await soak(srv, duration=15, clients=15, warmup=3, settle_s=20, rss_tolerance_mib=30, every=5)
    finally:
        srv.stop()
    assert result["passed"], report(result)
    assert result["connections"] >= 30 and result["subscribes"] >= 60 and result["frames"] > 1000, report(result)
    assert result["endings"].get("complete") and result["endings"].get("unsubscribed"), report(result)
    assert result["peak"]["streams"] > 0 and result["peak"]["tasks"] > result["baseline"]["tasks"], "the churn never loaded the server"
