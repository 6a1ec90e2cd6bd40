"""Load every configured model once, so converted weights land in STREAMPLEX_CACHE_DIR and later starts are offline and fast.

Container builds run it (Dockerfile.cuda); the same STREAMPLEX_* settings as the server choose the models.
Exits non-zero when a model fails to load.
"""

from __future__ import annotations

import sys
import time

from streamplex.server.config import Settings
from streamplex.server.engine.factory import build_engine


def main() -> int:
    """Create and load each runner in turn; report each one."""
    engine = build_engine(Settings())
    failed = 0
    for name, spec in engine.specs.items():
        started = time.perf_counter()
        try:
            runner = spec.create()
            runner.load()
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: ready in {time.perf_counter() - started:.1f} s ({runner.describe()})", flush=True)
        runner.reset()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
