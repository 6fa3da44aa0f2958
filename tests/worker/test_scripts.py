"""rapidphoto_worker.scripts: how the command scripts are put together and loaded."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from rapidphoto_contract import events, keys, lua_scripts
from rapidphoto_worker import scripts
from rapidphoto_worker.context import WorkerContext
from rapidphoto_worker.state import StateRedis


@pytest.mark.parametrize("name", scripts.SCRIPT_NAMES)
def test_each_script_is_the_contract_lua_then_lib_then_the_command(name: str) -> None:
    source = scripts.script_source(name)

    assert source == lua_scripts.build(scripts._read("lib.lua"), scripts._read(f"{name}.lua"))
    # PROTOCOL §9: a shebang, so a cluster refuses any key outside the script's one slot.
    assert source.startswith("#!lua\n")
    # Field names, marks and event types come from the contract, not from the Lua files.
    assert f'local F_OWNER = "{keys.STATE_OWNER}"' in source
    assert f'local FAILED_PREFIX = "{keys.PHOTO_FAILED_PREFIX}"' in source
    assert f'local NOTIFICATION = "{events.NOTIFICATION}"' in source
    order = [
        "local F_OWNER",  # generated constants
        "local function stream_id_cmp",  # contract: stream_ids.lua
        "local function jstr",  # contract: json.lua
        f'ENCODERS["{events.PHOTO_UPLOADED}"]',  # generated from events.py
        "local function session_read",  # contract: session_state.lua
        "local function next_id",  # worker: lib.lua
        f"-- {name} (PROTOCOL",  # worker: the command
    ]
    assert [source.index(part) for part in order] == sorted(source.index(p) for p in order)


def test_the_worker_lua_never_touches_the_state_encoding_itself() -> None:
    # The hash fields and photo marks are the contract's session_state.lua's alone (issue 10).
    for name in ("lib.lua", *(f"{job}.lua" for job in scripts.SCRIPT_NAMES)):
        own = scripts._read(name)
        for constant in ("F_OWNER", "F_TOTAL", "F_STATUS", "UPLOADED_MARK", "FAILED_PREFIX"):
            assert constant not in own, f"{name} uses {constant}"
        for command in ("HSET", "HGET", "HMGET", "HINCRBY"):
            assert command not in own, f"{name} uses {command}"


def test_every_constant_is_used() -> None:
    lua = "".join(scripts.script_source(name) for name in scripts.SCRIPT_NAMES)
    for name in lua_scripts.CONSTANTS:
        assert f"local {name} = " in lua
        assert lua.count(name) > 1, f"{name} is defined but never used"


def test_unknown_scripts_and_unsafe_constants_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no script"):
        scripts.script_source("drop_everything")
    monkeypatch.setitem(lua_scripts.CONSTANTS, "F_OWNER", 'own"er\n')
    with pytest.raises(ValueError, match="printable ASCII"):
        scripts.script_source(scripts.SCRIPT_NAMES[0])


async def test_loading_puts_every_script_in_the_server(
    app: WorkerContext, redis_client: aioredis.Redis
) -> None:
    loaded = [getattr(app.scripts, name) for name in scripts.SCRIPT_NAMES]
    assert await redis_client.script_exists(*(s.sha for s in loaded)) == [True] * len(loaded)
    assert len({s.sha for s in loaded}) == len(scripts.SCRIPT_NAMES) == 5


async def test_a_script_that_does_not_compile_fails_at_load_not_at_the_first_job(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read = scripts._read

    def broken(name: str) -> str:
        return real_read(name) + ("\nthis is not lua" if name == "fail_photo_upload.lua" else "")

    monkeypatch.setattr(scripts, "_read", broken)
    with pytest.raises(redis_errors.ResponseError, match="compiling"):
        await scripts.load_scripts(StateRedis(redis_client))
