"""The Lua side of the contract: every script of the worker and the relay is built here.

A Redis script cannot load another, so each one is sent whole, assembled by :func:`build` as::

    #!lua ...         the shebang (Redis 7): see SHEBANG
    <constants>       generated: key field names, photo marks, log fields, event types, statuses
    lua/stream_ids.lua   the one Lua comparison of stream entry ids (PROTOCOL §4)
    lua/json.lua         the wire format's JSON values (jstr, jint)
    <encoders>        generated: one encoder per event the worker publishes (ENCODERS)
    lua/session_state.lua  the one encoding of a session's state in Redis (PROTOCOL §10)
    <the service's own Lua, one or more parts>

So names come from ``keys.py`` and ``events.py`` only, and the order and names of an event's fields
are written only in ``events.py`` (PROTOCOL §4): ``ENCODERS[<type>](e)`` returns the payload of an
event, from a table ``e`` keyed by the event class's attribute names (``event_id``, ``occurred_at``,
``session_id``, ...). Free text (``FREE_TEXT_FIELDS``) is passed already JSON-encoded by Python,
whose encoder the bytes must match; every other value is a plain Lua string or number.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Final

import attrs

from rapidphoto_contract import events, keys

#: Every script declares itself with a shebang, so Redis enforces what it declares. Above all, on a
#: cluster a script then may only touch keys of one slot: without it, a script may silently reach a
#: key of another slot that happens to live on the same node, which works in a test and fails once
#: the slots are resharded (PROTOCOL §9). A service's own Lua may start with a shebang of its own
#: (e.g. ``#!lua flags=no-writes`` for a read that must run while Redis is out of memory); build()
#: moves it to the top.
SHEBANG: Final = "#!lua"

#: Lua globals of every script, and where their values come from.
CONSTANTS: Final[dict[str, str]] = {
    "F_OWNER": keys.STATE_OWNER,
    "F_TOTAL": keys.STATE_TOTAL,
    "F_UPLOADED": keys.STATE_UPLOADED,
    "F_FAILED": keys.STATE_FAILED,
    "F_STATUS": keys.STATE_STATUS,
    "F_FAILURE_SEQ": keys.STATE_FAILURE_SEQ,
    "F_PENDING_NOTIFICATION": keys.STATE_PENDING_NOTIFICATION,
    "UPLOADED_MARK": keys.PHOTO_UPLOADED_MARK,
    "FAILED_PREFIX": keys.PHOTO_FAILED_PREFIX,
    "LOG_FIELD_TYPE": keys.LOG_FIELD_TYPE,
    "LOG_FIELD_DATA": keys.LOG_FIELD_DATA,
    "STATUS_IN_PROGRESS": events.STATUS_IN_PROGRESS,
    "STATUS_COMPLETED": events.STATUS_COMPLETED,
    "SESSION_STARTED": events.SESSION_STARTED,
    "PHOTO_UPLOADED": events.PHOTO_UPLOADED,
    "PHOTO_FAILED": events.PHOTO_FAILED,
    "SESSION_COMPLETED": events.SESSION_COMPLETED,
    "NOTIFICATION": events.NOTIFICATION,
    "KIND_UPLOAD_SESSION_COMPLETED": events.KIND_UPLOAD_SESSION_COMPLETED,
}

#: The events the worker's scripts publish (PROTOCOL §4); the relay makes the others in Python.
WORKER_EVENTS: Final = (
    events.SessionStarted,
    events.PhotoUploaded,
    events.PhotoFailed,
    events.SessionCompleted,
    events.Notification,
)

#: String fields that hold free text: the encoder takes them JSON-encoded (``events.dumps`` rules).
FREE_TEXT_FIELDS: Final = frozenset({"reason"})


def lua_string(value: str) -> str:
    """``value`` as a Lua string literal (a JSON string is one, as long as it needs no escape)."""
    if not (value.isascii() and value.isprintable()):
        raise ValueError(f"constant {value!r} must be printable ASCII to be inlined in Lua")
    return json.dumps(value)


def read_lua(package: str, name: str) -> str:
    """The text of ``lua/<name>`` shipped inside ``package`` (package data)."""
    return (resources.files(package) / "lua" / name).read_text(encoding="utf-8")


def _encoder(cls: type[events.Event]) -> str:
    """``ENCODERS[<type>] = function(e) return <payload> end``, fields in ``events.py`` order."""
    literal = ['{"type":' + json.dumps(cls.TYPE)]  # constant text between the values
    parts: list[str] = []
    for field in attrs.fields(cls):
        if field.type in (int, "int"):
            value = f"jint(e.{field.name})"
        elif field.type not in (str, "str", "str | None"):
            raise TypeError(f"{cls.__name__}.{field.name}: no Lua encoding for {field.type!r}")
        elif field.name in FREE_TEXT_FIELDS:
            value = f"e.{field.name}"
        else:
            value = f"jstr(e.{field.name})"
        literal.append("," + json.dumps(events.wire_name(field.name)) + ":")
        parts.append(lua_string("".join(literal)))
        parts.append(value)
        literal = []
    parts.append(lua_string("".join(literal) + "}"))
    body = " ..\n    ".join(parts)
    return f"ENCODERS[{lua_string(cls.TYPE)}] = function(e)\n  return {body}\nend"


def constants() -> str:
    """The generated constants every script starts with."""
    return "\n".join(f"local {name} = {lua_string(value)}" for name, value in CONSTANTS.items())


def encoders() -> str:
    """The Lua encoder of every event in :data:`WORKER_EVENTS` (needs ``jstr`` and ``jint``)."""
    return "\n".join(["local ENCODERS = {}", *(_encoder(cls) for cls in WORKER_EVENTS)])


def _shebang(parts: tuple[str, ...]) -> tuple[str, list[str]]:
    """The shebang of ``parts`` (at most one may have one, on its first line), and the parts
    without it."""
    found = [part.partition("\n")[0] for part in parts if part.startswith("#!")]
    if len(found) > 1:
        raise ValueError(f"more than one shebang: {found}")
    rest = [part.partition("\n")[2] if part.startswith("#!") else part for part in parts]
    return (found[0] if found else SHEBANG), rest


def build(*parts: str) -> str:
    """One whole script: a shebang, the contract's generated constants and Lua libraries, then
    ``parts``."""
    shebang, body = _shebang(parts)
    if not shebang.startswith(SHEBANG):
        raise ValueError(f"not a Lua shebang: {shebang!r}")
    return "\n".join(
        [
            shebang,
            "-- generated by rapidphoto_contract.lua_scripts from keys.py and events.py",
            constants(),
            read_lua(__package__, "stream_ids.lua"),
            read_lua(__package__, "json.lua"),
            encoders(),
            read_lua(__package__, "session_state.lua"),
            *body,
        ]
    )
