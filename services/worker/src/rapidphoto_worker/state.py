"""Where the commands' scripts run: the state's Redis, standalone or a cluster (PROTOCOL §9).

Every script touches one slot (a session's or a user's keys), so on a cluster it runs on the master
that owns that slot. After it, when ``REDIS_WAIT_REPLICAS`` > 0, ``WAIT`` blocks until that many
replicas hold the write, or ``REDIS_WAIT_TIMEOUT_MS`` passed: a master acknowledges a write before
its replica has it, and a master killed in between takes with it an event the worker would have
reported done. ``WAIT`` counts the writes of *its own connection*, so the script and the ``WAIT``
are sent together on one connection to the node that runs the script: a pipeline on a standalone
Redis; on a cluster, the pipeline of the slot owner's ``ClusterNode`` (redis-py's cluster client
routes each command on its own, possibly over different connections). Too few replicas raise
:class:`ReplicationTimeout`, a ``TimeoutError``: the command retries the job, and the retry, a
duplicate, writes nothing new but waits again (a duplicate writes an unchanged value so that its
``WAIT`` also covers the first run's writes, lib.lua).

What this module handles itself on a cluster, since it bypasses the client's routing: ``NOSCRIPT``
(a replica promoted by a fail-over has no scripts: load it there and run again), ``MOVED`` (the slot
has another master: re-read the slot map and run again), ``ASK`` (the slot is being migrated and the
keys are on the target already: ``ASKING`` there). A node that does not answer, ``TRYAGAIN`` (keys of
a migrating slot on both sides) and ``CLUSTERDOWN`` (a fail-over under way) re-read the slot map and
raise: the job is retried with backoff, by when the cluster has settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript

#: Re-read the cluster's slot map at most this often (many jobs fail together in a fail-over).
REFRESH_INTERVAL_SECONDS: Final = 0.1
#: Runs of one script after a redirection or a node that forgot the scripts, before giving up.
REDIRECTIONS: Final = 3

Args = Sequence[str | int | float]


class ReplicationTimeout(redis_errors.TimeoutError):
    """Fewer replicas than ``REDIS_WAIT_REPLICAS`` confirmed a write in time: retry the job."""


class StateRedis:
    """Runs the commands' scripts on the state's Redis; see the module docstring.

    ``client``: a standalone ``Redis`` or a ``RedisCluster`` (``str`` replies). ``publish``: the
    publish command the scripts use, ``PUBLISH`` or, on a cluster, ``SPUBLISH``.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.publish: Final = "SPUBLISH" if self.cluster else "PUBLISH"
        self._wait = ("WAIT", wait_replicas, wait_timeout_ms) if wait_replicas > 0 else None
        self._wait_replicas = wait_replicas
        self._refreshed = 0.0
        self._refresh_lock = asyncio.Lock()

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Args) -> Any:
        """The reply of ``script`` on ``keys`` (one slot) and ``args``; then WAIT when asked."""
        if isinstance(self.client, RedisCluster):
            return await self._run_on_cluster(self.client, script, keys, args)
        if self._wait is None:
            return await script(keys=keys, args=args, client=self.client)
        for _ in range(REDIRECTIONS):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                pipe.execute_command(*self._wait)
                reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, redis_errors.NoScriptError):
                await self.client.script_load(script.script)
                continue
            return self._checked(reply, acked)
        raise RuntimeError(f"script {script.sha} could not be loaded")

    def _checked(self, reply: Any, acked: Any) -> Any:
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self._wait_replicas:
            raise ReplicationTimeout(
                f"{acked} of {self._wait_replicas} replicas confirmed the write in time"
            )
        return reply

    async def _run_on_cluster(
        self, cluster: RedisCluster, script: AsyncScript, keys: Sequence[str], args: Args
    ) -> Any:
        evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
        asking = False
        node: ClusterNode | None = None
        for _ in range(REDIRECTIONS):
            if node is None:
                try:
                    node = cluster.get_node_from_key(keys[0])
                except redis_errors.SlotNotCoveredError as exc:
                    await self.refresh()
                    raise redis_errors.TryAgainError(str(exc)) from exc
            assert node is not None
            commands: list[tuple[Any, ...]] = [("ASKING",)] if asking else []
            commands.append(evalsha)
            if self._wait is not None:
                commands.append(self._wait)
            try:
                results = await _node_pipeline(node, commands)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                await self.refresh()  # the node may be dead: a fail-over is coming
                raise
            reply = results[1] if asking else results[0]
            acked = results[-1] if self._wait is not None else self._wait_replicas
            asking = False
            if isinstance(reply, redis_errors.NoScriptError):
                await node.execute_command("SCRIPT", "LOAD", script.script)
                continue
            if isinstance(reply, redis_errors.MovedError):
                await cluster.nodes_manager.move_slot(reply)
                node = None
                continue
            if isinstance(reply, redis_errors.AskError):
                node = cluster.nodes_manager.get_node(host=reply.host, port=reply.port)
                if node is None:
                    await self.refresh()
                    raise redis_errors.TryAgainError(f"ASK to an unknown node: {reply}")
                asking = True
                continue
            if isinstance(reply, redis_errors.ClusterDownError | redis_errors.TryAgainError):
                await self.refresh()
            if self._wait is None:
                if isinstance(reply, Exception):
                    raise reply
                return reply
            return self._checked(reply, acked)
        await self.refresh()
        raise redis_errors.TryAgainError(f"still redirected after {REDIRECTIONS} tries")

    async def refresh(self) -> None:
        """Re-read the cluster's slot map (at most every REFRESH_INTERVAL_SECONDS)."""
        if not isinstance(self.client, RedisCluster):
            return
        async with self._refresh_lock:
            now = time.monotonic()
            if now - self._refreshed < REFRESH_INTERVAL_SECONDS:
                return
            self._refreshed = now
            # No node may answer yet: the next failure tries again.
            with contextlib.suppress(redis_errors.RedisError, OSError):
                await self.client.nodes_manager.initialize()

    async def script_load(self, script: AsyncScript) -> str:
        """Load ``script`` into the server, or every master of the cluster; its SHA1."""
        if isinstance(self.client, RedisCluster):
            shas = set()
            for node in self.client.get_primaries():
                shas.add(await node.execute_command("SCRIPT", "LOAD", script.script))
            if len(shas) != 1:
                raise RuntimeError(f"SCRIPT LOAD returned {shas}")
            return str(shas.pop())
        return str(await self.client.script_load(script.script))

    async def aclose(self) -> None:
        await self.client.aclose()


async def _node_pipeline(node: ClusterNode, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``commands`` on one connection of ``node``: each reply, or the error it got."""
    stack = [PipelineCommand(i, *command) for i, command in enumerate(commands)]
    await node.execute_pipeline(stack)
    return [command.result for command in stack]
