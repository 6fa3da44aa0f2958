"""The wire format has one source, ``rapidphoto_contract.events`` (PROTOCOL §4; issue 10).

The worker's scripts publish through encoders generated from the event classes. Every payload the
real scripts write is held to the classes themselves: decoded with ``decode_event`` and encoded
again with ``to_json``, it must come back byte for byte, so a field the Lua adds, drops, renames or
moves fails here. Every event type the worker publishes is covered, including ``SESSION_COMPLETED``
and ``notification``, and a failure reason that JSON encoders disagree on.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from rapidphoto_contract import keys, lua_scripts
from rapidphoto_contract.events import decode_event
from rapidphoto_contract.jobs import CompletePhotoUpload, FailPhotoUpload, StartUploadSession
from rapidphoto_worker import commands
from rapidphoto_worker.context import WorkerContext
from tests.support.worker import log_entries

REASON = 'a/b "quoted" \\ caf\u00e9 \U0001f4f7 \x7f \u2028 </script>'


async def test_every_payload_the_scripts_publish_is_the_contract_encoding(
    app: WorkerContext, redis_client: aioredis.Redis
) -> None:
    await commands.start_upload_session(
        app, StartUploadSession(session_id="s1", user_id="u1", total_photos=3)
    )
    await commands.complete_photo_upload(app, CompletePhotoUpload(session_id="s1", photo_id="p1"))
    await commands.fail_photo_upload(
        app, FailPhotoUpload(session_id="s1", photo_id="p2", reason=REASON)
    )
    await commands.complete_photo_upload(app, CompletePhotoUpload(session_id="s1", photo_id="p3"))

    entries = await log_entries(redis_client, keys.session_log_key("s1"))
    entries += await log_entries(redis_client, keys.user_notifications_log_key("u1"))
    published_types = {cls.TYPE for cls in lua_scripts.WORKER_EVENTS}
    assert {event_type for _, event_type, _ in entries} == published_types
    for entry_id, event_type, data in entries:
        event = decode_event(data)
        assert event_type == event.TYPE
        assert getattr(event, "event_id", None) == entry_id
        assert event.to_json() == data
    failed = next(decode_event(d) for _, t, d in entries if t == "PHOTO_FAILED")
    assert getattr(failed, "reason", None) == REASON
