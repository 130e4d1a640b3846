"""The Redis Cluster harness against real redis-server processes: it forms three masters with a
replica each, keys spread over them, a SIGKILLed master's replica takes over with the keys, and
a slot migrates under load without losing a write while the client follows ASK and MOVED."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from harness.redis_cluster import SLOTS, ClusterGroup, Member
from harness.redis_nodes import StrRedis


async def test_the_cluster_forms_with_three_masters_each_with_a_replica() -> None:
    """Three masters serve contiguous thirds of the 16384 slots, each with one replica
    streaming from it, every node says cluster_state:ok, the cluster client sees the same
    topology, and leaving the context kills every node and removes its files."""
    async with ClusterGroup() as cluster:
        masters, replicas = cluster.masters, cluster.replicas
        assert len(masters) == 3 and len(replicas) == 3
        ranges = sorted((min(m.slots), max(m.slots), len(m.slots)) for m in masters)
        assert ranges == [(0, 5460, 5461), (5461, 10922, 5462), (10923, 16383, 5461)]
        assert sorted(r.master_id or "" for r in replicas) == sorted(m.id for m in masters)
        for rep in replicas:
            async with rep.admin() as r:
                info = await r.info("replication")
            master = cluster.member(rep.master_id or "")
            assert info["role"] == "slave" and info["master_link_status"] == "up", rep
            assert info["master_port"] == master.port, rep
        for m in cluster.members:
            async with m.admin() as r:
                state = await r.cluster("INFO")
            assert state["cluster_state"] == "ok", (m, state)
            assert int(state["cluster_slots_assigned"]) == SLOTS
            assert (int(state["cluster_known_nodes"]), int(state["cluster_size"])) == (6, 3)
        assert cluster.addr == ",".join(f"127.0.0.1:{m.port}" for m in masters)
        async with cluster.client() as client:
            await client.ping()
            assert {n.port for n in client.get_primaries()} == {m.port for m in masters}
            assert {n.port for n in client.get_replicas()} == {r.port for r in replicas}
    assert not any(m.alive for m in cluster.members)
    assert not cluster.workdir.exists()


async def test_keys_spread_over_the_three_masters(redis_cluster: ClusterGroup) -> None:
    """300 keys with distinct hash tags, written through the cluster client, read back whole;
    each sits on the master the harness names for its slot, and every master holds some."""
    keys = {f"{{user{i}}}:name": f"v{i}" for i in range(300)}
    async with redis_cluster.client() as client:
        for k, v in keys.items():
            await client.set(k, v)
        assert [await client.get(k) for k in keys] == list(keys.values())
    per_master: Counter[str] = Counter()
    for k, v in keys.items():
        master = redis_cluster.master_of_key(k)
        async with master.admin() as r:  # a plain client: a wrong node would answer MOVED
            assert await r.get(k) == v
        per_master[master.name] += 1
    assert len(per_master) == 3 and min(per_master.values()) > 0, per_master
    for m in redis_cluster.masters:
        async with m.admin() as r:
            assert await r.dbsize() == per_master[m.name]


async def test_a_killed_masters_replica_takes_over_with_its_keys(
    redis_cluster: ClusterGroup,
) -> None:
    """A SIGKILLed master's replica is promoted and serves its slots with every key written
    before (acknowledged by WAIT 1 on each master); restarted, the old master rejoins as a
    replica of the promoted one and the cluster is three masters with a replica each again."""
    cluster = redis_cluster
    keys = {f"{{k{i}}}": str(i) for i in range(300)}
    async with cluster.client() as client:
        async with client.pipeline(transaction=False) as p:
            for k, v in keys.items():
                p.set(k, v)
            # WAIT counts the writes of its own connection: one per master, in the same
            # pipeline, so it runs on the connection that carried that master's SETs
            for node in client.get_primaries():
                p.execute_command("WAIT", 1, 5000, target_nodes=node)
            replies = await p.execute()
        assert replies[len(keys) :] == [1, 1, 1], "a replica did not acknowledge the writes"

        victim = cluster.master_of_key("{k0}")
        slots, heir = victim.slots, cluster.replicas_of(victim)[0]
        promoted = await cluster.kill_master(victim)
        assert promoted is heir and promoted.role == "master" and promoted.slots == slots
        assert not victim.alive and len(cluster.masters) == 3
        assert cluster.master_of_key("{k0}") is promoted
        assert str(victim.port) not in cluster.addr
        assert [await client.get(k) for k in keys] == list(keys.values())

        await cluster.restart(victim)
        assert victim.role == "replica" and victim.master_id == promoted.id
        assert len(cluster.masters) == 3 and len(cluster.replicas) == 3
        await cluster.wait_replicated()
        async with victim.admin() as old, promoted.admin() as new:
            assert await old.dbsize() == await new.dbsize() > 0
        assert [await client.get(k) for k in keys] == list(keys.values())


@dataclass
class SlotWriter:
    """Writes to keys of one slot through the cluster client, one command at a time, forever:
    an INCR of one of `counters` existing keys, then a SET of a new key. Remembers every
    write Redis acknowledged."""

    client: StrRedis
    tag: str
    counters: int
    incrs: Counter[str] = field(default_factory=Counter)
    created: dict[str, str] = field(default_factory=dict)
    acked: int = 0
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def counter(self, i: int) -> str:
        return f"{self.tag}:counter:{i}"

    async def run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = self.counter(i % self.counters)
            await self.client.incr(key)
            self.incrs[key] += 1
            new = f"{self.tag}:new:{i}"
            await self.client.set(new, str(i))
            self.created[new] = str(i)
            self.acked += 2
            i += 1
            async with self._cond:
                self._cond.notify_all()

    async def advance(self, writes: int, task: asyncio.Task[None]) -> None:
        """Wait until `writes` more writes were acknowledged (or the writer failed)."""
        target = self.acked + writes

        async def waited() -> None:
            async with self._cond:
                await self._cond.wait_for(lambda: self.acked >= target)

        waiter = asyncio.ensure_future(waited())
        await asyncio.wait([waiter, task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # the writer's error, raised here
        assert self.acked >= target, f"the writer made {self.acked} of {target} writes"

    def stop(self) -> None:
        self._stop.set()


async def redirects(source: Member, target: Member) -> tuple[int, int, int]:
    """(ASK and MOVED answered by `source`, ASKING received by `target`) so far: Redis 6.2
    counts redirects in INFO errorstats."""
    async with source.admin() as s, target.admin() as t:
        errors = await s.info("errorstats")
        asking = (await t.info("commandstats")).get("cmdstat_asking", {"calls": 0})
    ask = errors.get("errorstat_ASK", {"count": 0})["count"]
    moved = errors.get("errorstat_MOVED", {"count": 0})["count"]
    return int(ask), int(moved), int(asking["calls"])


async def test_a_slot_migrates_under_load_without_losing_a_write(
    redis_cluster: ClusterGroup,
) -> None:
    """A slot moves to another master batch by batch while a client keeps writing to it:
    every acknowledged write is on the new master, the old one keeps no key of the slot, and
    the client followed the ASK redirects during the move and MOVED after it."""
    cluster = redis_cluster
    tag, counters, batch = "{busy}", 200, 20
    slot = key_slot(tag.encode())
    source = cluster.master_of(slot)
    target = next(m for m in cluster.masters if m is not source)
    async with cluster.client() as client, source.admin() as old:
        writer = SlotWriter(client, tag, counters)
        for i in range(counters):
            await client.set(writer.counter(i), 0)
        before = await redirects(source, target)
        task = asyncio.create_task(writer.run())
        try:
            await writer.advance(20, task)

            async def mid_migration(moved: int) -> None:
                remaining = set(await old.cluster("GETKEYSINSLOT", slot, 10 * counters))
                gone = next(k for k in map(writer.counter, range(counters)) if k not in remaining)
                with pytest.raises(AskError) as ask:  # the old node sends clients on
                    await old.get(gone)
                assert (ask.value.slot_id, ask.value.port) == (slot, target.port)
                await writer.advance(10, task)  # the load runs on against the half-moved slot

            moved = await cluster.migrate_slot(slot, target, batch=batch, on_batch=mid_migration)
            assert cluster.master_of(slot) is target
            await writer.advance(20, task)
        finally:
            writer.stop()
            await task

        with pytest.raises(MovedError) as where:
            await old.get(writer.counter(0))
        assert (where.value.slot_id, where.value.port) == (slot, target.port)
        assert await old.cluster("COUNTKEYSINSLOT", slot) == 0
        assert moved >= counters
        async with target.admin() as new:
            assert await new.cluster("COUNTKEYSINSLOT", slot) == counters + len(writer.created)
            values = [await new.get(writer.counter(i)) for i in range(counters)]
            assert values == [str(writer.incrs[writer.counter(i)]) for i in range(counters)]
            assert [await new.get(k) for k in writer.created] == list(writer.created.values())
    after = await redirects(source, target)
    ask, moved_redirects, asking = (a - b for a, b in zip(after, before, strict=True))
    assert ask > 0 and asking > 0 and moved_redirects > 0, (ask, asking, moved_redirects)
