"""Properties of job decoding (PROTOCOL §3; issue 9): arbitrary bytes and arbitrary JSON arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rapidphoto_contract.ids import ID_PATTERN
from rapidphoto_contract.jobs import (
    MAX_REASON_LENGTH,
    MAX_TOTAL_PHOTOS,
    CompletePhotoUpload,
    FailPhotoUpload,
    InvalidCommand,
    StartUploadSession,
    deserialize_job,
    serialize_job,
)
from tests.support.properties import PROPERTY, json_values

ids = st.from_regex(ID_PATTERN, fullmatch=True) | st.text(max_size=140) | json_values
argument = st.sampled_from(["session_id", "user_id", "photo_id", "total_photos", "reason", "x"])
kwargs_maps = st.dictionaries(
    argument,
    ids | st.integers(-5, MAX_TOTAL_PHOTOS + 5) | st.text(max_size=MAX_REASON_LENGTH + 5),
    max_size=5,
)
COMMANDS: list[Any] = [StartUploadSession, CompletePhotoUpload, FailPhotoUpload]


def _outcome(fn: Any, arg: Any, expected: type[Exception]) -> Any:
    """``fn(arg)``, or the exception it raised if it is an ``expected`` one (others propagate)."""
    try:
        return fn(arg)
    except expected as exc:
        return exc


@PROPERTY
@given(raw=st.binary(max_size=1024))
@example(raw=b"[" * 100_000)  # RecursionError from json.loads
@example(raw=b'{"a":' * 5000 + b"1" + b"}" * 5000)
@example(raw=b"\xff\xfe{}")
@example(raw=b"1" * 5000)  # past Python's int digits limit
def test_arbitrary_bytes_are_a_job_or_a_value_error(raw: bytes) -> None:
    """Rule: ``deserialize_job`` (arq's job deserializer, fed whatever sits in Redis) returns a
    dict or raises ``ValueError`` with a message; no other exception type."""
    result = _outcome(deserialize_job, raw, ValueError)
    assert isinstance(result, dict) or (isinstance(result, ValueError) and str(result))


@PROPERTY
@given(obj=st.dictionaries(st.text(), json_values, max_size=6))
def test_json_objects_round_trip(obj: dict[str, Any]) -> None:
    """Rule: every JSON object is a job to the codec and comes back equal (results aside)."""
    obj.pop("r", None)
    assert deserialize_job(serialize_job(obj)) == obj
    assert deserialize_job(json.dumps(obj).encode()) == obj


@PROPERTY
@pytest.mark.parametrize("command", COMMANDS)
@given(kwargs=kwargs_maps)
@example(kwargs={"session_id": "notifications", "photo_id": "p"})
@example(kwargs={"session_id": ["s"], "photo_id": {"p": 1}})
@example(kwargs={"session_id": [[[[[]]]]], "user_id": "u", "total_photos": 1})
def test_arbitrary_arguments_are_a_command_or_invalid_command(
    command: Any, kwargs: dict[str, Any]
) -> None:
    """Rule (PROTOCOL §3): any keyword arguments give a valid command or ``InvalidCommand`` with a
    clear message (never another exception, which a worker would report as a crash); a valid one
    has ids matching ``^[A-Za-z0-9_-]{1,128}$``, a session id other than ``notifications``,
    ``total_photos`` in 1..10000 and a non-blank reason of at most 1024 characters."""
    cmd = _outcome(command.parse, kwargs, InvalidCommand)
    if isinstance(cmd, InvalidCommand):
        assert str(cmd)
        return
    assert ID_PATTERN.fullmatch(cmd.session_id)
    assert cmd.session_id != "notifications"
    for name in ("user_id", "photo_id"):
        if hasattr(cmd, name):
            assert ID_PATTERN.fullmatch(getattr(cmd, name))
    if isinstance(cmd, StartUploadSession):
        assert type(cmd.total_photos) is int
        assert 1 <= cmd.total_photos <= MAX_TOTAL_PHOTOS
    if isinstance(cmd, FailPhotoUpload):
        assert cmd.reason.strip()
        assert len(cmd.reason) <= MAX_REASON_LENGTH
        cmd.reason.encode("utf-8")  # sendable
