"""Id validation (PROTOCOL §3): ``^[A-Za-z0-9_-]{1,128}$``, and ``notifications`` is not a session id."""

from __future__ import annotations

import pytest

from rapidphoto_contract.ids import (
    RESERVED_SESSION_IDS,
    InvalidId,
    is_valid_id,
    validate_id,
    validate_session_id,
)

VALID = ["a", "A", "0", "_", "-", "s1", "user_42", "photo-0001", "a" * 128, "Az09_-"]

INVALID: list[object] = [
    "",
    "a" * 129,
    "a:b",  # our key separator
    "a*",  # glob characters would make a channel name a pattern
    "a?",
    "[a]",
    "a{b}",  # Redis Cluster hash tag
    "a b",
    " a",
    "a\n",  # a trailing newline must not slip past a `$` anchor
    "a\t",
    "é",  # non-ASCII letters
    "\uff41",  # fullwidth latin a
    "\u0661",  # Arabic-Indic digit one, a \d but not [0-9]
    "a/b",
    "a.b",
    "a\x00",
    None,
    1,
    1.5,
    b"abc",
    ["a"],
    True,
]


@pytest.mark.parametrize("value", VALID)
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)
    assert validate_id("photo_id", value) == value
    assert validate_session_id(value) == value


@pytest.mark.parametrize("value", INVALID, ids=repr)
def test_invalid_ids(value: object) -> None:
    assert not is_valid_id(value)
    with pytest.raises(InvalidId) as info:
        validate_id("photo_id", value)
    assert info.value.field == "photo_id"
    assert str(info.value).startswith("photo_id must match ^[A-Za-z0-9_-]{1,128}$")
    with pytest.raises(InvalidId):
        validate_session_id(value)


def test_notifications_is_not_a_session_id() -> None:
    """``/api/upload/sessions/notifications/stream`` is the notification stream's URL."""
    assert frozenset({"notifications"}) == RESERVED_SESSION_IDS
    with pytest.raises(InvalidId) as info:
        validate_session_id("notifications")
    assert info.value.field == "session_id"
    assert "'notifications'" in str(info.value)
    # Only that exact id: it is a fine user or photo id, and near names are fine session ids.
    assert validate_id("user_id", "notifications") == "notifications"
    assert validate_session_id("Notifications") == "Notifications"
    assert validate_session_id("notifications2") == "notifications2"


def test_error_names_the_field() -> None:
    with pytest.raises(InvalidId, match=r"^user_id must match"):
        validate_id("user_id", "bad id")
    with pytest.raises(InvalidId, match=r"^sessionId must match"):
        validate_session_id("a:b", field="sessionId")


def test_error_shortens_huge_values() -> None:
    """An absurdly long id must not be copied whole into logs and error bodies."""
    with pytest.raises(InvalidId) as info:
        validate_id("photo_id", "x" * 100_000)
    assert len(str(info.value)) < 120
    assert str(info.value).endswith("...")


def test_invalid_id_is_a_value_error() -> None:
    assert issubclass(InvalidId, ValueError)
