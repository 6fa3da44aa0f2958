"""The Lua scripts, one per command (PROTOCOL §1), loaded once per process.

Each script is built as ``<constants> + lua/lib.lua + lua/<command>.lua``. The constants (hash field
names, photo marks, log field names, event types, statuses) are generated from the contract package,
so the names the relay reads and the names the scripts write have one source (CONVENTIONS §2).

At start-up :func:`load_scripts` sends ``SCRIPT LOAD`` for each, so a script that does not compile stops
the worker before it takes a job. Jobs then call them through redis-py's ``AsyncScript``, which sends
``EVALSHA`` and, if the server has forgotten the script (a restart, ``SCRIPT FLUSH``), loads it again.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Final

import attrs
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from rapidphoto_contract import events, keys

# One script per job (JOB_NAMES, the one list of them), named after it: <job name>.lua.
from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    FAIL_PHOTO_UPLOAD,
    JOB_NAMES,
    START_UPLOAD_SESSION,
)

#: Lua globals the scripts use, and where their values come from.
CONSTANTS: Final[dict[str, str]] = {
    "F_OWNER": keys.STATE_OWNER,
    "F_TOTAL": keys.STATE_TOTAL,
    "F_UPLOADED": keys.STATE_UPLOADED,
    "F_FAILED": keys.STATE_FAILED,
    "F_STATUS": keys.STATE_STATUS,
    "F_FAILURE_SEQ": keys.STATE_FAILURE_SEQ,
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


def _lua_string(value: str) -> str:
    # A JSON string is a valid Lua string literal as long as it needs no \u escape.
    if not (value.isascii() and value.isprintable()):
        raise ValueError(f"constant {value!r} must be printable ASCII to be inlined in Lua")
    return json.dumps(value)


def _read(name: str) -> str:
    return (resources.files(__package__) / "lua" / name).read_text(encoding="utf-8")


def script_source(name: str) -> str:
    """The full text of one command's script, as sent to Redis."""
    if name not in JOB_NAMES:
        raise ValueError(f"no script for {name!r}")
    header = "\n".join(
        f"local {lua_name} = {_lua_string(value)}" for lua_name, value in CONSTANTS.items()
    )
    return "\n".join(
        [
            "-- constants generated from rapidphoto_contract by rapidphoto_worker.scripts",
            header,
            _read("lib.lua"),
            _read(f"{name}.lua"),
        ]
    )


@attrs.frozen(kw_only=True)
class Scripts:
    """The three command scripts, registered on one client."""

    start_upload_session: AsyncScript
    complete_photo_upload: AsyncScript
    fail_photo_upload: AsyncScript


async def load_scripts(client: aioredis.Redis) -> Scripts:
    """Register the scripts on ``client`` and load them into the server now (fail fast)."""
    registered = {name: client.register_script(script_source(name)) for name in JOB_NAMES}
    for script in registered.values():
        sha = await client.script_load(script.script)
        if sha != script.sha:  # cannot happen unless the client and server disagree on encoding
            raise RuntimeError(f"SCRIPT LOAD returned {sha}, expected {script.sha}")
    return Scripts(
        start_upload_session=registered[START_UPLOAD_SESSION],
        complete_photo_upload=registered[COMPLETE_PHOTO_UPLOAD],
        fail_photo_upload=registered[FAIL_PHOTO_UPLOAD],
    )
