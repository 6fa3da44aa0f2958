"""The Lua scripts, one per command (PROTOCOL §1), loaded once per process.

Each script is ``rapidphoto_contract.lua_scripts.build(lua/lib.lua, lua/<command>.lua)``: the
contract's generated constants and Lua libraries (stream ids, the event encoders generated from
``events.py``, the session state's encoding), then this package's Lua. So the names the relay reads,
the bytes the relay forwards and the encoding the relay decodes have one source (CONVENTIONS §2).

At start-up :func:`load_scripts` sends ``SCRIPT LOAD`` for each, so a script that does not compile stops
the worker before it takes a job. Jobs then call them through redis-py's ``AsyncScript``, which sends
``EVALSHA`` and, if the server has forgotten the script (a restart, ``SCRIPT FLUSH``), loads it again.
"""

from __future__ import annotations

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


def _read(name: str) -> str:
    return read_lua(__package__, name)


def script_source(name: str) -> str:
    """The full text of one command's script, as sent to Redis."""
    if name not in JOB_NAMES:
        raise ValueError(f"no script for {name!r}")
    return build(_read("lib.lua"), _read(f"{name}.lua"))


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
