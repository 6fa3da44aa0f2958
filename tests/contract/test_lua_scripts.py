"""rapidphoto_contract.lua_scripts: the Lua every script starts with, and the generated encoders.

Each encoder is run in a real Redis on an event with a distinct value in every field, and must give
the event class's own ``to_json()`` byte for byte: the field names and their order are written only
in ``events.py`` (PROTOCOL §4).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import events, lua_scripts
from rapidphoto_contract.stream_ids import parse_stream_id

REASON = 'a/b "q" \\ caf\u00e9 \U0001f4f7 \x7f'


def sample(cls: type[events.Event]) -> events.Event:
    """An event of ``cls`` with a different value in every field."""
    values: dict[str, Any] = {}
    for number, field in enumerate(attrs.fields(cls), start=1):
        if field.type in (int, "int"):
            values[field.name] = number
        elif field.name in lua_scripts.FREE_TEXT_FIELDS:
            values[field.name] = REASON
        else:
            values[field.name] = f"{field.name}-{number}"
    event: events.Event = cls(**values)
    return event


def argv(event: events.Event) -> list[Any]:
    out: list[Any] = []
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        if field.name in lua_scripts.FREE_TEXT_FIELDS:
            value = json.dumps(value, ensure_ascii=False)  # as the worker's commands.py passes it
        elif isinstance(value, int):
            value = str(value)
        out.append(value)
    return out


@pytest.mark.parametrize("cls", lua_scripts.WORKER_EVENTS, ids=lambda cls: cls.TYPE)
async def test_each_generated_encoder_writes_the_event_classes_bytes(
    cls: type[events.Event], redis_client: aioredis.Redis
) -> None:
    event = sample(cls)
    names = [field.name for field in attrs.fields(cls)]
    table = ", ".join(
        f"{name} = tonumber(ARGV[{i}]) or ARGV[{i}]"
        if field.type in (int, "int")
        else f"{name} = ARGV[{i}]"
        for i, (name, field) in enumerate(zip(names, attrs.fields(cls), strict=True), start=1)
    )
    script = lua_scripts.build(f"return ENCODERS[{json.dumps(cls.TYPE)}]({{{table}}})")
    payload = await redis_client.eval(script, 0, *argv(event))
    assert payload == event.to_json()


def test_every_event_the_worker_publishes_has_an_encoder() -> None:
    source = lua_scripts.encoders()
    for name in (
        events.SESSION_STARTED,
        events.PHOTO_UPLOADED,
        events.PHOTO_FAILED,
        events.SESSION_COMPLETED,
        events.NOTIFICATION,
    ):
        assert f"ENCODERS[{json.dumps(name)}] = function(e)" in source


def test_a_field_type_without_a_lua_encoding_is_refused() -> None:
    @attrs.frozen(kw_only=True)
    class Odd(events.SessionStarted):
        ratio: float = 0.5

    with pytest.raises(TypeError, match="ratio"):
        lua_scripts._encoder(Odd)


IDS = ["0-0", "0-1", "9-0", "10-0", "10-9", "10-10", "99-18446744073709551615", "100-0"]


async def test_the_lua_id_comparison_orders_as_the_python_one(
    redis_client: aioredis.Redis,
) -> None:
    script = lua_scripts.build(
        "local out = {} for i = 1, #ARGV, 2 do out[#out + 1] = stream_id_cmp(ARGV[i], ARGV[i + 1])"
        " end return out"
    )
    pairs = [(x, y) for x in IDS for y in IDS]
    got = await redis_client.eval(script, 0, *(i for pair in pairs for i in pair))
    want = []
    for x, y in pairs:
        px, py = parse_stream_id(x), parse_stream_id(y)
        assert px is not None
        assert py is not None
        want.append((px > py) - (px < py))
    assert got == want


def test_the_contract_lua_ships_as_package_data() -> None:
    for name in ("stream_ids.lua", "json.lua", "session_state.lua"):
        assert lua_scripts.read_lua("rapidphoto_contract", name).startswith(f"-- {name}:")
