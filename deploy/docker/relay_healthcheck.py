"""Docker HEALTHCHECK of the relay image: ``GET /health/live`` on this container's ``RELAY_PORT``.

Liveness, not readiness: ``/health/ready`` is 503 while Redis is away, and a relay waiting for Redis
is alive (its streams stay open on heartbeats and resume when Redis returns, PROTOCOL §5); restarting
it would only drop them. The slim image has no curl, hence the standard library. Exit 0 healthy,
1 not (Docker's convention).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("RELAY_PORT", "").strip() or "8080"
    url = f"http://127.0.0.1:{port}/health/live"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"relay health check failed: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
