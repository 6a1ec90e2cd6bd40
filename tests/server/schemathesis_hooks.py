"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/server/test_apidocs.py)."""

from __future__ import annotations

import schemathesis


@schemathesis.check
def no_server_failure(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Any 5xx but 503 is a failure: 503 (with Retry-After) is how a channel without its model, or a draining server, answers."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"server failure {response.status_code}: {response.text[:500]}")
