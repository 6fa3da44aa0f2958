"""Ids of one load-test run: session ``<prefix>-s<n>`` is owned by user ``<prefix>-u<n>``.

Shared by the publisher (which creates the sessions) and the locustfile (which mints each owner's
token and opens its stream). A fresh prefix per run keeps runs apart in a shared Redis.
"""

from __future__ import annotations

import secrets


def run_prefix() -> str:
    """A new run's prefix, e.g. ``lt3f9a2c`` (valid in ids: ``^[A-Za-z0-9_-]{1,128}$``)."""
    return f"lt{secrets.token_hex(3)}"


def session_id(prefix: str, n: int) -> str:
    return f"{prefix}-s{n}"


def user_id(prefix: str, n: int) -> str:
    return f"{prefix}-u{n}"
