"""rapidphoto_worker.scripts: how the command scripts are put together and loaded."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from rapidphoto_contract import events, keys
from rapidphoto_contract.jobs import JOB_NAMES
from rapidphoto_worker import scripts
from rapidphoto_worker.context import WorkerContext


@pytest.mark.parametrize("name", JOB_NAMES)
def test_each_script_is_contract_constants_then_lib_then_the_command(name: str) -> None:
    source = scripts.script_source(name)

    # Field names, marks and event types come from the contract, not from the Lua files.
    assert f'local F_OWNER = "{keys.STATE_OWNER}"' in source
    assert f'local FAILED_PREFIX = "{keys.PHOTO_FAILED_PREFIX}"' in source
    assert f'local LOG_FIELD_DATA = "{keys.LOG_FIELD_DATA}"' in source
    assert f'local NOTIFICATION = "{events.NOTIFICATION}"' in source
    constants = source.index("local F_OWNER")
    lib = source.index("local function next_id")
    command = source.index(f"-- {name} (PROTOCOL")
    assert constants < lib < command


def test_every_constant_the_scripts_use_is_defined() -> None:
    lua = "".join(scripts.script_source(name) for name in JOB_NAMES)
    for name in scripts.CONSTANTS:
        assert f"local {name} = " in lua
        assert lua.count(name) > 1, f"{name} is defined but never used"


def test_unknown_scripts_and_unsafe_constants_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no script"):
        scripts.script_source("drop_everything")
    monkeypatch.setitem(scripts.CONSTANTS, "F_OWNER", 'own"er\n')
    with pytest.raises(ValueError, match="printable ASCII"):
        scripts.script_source(JOB_NAMES[0])


async def test_loading_puts_every_script_in_the_server(
    app: WorkerContext, redis_client: aioredis.Redis
) -> None:
    loaded = [
        app.scripts.start_upload_session,
        app.scripts.complete_photo_upload,
        app.scripts.fail_photo_upload,
    ]
    assert await redis_client.script_exists(*(s.sha for s in loaded)) == [True, True, True]
    assert len({s.sha for s in loaded}) == 3


async def test_a_script_that_does_not_compile_fails_at_load_not_at_the_first_job(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read = scripts._read

    def broken(name: str) -> str:
        return real_read(name) + ("\nthis is not lua" if name == "fail_photo_upload.lua" else "")

    monkeypatch.setattr(scripts, "_read", broken)
    with pytest.raises(redis_errors.ResponseError, match="compiling"):
        await scripts.load_scripts(redis_client)
