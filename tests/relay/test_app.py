"""``create_app``: building the app is quiet (the suite runs with ``filterwarnings = error``)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any, cast

from litestar.exceptions import HTTPException, ValidationException

from rapidphoto_contract.settings import RelayConfig
from rapidphoto_relay.app import create_app
from tests.conftest import TEST_SECRET


def _settings() -> RelayConfig:
    return RelayConfig.from_env(
        {"JWT_SECRET": TEST_SECRET, "RELAY_CORS_ORIGINS": "https://a.example"}
    )


def test_create_app_emits_no_warnings() -> None:
    """Regression: ``Parameter(query=...)`` and inferred dependencies (``services``) raised
    Litestar deprecation warnings, so any in-process use under ``-W error`` failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app = create_app(_settings())
        app.openapi_schema  # noqa: B018 - built lazily: its warnings count too
    assert [str(w.message) for w in caught] == []


def test_importing_and_creating_the_app_is_quiet_in_a_fresh_interpreter() -> None:
    """Import-time warnings fire once per process: only a fresh interpreter sees them all."""
    code = (
        "from rapidphoto_contract.settings import RelayConfig\n"
        "from rapidphoto_relay.app import create_app\n"
        "create_app(RelayConfig.from_env()).openapi_schema\n"
    )
    env = {**os.environ, "JWT_SECRET": TEST_SECRET}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_parameter_validation_error_never_echoes_the_url() -> None:
    """Regression: Litestar's validation error quotes the whole request URL in its detail, and the
    relay copied that detail into the ``{"error": ...}`` body, so a request with an
    ``access_token`` in its query and a parameter Litestar refused got its token echoed back."""
    app = create_app(_settings())
    handler = app.exception_handlers[HTTPException]
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    exc = ValidationException(
        detail=f"Validation failed for GET http://relay/api/x?access_token={token}&lastEventId=1",
        extra=[{"key": "lastEventId", "message": "Expected `str`", "source": "query"}],
    )
    response = handler(cast("Any", None), exc)
    assert response.status_code == 400
    assert response.content == {"error": "invalid request parameters: lastEventId"}
    assert token not in str(response.content)
