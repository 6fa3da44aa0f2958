"""Reading the event logs (PROTOCOL §5): Last-Event-ID coverage, replays and snapshots.

A stream never trusts pub/sub alone. It subscribes first (the hub confirms), *then* reads the log,
and finally drains what the subscription buffered meanwhile, skipping every id at or below the
highest one the log read returned (``floor``): nothing falls in the gap and nothing is sent twice.

Session streams, given the id the client last saw (``Last-Event-ID``) or the stream's own cursor:

- *covered* (the id is not newer than the newest entry, and no entry newer than it was trimmed):
  exactly the entries after it, ``XRANGE (<id> +``;
- otherwise (trimmed past, from the future, malformed, absent): a ``SESSION_SNAPSHOT`` built from
  the state hash and the failures set, carrying the id of the newest entry it reflects.

Both are decided and read by one Lua script, so the coverage check, the entries and the snapshot are
one atomic view of the session. Trimming (``MAXLEN ~``) only ever removes the oldest entries, so an
id is covered when the first remaining entry is at most its successor; when it is not, the log may
still hold everything (entry ids are not contiguous), which ``XINFO STREAM`` tells us: no entry was
ever removed when ``entries-added`` equals ``length``.

Notification streams have no snapshot: the entries after the id (all of them when the id is older
than the log); a stream opened without a usable id starts from the newest entry read *before* it
subscribed, so notifications racing the subscription are still delivered once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Literal, TypeVar

import attrs
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.events import STATUS_COMPLETED, Failure, SessionSnapshot, progress_percent
from rapidphoto_contract.lua_scripts import build, read_lua
from rapidphoto_contract.stream_ids import StreamId, format_stream_id, parse_stream_id, successor
from rapidphoto_relay import sse
from rapidphoto_relay.cluster_reads import SlotRouter
from rapidphoto_relay.payload import Message, log_entry_message

T = TypeVar("T")

#: PROTOCOL §4: a snapshot lists the 100 most recent failures at most.
SNAPSHOT_FAILURES: Final = 100

#: The session read of the module docstring, one Lua script: ``lua/sync_session.lua`` (package
#: data) after the contract's Lua, through which it reads the state the worker's scripts write.
#: Built once at import: a missing file stops the relay at start-up.
SYNC_SESSION_LUA: Final = build(read_lua(__package__, "sync_session.lua"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_messages(entries: Sequence[Any]) -> list[Message]:
    """Frames for raw ``XRANGE`` entries (``[id, [field, value, ...]]`` or redis-py's tuples)."""
    out: list[Message] = []
    for entry_id, fields in entries:
        if isinstance(fields, dict):
            mapping = fields
        else:
            mapping = dict(zip(fields[::2], fields[1::2], strict=True))
        data = mapping.get(keys.LOG_FIELD_DATA.encode())
        kind = mapping.get(keys.LOG_FIELD_TYPE.encode())
        if data is None or kind is None:
            continue  # not an event entry: nothing a client could use
        out.append(log_entry_message(entry_id, kind, data))
    return out


def _sync_args(after: StreamId | None) -> list[str | int]:
    return [
        "" if after is None else format_stream_id(after),
        "" if after is None else format_stream_id(successor(after)),
        SNAPSHOT_FAILURES,
    ]


def _session_sync(
    session_id: str, after: StreamId | None, reply: Any, *, whole: bool
) -> SessionSync:
    """A ``sync_session.lua`` reply, read (see :meth:`LogReader.sync_session`)."""
    outcome = _text(reply[0])
    if outcome == "missing":
        return SessionSync(outcome="missing")
    owner, status = _text(reply[1]), _text(reply[2])
    if outcome == "replay":
        messages = _entry_messages(reply[3])
        completed = False
        for index, message in enumerate(messages):
            if message.terminal:
                completed = True
                if not whole:
                    del messages[index + 1 :]
                break
        high = messages[-1].stream_id if messages else after
        # A failed photo uploaded after completion appends to a completed session's log: the
        # stream still ends, after those entries.
        completed = completed or status == STATUS_COMPLETED
        return SessionSync(
            outcome="replay", owner=owner, messages=messages, high=high, completed=completed
        )
    total, uploaded, failed = int(reply[3]), int(reply[4]), int(reply[5])
    newest = parse_stream_id(reply[6]) if reply[6] else None
    flat = [_text(x) for x in reply[7]]
    snapshot = SessionSnapshot(
        event_id=None if newest is None else format_stream_id(newest),
        session_id=session_id,
        total_photos=total,
        uploaded_photos=uploaded,
        failed_photos=failed,
        progress_percent=progress_percent(uploaded, failed, total),
        status=status,
        failures=tuple(
            Failure(photo_id=flat[i], reason=flat[i + 1]) for i in range(0, len(flat), 2)
        ),
    )
    frame = sse.event(
        snapshot.to_json(), event_type=SessionSnapshot.TYPE, event_id=snapshot.event_id
    )
    return SessionSync(
        outcome="snapshot",
        owner=owner,
        messages=[Message(frame, newest)],
        high=newest,
        completed=status == STATUS_COMPLETED,
    )


@attrs.frozen(kw_only=True)
class SessionProbe:
    """What a session stream request needs before it answers: who owns it, is it done, log end."""

    owner: str | None
    status: str | None
    newest: StreamId | None

    @property
    def completed(self) -> bool:
        return self.status == STATUS_COMPLETED


@attrs.frozen(kw_only=True)
class SessionSync:
    """One atomic read of a session: ``missing``, a ``replay`` or a ``snapshot``.

    ``messages`` are the frames to write, in order; ``high`` the newest log id they reflect (the
    stream's new floor and cursor); ``completed`` whether the session is done after them.
    """

    outcome: Literal["missing", "replay", "snapshot"]
    owner: str | None = None
    messages: list[Message] = attrs.field(factory=list)
    high: StreamId | None = None
    completed: bool = False


class LogReader:
    """The relay's reads of session state and logs, on the commands connection pool; on a cluster
    (``router``), each read on the master that owns its keys' slot (PROTOCOL §9)."""

    def __init__(self, redis: aioredis.Redis, router: SlotRouter | None = None) -> None:
        self._redis = redis
        self._router = router
        self._sync_session = redis.register_script(SYNC_SESSION_LUA)

    async def _on(self, key: str, read: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``read`` with the client that holds ``key`` (every read touches one slot)."""
        if self._router is None:
            return await read(self._redis)
        return await self._router.run(key, read)

    async def probe_session(self, session_id: str) -> SessionProbe:
        # One round trip, but not a MULTI: Redis refuses every command queued in a MULTI while it
        # is out of memory (maxmemory reached, noeviction), reads included, and a stream must
        # open then (PROTOCOL §5: 503 only while Redis is unusable). Atomicity is not needed: the
        # status is read first, so a log entry it saw is in ``newest`` too (a 204 stays right).
        async def read(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                _probe(pipe, session_id)
                replies: list[Any] = await pipe.execute()
            return replies

        return _probe_result(*await self._on(keys.session_state_key(session_id), read))

    async def session_owner(self, session_id: str) -> str | None:
        key = keys.session_state_key(session_id)
        owner = await self._on(key, lambda client: client.hget(key, keys.STATE_OWNER))
        return None if owner is None else _text(owner)

    async def probe_sessions(self, session_ids: Sequence[str]) -> list[SessionProbe]:
        """:meth:`probe_session` for several sessions in one round trip (PROTOCOL §5.1); on a
        cluster, one per session, all at once (their slots are on several masters)."""
        if self._router is not None:
            return list(await asyncio.gather(*(self.probe_session(s) for s in session_ids)))
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                _probe(pipe, session_id)
            replies = await pipe.execute()
        return [_probe_result(*pair) for pair in zip(replies[::2], replies[1::2], strict=True)]

    async def sync_session(
        self, session_id: str, after: StreamId | None, *, whole: bool = False
    ) -> SessionSync:
        """Entries after ``after`` if the log still covers it, else a snapshot (PROTOCOL §5).

        A replay stops at the session's ``SESSION_COMPLETED`` (its stream ends there) unless
        ``whole``: a multi-session stream delivers what a completed session's log gets later too.
        """
        session_keys = keys.session_keys(session_id)
        reply = await self._on(
            session_keys[0],
            lambda client: self._sync_session(
                keys=session_keys, args=_sync_args(after), client=client
            ),
        )
        return _session_sync(session_id, after, reply, whole=whole)

    async def sync_sessions(
        self, requests: Sequence[tuple[str, StreamId | None]]
    ) -> list[SessionSync]:
        """:meth:`sync_session` (``whole``) for several sessions in one round trip; each read is
        atomic on its own, which is all a session's stream needs (PROTOCOL §5.1). On a cluster,
        one per session, all at once."""
        if len(requests) == 1 or self._router is not None:
            return list(
                await asyncio.gather(
                    *(self.sync_session(sid, after, whole=True) for sid, after in requests)
                )
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id, after in requests:
                await self._sync_session(
                    keys=keys.session_keys(session_id), args=_sync_args(after), client=pipe
                )
            replies = await pipe.execute()
        return [
            _session_sync(session_id, after, reply, whole=True)
            for (session_id, after), reply in zip(requests, replies, strict=True)
        ]

    async def newest_notification(self, user_id: str) -> StreamId | None:
        key = keys.user_notifications_log_key(user_id)
        newest = await self._on(key, lambda client: client.xrevrange(key, "+", "-", count=1))
        return parse_stream_id(newest[0][0]) if newest else None

    async def notifications_after(self, user_id: str, after: StreamId | None) -> list[Message]:
        """Every notification after ``after`` (the whole log when ``None`` or older than it)."""
        start = "-" if after is None else "(" + format_stream_id(after)
        key = keys.user_notifications_log_key(user_id)
        entries = await self._on(key, lambda client: client.xrange(key, start, "+"))
        return _entry_messages(entries or [])


def _probe(pipe: Any, session_id: str) -> None:
    """Queue a session's probe: owner and status, and its newest log entry."""
    pipe.hmget(keys.session_state_key(session_id), [keys.STATE_OWNER, keys.STATE_STATUS])
    pipe.xrevrange(keys.session_log_key(session_id), "+", "-", count=1)


def _probe_result(state: Any, newest: Any) -> SessionProbe:
    owner, status = state
    return SessionProbe(
        owner=None if owner is None else _text(owner),
        status=None if status is None else _text(status),
        newest=parse_stream_id(newest[0][0]) if newest else None,
    )
