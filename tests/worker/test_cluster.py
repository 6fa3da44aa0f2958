"""The worker on a Redis Cluster (PROTOCOL §9): one slot per script, SPUBLISH, WAIT, fail-over and
resharding, against a real local 3-master/3-replica cluster (one for the whole module)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import arq
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.crc import key_slot

from rapidphoto_contract import keys, lua_scripts
from rapidphoto_contract.jobs import CompletePhotoUpload, FailPhotoUpload, StartUploadSession
from rapidphoto_contract.settings import WorkerConfig
from rapidphoto_worker import commands
from rapidphoto_worker.context import WorkerContext
from rapidphoto_worker.state import ReplicationTimeout
from tests.support.redis_cluster import RedisClusterNodes, migrate_slot, redis_cluster
from tests.support.worker import worker_context, worker_settings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nodes() -> Iterator[RedisClusterNodes]:
    with redis_cluster() as started:
        yield started


def cluster_settings(nodes: RedisClusterNodes, **overrides: object) -> WorkerConfig:
    return worker_settings(
        nodes.url, redis_cluster=True, queue_redis_url="redis://127.0.0.1:1/0", **overrides
    )


@pytest.fixture
async def app(nodes: RedisClusterNodes) -> AsyncIterator[WorkerContext]:
    async with worker_context(cluster_settings(nodes, redis_wait_replicas=1)) as ctx:
        yield ctx


def node(nodes: RedisClusterNodes, key: str) -> aioredis.Redis:
    return aioredis.Redis(port=nodes.owner_of(key), decode_responses=True)


async def start(app: WorkerContext, sid: str, user: str, total: int) -> commands.CommandResult:
    cmd = StartUploadSession(session_id=sid, user_id=user, total_photos=total)
    return await commands.start_upload_session(app, cmd)


async def upload(
    app: WorkerContext, sid: str, photo: str, job_try: int = 1
) -> commands.CommandResult:
    return await commands.complete_photo_upload(
        app, CompletePhotoUpload(session_id=sid, photo_id=photo), job_try
    )


def sessions_on_every_master(nodes: RedisClusterNodes, prefix: str) -> list[str]:
    """Session ids whose slots are on three different masters (and whose owner's slot differs)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(nodes.masters()):
        sid = f"{prefix}{n}"
        found.setdefault(nodes.owner_of(keys.session_state_key(sid)), sid)
        n += 1
    return list(found.values())


async def test_a_sessions_events_go_to_its_slot_and_the_notification_to_its_owners(
    nodes: RedisClusterNodes, app: WorkerContext
) -> None:
    """Each script touches one slot; SPUBLISH reaches sharded subscribers; the notification is
    written in the owner's slot, on another master."""
    user = "u-notify"
    user_master = nodes.owner_of(keys.user_notifications_log_key(user))
    sid = next(
        s
        for s in (f"c{n}" for n in range(1000))
        if nodes.owner_of(keys.session_state_key(s)) != user_master
    )
    session_node, user_node = (
        node(nodes, keys.session_log_key(sid)),
        node(nodes, keys.user_notifications_log_key(user)),
    )
    sub_s, sub_u = session_node.pubsub(), user_node.pubsub()
    try:
        await sub_s.ssubscribe(keys.session_channel(sid))
        await sub_u.ssubscribe(keys.notification_channel(user))
        assert app.state.publish == "SPUBLISH"
        await start(app, sid, user, 2)
        await upload(app, sid, "p1")
        done = await commands.fail_photo_upload(
            app, FailPhotoUpload(session_id=sid, photo_id="p2", reason="blurry")
        )
        assert done.completed

        log: list[tuple[str, dict[str, str]]] = await session_node.xrange(  # type: ignore[assignment]
            keys.session_log_key(sid)
        )
        assert [f["type"] for _, f in log] == [
            "SESSION_STARTED", "PHOTO_UPLOADED", "PHOTO_FAILED", "SESSION_COMPLETED",
        ]  # fmt: skip
        notes: list[tuple[str, dict[str, str]]] = await user_node.xrange(  # type: ignore[assignment]
            keys.user_notifications_log_key(user)
        )
        assert [i for i, _ in notes] == [done.notification_id]
        got = [await sub_s.get_message(timeout=2) for _ in range(5)]
        published = [m["data"] for m in got if m and m["type"] == "smessage"]
        assert published == [f["data"] for _, f in log]
        notified = [await sub_u.get_message(timeout=2) for _ in range(2)]
        assert [m["data"] for m in notified if m and m["type"] == "smessage"] == [
            f["data"] for _, f in notes
        ]
        assert not await session_node.hexists(
            keys.session_state_key(sid), keys.STATE_PENDING_NOTIFICATION
        )
    finally:
        for sub in (sub_s, sub_u):
            await sub.aclose()  # type: ignore[no-untyped-call]
        for client in (session_node, user_node):
            await client.aclose()


async def test_a_script_cannot_reach_a_key_of_another_slot_even_on_the_same_node(
    nodes: RedisClusterNodes,
) -> None:
    """The shebang makes Redis enforce one slot: without it, this script would work until the
    other key's slot is resharded away."""
    master = nodes.owner_of(keys.session_state_key("x0"))
    other = next(
        k
        for k in (f"other{n}" for n in range(10_000))
        if nodes.owner_of(k) == master and key_slot(k.encode()) != key_slot(b"upload-session:x0")
    )
    script = lua_scripts.build("return redis.call('GET', ARGV[1])")
    async with aioredis.Redis(port=master, decode_responses=True) as client:
        with pytest.raises(redis_errors.ResponseError, match="do not hash to the same slot"):
            await client.eval(script, 1, keys.session_state_key("x0"), other)
        # What the shebang prevents: the same Lua without it reads the other slot's key.
        body = "return redis.call('GET', ARGV[1])"
        assert await client.eval(body, 1, keys.session_state_key("x0"), other) is None
        # The same script on a key of its own slot is fine.
        assert (
            await client.eval(script, 1, keys.session_state_key("x0"), keys.session_log_key("x0"))
            is None
        )


async def test_too_few_replicas_confirming_in_time_retries_the_job_and_the_retry_is_a_duplicate(
    nodes: RedisClusterNodes, app: WorkerContext
) -> None:
    """REDIS_WAIT_REPLICAS more than the cluster has: WAIT times out, the job is retried; the
    write happened on the master, so the retry changes nothing and publishes nothing."""
    await start(app, "w1", "u-wait", 2)
    async with worker_context(
        cluster_settings(nodes, redis_wait_replicas=2, redis_wait_timeout_ms=50)
    ) as greedy:
        with pytest.raises(arq.Retry) as info:
            await upload(greedy, "w1", "p1")
        assert isinstance(info.value.__cause__, ReplicationTimeout)
    again = await upload(app, "w1", "p1")
    assert again.outcome == "duplicate"
    async with node(nodes, keys.session_log_key("w1")) as client:
        assert await client.xlen(keys.session_log_key("w1")) == 2


async def test_commands_keep_working_through_a_cluster_failover(
    nodes: RedisClusterNodes, app: WorkerContext
) -> None:
    """After CLUSTER FAILOVER the slot's master is the old replica: MOVED, then NOSCRIPT there
    (scripts are not replicated), both handled without failing the command."""
    sid = "f1"
    await start(app, sid, "u-failover", 3)
    await upload(app, sid, "p1")
    master = nodes.owner_of(keys.session_state_key(sid))
    replica = nodes.replica_of(master)
    with nodes.client(replica) as c:
        c.execute_command("CLUSTER", "FAILOVER")
    nodes.wait_master(replica)

    assert (await upload(app, sid, "p2")).outcome == "applied"
    assert nodes.owner_of(keys.session_state_key(sid)) == replica
    done = await upload(app, sid, "p3")
    assert done.completed


async def test_commands_keep_working_while_their_slot_is_resharded(
    nodes: RedisClusterNodes, app: WorkerContext
) -> None:
    """While its slot migrates, a command gets ASK (followed with ASKING on the target) and then
    TRYAGAIN (Redis refuses a multi-key command there until all of its keys are in): the job is
    retried, having changed nothing; once the slot is handed over, MOVED, and it applies, once."""
    sid = "r1"
    await start(app, sid, "u-reshard", 3)
    await upload(app, sid, "p1")
    source = nodes.owner_of(keys.session_state_key(sid))
    target = next(p for p in nodes.masters() if p != source)
    steps = migrate_slot(nodes, key_slot(keys.session_channel(sid).encode()), source, target)
    steps.begin()
    assert steps.move_keys() == 3  # state, photos, log (no failures yet)
    with pytest.raises(arq.Retry) as info:
        await upload(app, sid, "p2")
    assert isinstance(info.value.__cause__, redis_errors.TryAgainError)
    steps.finish()
    assert (await upload(app, sid, "p2")).outcome == "applied"  # MOVED, then run on the target
    done = await upload(app, sid, "p3")
    assert done.completed
    async with aioredis.Redis(port=target, decode_responses=True) as client:
        assert await client.xlen(keys.session_log_key(sid)) == 5
