"""The Lua scripts, one per command (PROTOCOL §1) and two for a completion's notification, loaded
once per process.

Each script is ``rapidphoto_contract.lua_scripts.build(lua/lib.lua, lua/<command>.lua)``: the
contract's generated constants and Lua libraries (stream ids, the event encoders generated from
``events.py``, the session state's encoding), then this package's Lua. So the names the relay reads,
the bytes the relay forwards and the encoding the relay decodes have one source (CONVENTIONS §2).

At start-up :func:`load_scripts` sends ``SCRIPT LOAD`` for each (to every master of a cluster), so a
script that does not compile stops the worker before it takes a job. Jobs then run them through
:class:`~rapidphoto_worker.state.StateRedis`, which sends ``EVALSHA`` (redis-py's ``AsyncScript``)
and, if the server has forgotten the script (a restart, ``SCRIPT FLUSH``, a replica promoted by a
fail-over), loads it again.
"""

from __future__ import annotations

from typing import Final

import attrs
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

# One script per job (JOB_NAMES, the one list of them), named after it: <job name>.lua.
from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    FAIL_PHOTO_UPLOAD,
    JOB_NAMES,
    START_UPLOAD_SESSION,
)
from rapidphoto_contract.lua_scripts import build, read_lua
from rapidphoto_worker.state import StateRedis

#: The completion's second step (the owner's slot) and its end (the session's slot), PROTOCOL §9.
NOTIFY_SESSION_COMPLETED: Final = "notify_session_completed"
CLEAR_COMPLETION: Final = "clear_completion"
SCRIPT_NAMES: Final = (*JOB_NAMES, NOTIFY_SESSION_COMPLETED, CLEAR_COMPLETION)


def _read(name: str) -> str:
    return read_lua(__package__, name)


def script_source(name: str) -> str:
    """The full text of one script, as sent to Redis."""
    if name not in SCRIPT_NAMES:
        raise ValueError(f"no script for {name!r}")
    return build(_read("lib.lua"), _read(f"{name}.lua"))


@attrs.frozen(kw_only=True)
class Scripts:
    """The scripts, registered on the state's client."""

    start_upload_session: AsyncScript
    complete_photo_upload: AsyncScript
    fail_photo_upload: AsyncScript
    notify_session_completed: AsyncScript
    clear_completion: AsyncScript


async def load_scripts(state: StateRedis) -> Scripts:
    """Register the scripts on ``state``'s client and load them into Redis now (fail fast)."""
    client: aioredis.Redis = state.client  # type: ignore[assignment]  # the cluster's has it too
    registered = {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}
    for script in registered.values():
        sha = await state.script_load(script)
        if sha != script.sha:  # cannot happen unless the client and server disagree on encoding
            raise RuntimeError(f"SCRIPT LOAD returned {sha}, expected {script.sha}")
    return Scripts(
        start_upload_session=registered[START_UPLOAD_SESSION],
        complete_photo_upload=registered[COMPLETE_PHOTO_UPLOAD],
        fail_photo_upload=registered[FAIL_PHOTO_UPLOAD],
        notify_session_completed=registered[NOTIFY_SESSION_COMPLETED],
        clear_completion=registered[CLEAR_COMPLETION],
    )
