"""Channel and key names (PROTOCOL §4 fixes the channels; CONVENTIONS §2: built in one module)."""

from __future__ import annotations

from redis.crc import key_slot

from rapidphoto_contract import keys


def test_channel_names_are_exactly_the_specs() -> None:
    assert keys.session_channel("s1") == "upload-session:s1"
    assert keys.notification_channel("u1") == "user-notifications:u1"
    assert keys.session_channel("a" * 128) == "upload-session:" + "a" * 128


def test_channel_prefixes() -> None:
    assert keys.SESSION_CHANNEL_PREFIX == "upload-session:"
    assert keys.NOTIFICATION_CHANNEL_PREFIX == "user-notifications:"


def test_session_data_keys() -> None:
    assert keys.session_state_key("s1") == "rapidphoto:{upload-session:s1}:state"
    assert keys.session_photos_key("s1") == "rapidphoto:{upload-session:s1}:photos"
    assert keys.session_failures_key("s1") == "rapidphoto:{upload-session:s1}:failures"
    assert keys.session_log_key("s1") == "rapidphoto:{upload-session:s1}:log"
    assert (
        keys.user_notifications_log_key("u1") == "rapidphoto:{user-notifications:u1}:notifications"
    )


def test_session_keys_order_is_state_photos_failures_log() -> None:
    """The Lua scripts take KEYS in this order."""
    assert keys.session_keys("s1") == (
        "rapidphoto:{upload-session:s1}:state",
        "rapidphoto:{upload-session:s1}:photos",
        "rapidphoto:{upload-session:s1}:failures",
        "rapidphoto:{upload-session:s1}:log",
    )


def test_data_keys_never_collide_with_arq_or_channels() -> None:
    built = [
        *keys.session_keys("s1"),
        keys.user_notifications_log_key("s1"),
    ]
    assert all(k.startswith(f"{keys.KEY_PREFIX}:") for k in built)
    assert keys.KEY_PREFIX == "rapidphoto"
    assert not any(k.startswith("arq:") for k in built)
    assert len(set(built)) == len(built)


def test_user_and_session_with_the_same_id_do_not_share_keys() -> None:
    assert keys.user_notifications_log_key("x") not in keys.session_keys("x")
    assert keys.session_channel("x") != keys.notification_channel("x")


def test_field_names() -> None:
    assert (
        keys.STATE_OWNER,
        keys.STATE_TOTAL,
        keys.STATE_UPLOADED,
        keys.STATE_FAILED,
        keys.STATE_STATUS,
        keys.STATE_FAILURE_SEQ,
        keys.STATE_PENDING_NOTIFICATION,
    ) == ("owner", "total", "uploaded", "failed", "status", "fseq", "notify")
    assert keys.PHOTO_UPLOADED_MARK == "U"
    assert keys.PHOTO_FAILED_PREFIX == "F:"
    assert (keys.LOG_FIELD_TYPE, keys.LOG_FIELD_DATA) == ("type", "data")


def test_a_sessions_keys_and_channel_share_one_cluster_slot() -> None:
    """PROTOCOL §9: the hash tag is the channel name, so one script can touch a session's keys and
    SPUBLISH on its channel on a cluster; likewise a user's."""
    for sid in ("s1", "a" * 128, "x-_9"):
        slots = {key_slot(k.encode()) for k in keys.session_keys(sid)}
        assert slots == {key_slot(keys.session_channel(sid).encode())}
    user = [keys.user_notifications_log_key("u1"), keys.session_completion_key("u1", "s1")]
    assert {key_slot(k.encode()) for k in user} == {key_slot(b"user-notifications:u1")}
    assert (
        keys.session_completion_key("u1", "s1") == "rapidphoto:{user-notifications:u1}:completed:s1"
    )
