"""A real Redis Cluster on loopback for tests and benchmarks: three masters, each with one
replica, started from the suite's own redis-server (`find_redis_server()`) and formed through
redis-py alone, without redis-cli; and the operations a test of a clustered service needs, each
returning only once every live node agrees on the new state:

- `kill_master(node)`: SIGKILL a master; returns when its replica has been promoted by the
  cluster and every slot is served again. `restart(node)` brings a killed node back (as a
  replica of whoever serves its slots now).
- `migrate_slot(slot, to)`: the resharding protocol redis-cli runs, step by step (IMPORTING,
  MIGRATING, GETKEYSINSLOT + MIGRATE in batches, SETSLOT NODE), as a coroutine a test runs
  beside its load, with a hook between batches to look at the slot mid-migration.

Usage (tests get one from the `redis_cluster` fixture)::

    async with ClusterGroup() as cluster:
        config["redis"]["addr"] = cluster.addr      # the seed nodes
        async with cluster.client() as r:           # redis.asyncio.cluster.RedisCluster
            await r.set("{aggr}:1", "x")
        await cluster.kill_master(cluster.master_of_key("{aggr}:1"))

Every node writes an AOF with fsync on every write, and the cluster is tuned for quick,
deterministic failovers: a 1 s node timeout, replicas always eligible to take over
(`cluster-replica-validity-factor 0`), no replica migration, and the masters left keep serving
their slots while one is down (`cluster-require-full-coverage no`). A bounded wait that runs
out raises TimeoutError naming what did not happen, followed by the tail of every node's log.

Redis 6.2 has no `cluster-port`: a node's cluster bus listens on its port + 10000, so each node
gets a port whose bus port is free as well.

What a test on this cluster meets in redis-py 8.1's `redis.asyncio.cluster.RedisCluster` (each
seen against these processes): a command redirected by ASK can fail with `ClusterError("TTL
exhausted.")` when the client holds two or more idle connections to the target, since it sends
ASKING on one pooled connection and the command on another; with the default
`reinitialize_steps=5`, concurrent commands meeting MOVED can fail with ConnectionError or
AttributeError, the client closing every connection under them; a multi-key command or script
on a slot being migrated gets TRYAGAIN from Redis whenever one of its keys is missing on the
node asked (a key it would create, say), which the client turns into `ClusterError("TTL
exhausted.")` within ~0.2 s; and a command sent to a master just SIGKILLed fails with
ConnectionError until its replica is promoted."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from harness.net import free_port
from harness.redis_nodes import Node, StrRedis

__all__ = [
    "BUS_PORT_OFFSET",
    "SLOTS",
    "ClusterGroup",
    "Member",
    "NodeView",
    "free_cluster_port",
    "parse_cluster_nodes",
]

SLOTS = 16384
BUS_PORT_OFFSET = 10000
"""Redis 6.2 listens for the cluster bus on the client port + 10000 (`cluster-port` is 7.0)."""

HOST = "127.0.0.1"
ADDSLOTS_CHUNK = 1000  # slots per CLUSTER ADDSLOTS (6.2 has no ADDSLOTSRANGE)
MIGRATE_TIMEOUT_MS = 10_000


def free_cluster_port(taken: set[int] | None = None) -> int:
    """A free loopback port whose cluster bus port (+10000) is free too, neither of them in
    `taken` (the ports given to nodes that have not bound them yet); adds both to `taken`."""
    taken = set() if taken is None else taken
    for _ in range(200):
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535 or {port, port + BUS_PORT_OFFSET} & taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + BUS_PORT_OFFSET))
            except OSError:
                continue
        taken.update((port, port + BUS_PORT_OFFSET))
        return port
    raise OSError("no free port pair (port, port + 10000) on 127.0.0.1")


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES: how the node asked sees one node (itself included)."""

    id: str
    port: int
    flags: frozenset[str]  # myself, master, slave, fail, fail?, handshake, noaddr, ...
    master_id: str | None  # for a replica
    link_up: bool
    slots: frozenset[int]
    migrating: dict[int, str] = field(default_factory=dict)  # slot -> target id (myself only)
    importing: dict[int, str] = field(default_factory=dict)  # slot -> source id (myself only)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})


def parse_cluster_nodes(text: str) -> dict[str, NodeView]:
    """CLUSTER NODES -> {node id: NodeView}."""
    views = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, addr, flags, master, _ping, _pong, _epoch, link, *ranges = line.split()
        slots: set[int] = set()
        migrating: dict[int, str] = {}
        importing: dict[int, str] = {}
        for r in ranges:
            if r.startswith("["):  # [slot->-target] or [slot-<-source]
                if "->-" in r:
                    slot, other = r[1:-1].split("->-")
                    migrating[int(slot)] = other
                else:
                    slot, other = r[1:-1].split("-<-")
                    importing[int(slot)] = other
            else:
                first, _, last = r.partition("-")
                slots.update(range(int(first), int(last or first) + 1))
        views[node_id] = NodeView(
            id=node_id,
            port=int(addr.split("@")[0].rsplit(":", 1)[1]),
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            link_up=link == "connected",
            slots=frozenset(slots),
            migrating=migrating,
            importing=importing,
        )
    return views


class Member(Node):
    """One redis-server in cluster mode. `id` is its cluster node id; `role`, `master_id` and
    `slots` are the cluster's view of it as of the harness's last operation
    (`ClusterGroup.refresh()` reads them again)."""

    def __init__(self, name: str, workdir: Path, node_timeout_ms: int, taken: set[int]) -> None:
        super().__init__(name, workdir, port=free_cluster_port(taken))
        self.args = [
            "--bind", HOST, "--port", str(self.port), "--dir", str(self.dir),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-announce-ip", HOST,
            # a replica always takes over, however long it was cut off from its master
            "--cluster-replica-validity-factor", "0",
            # the other masters keep serving their slots while one is down
            "--cluster-require-full-coverage", "no",
            # replicas stay where they were put: the topology only changes when a test says so
            "--cluster-allow-replica-migration", "no",
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--protected-mode", "no",
        ]  # fmt: skip
        self.id = ""
        self.role = "master"  # or "replica"
        self.master_id: str | None = None
        self.slots: frozenset[int] = frozenset()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def admin(self) -> StrRedis:
        """A plain (non-cluster) client of this node, for the harness's own commands."""
        return aioredis.Redis(host=HOST, port=self.port, decode_responses=True, socket_timeout=15)

    def __repr__(self) -> str:
        return f"<{self.name} :{self.port} {self.role} {self.id[:8]}>"


class ClusterGroup:
    """Three masters with one replica each (`masters=` for another count), slots split in
    contiguous ranges as redis-cli does. `start()` forms the cluster, `stop()` kills every
    process and removes the files; `async with ClusterGroup() as cluster:` does both."""

    def __init__(
        self, workdir: Path | None = None, masters: int = 3, node_timeout_ms: int = 1000
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="dl-cluster-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node_timeout_ms = node_timeout_ms
        taken: set[int] = set()
        self.members = [
            Member(f"node{i}", self.workdir, node_timeout_ms, taken) for i in range(2 * masters)
        ]
        self._n_masters = masters

    # -- the cluster as the harness last saw it ------------------------------------------

    @property
    def masters(self) -> list[Member]:
        """The live masters, in the order the nodes were made."""
        return [m for m in self.members if m.alive and m.role == "master"]

    @property
    def replicas(self) -> list[Member]:
        return [m for m in self.members if m.alive and m.role == "replica"]

    @property
    def addr(self) -> str:
        """The service's `redis.addr`: the live masters' host:port, comma-separated (a cluster
        client takes them as seed nodes)."""
        return ",".join(m.addr for m in self.masters)

    seeds = addr

    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode(HOST, m.port) for m in self.masters]

    def client(self, **kwargs: Any) -> StrRedis:
        """redis-py's cluster client, seeded with the live masters, replies decoded."""
        return RedisCluster(startup_nodes=self.startup_nodes(), decode_responses=True, **kwargs)

    def member(self, node_id: str) -> Member:
        return next(m for m in self.members if m.id == node_id)

    def master_of(self, slot: int) -> Member:
        """The live master serving `slot`."""
        for m in self.masters:
            if slot in m.slots:
                return m
        raise LookupError(f"no live master serves slot {slot}")

    def master_of_key(self, key: str) -> Member:
        return self.master_of(key_slot(key.encode()))

    def replicas_of(self, master: Member) -> list[Member]:
        return [m for m in self.replicas if m.master_id == master.id]

    async def refresh(self) -> None:
        """Read every member's role and slots again, from a live node's CLUSTER NODES."""
        views = await self._views(next(m for m in self.members if m.alive))
        for m in self.members:
            view = views.get(m.id)
            if view is None:
                continue
            m.role = "master" if view.is_master else "replica"
            m.master_id = view.master_id
            m.slots = view.slots

    # -- forming the cluster ---------------------------------------------------------------

    async def start(self, timeout_s: float = 30.0) -> ClusterGroup:
        """Start the processes and form the cluster: slots to the masters, every node met,
        each replica attached to its master, every node `cluster_state:ok`."""
        for m in self.members:
            m.start()
        await self._until(self._all_answer, timeout_s, "not every node answered PING")
        masters = self.members[: self._n_masters]
        replicas = self.members[self._n_masters :]
        for epoch, m in enumerate(self.members, start=1):
            async with m.admin() as r:
                m.id = await r.execute_command("CLUSTER MYID")
                # distinct config epochs up front, as redis-cli does: no collisions to resolve
                await r.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
        for m, slots in zip(masters, _split_slots(len(masters)), strict=True):
            async with m.admin() as r:
                for i in range(0, len(slots), ADDSLOTS_CHUNK):
                    await r.execute_command("CLUSTER ADDSLOTS", *slots[i : i + ADDSLOTS_CHUNK])
        first = self.members[0]
        for m in self.members[1:]:
            async with m.admin() as r:
                await r.execute_command("CLUSTER MEET", HOST, first.port)
        await self._until(
            self._all_met, timeout_s, f"the {len(self.members)} nodes did not all meet"
        )
        for replica, master in zip(replicas, masters, strict=True):
            async with replica.admin() as r:
                await r.execute_command("CLUSTER REPLICATE", master.id)
        await self._until(self._formed, timeout_s, "the cluster did not form")
        await self.refresh()
        return self

    async def _all_answer(self) -> str | None:
        for m in self.members:
            if not m.alive:
                raise RuntimeError(f"{m.name} exited at start-up:\n{m.log()}")
            try:
                async with m.admin() as r:
                    await r.ping()
            except (RedisError, OSError):
                return f"{m.name} (port {m.port}) does not answer"
        return None

    async def _all_met(self) -> str | None:
        for m in self.members:
            views = await self._views(m)
            if len(views) < len(self.members):
                return f"{m.name} knows {len(views)} of {len(self.members)} nodes"
            for v in views.values():
                if "myself" not in v.flags and (not v.link_up or v.flags & {"handshake", "noaddr"}):
                    return f"{m.name} has no link to node {v.id[:8]} yet"
        return None

    async def _formed(self) -> str | None:
        masters = self.members[: self._n_masters]
        for replica, master in zip(self.members[self._n_masters :], masters, strict=True):
            async with replica.admin() as r:
                info = await r.info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return f"{replica.name} is not yet replicating from {master.name}"
        return await self._agreed()

    # -- waiting for the cluster to agree --------------------------------------------------

    async def _agreed(self) -> str | None:
        """Every live node: cluster_state:ok, all slots assigned, the same owner for every
        slot as the others, and no live node flagged failed."""
        live = [m for m in self.members if m.alive]
        owners: dict[int, str] | None = None
        roles: dict[str, tuple[bool, str | None]] = {}
        for m in live:
            async with m.admin() as r:
                info = await r.execute_command("CLUSTER", "INFO")
            state = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if state.get("cluster_state") != "ok":
                return f"{m.name} says cluster_state:{state.get('cluster_state')}"
            if state.get("cluster_slots_assigned") != str(SLOTS):
                return f"{m.name} has {state.get('cluster_slots_assigned')} slots assigned"
            views = await self._views(m)
            for other in live:
                if other.id not in views or views[other.id].failed:
                    return f"{m.name} does not see {other.name} up"
            seen = {s: v.id for v in views.values() if v.is_master for s in v.slots}
            # and who replicates whom: a restarted old master is a master in the views of
            # nodes its demotion has not reached by gossip yet
            links = {o.id: (views[o.id].is_master, views[o.id].master_id) for o in live}
            if owners is None:
                owners, roles = seen, links
            elif seen != owners:
                return f"{m.name} disagrees with {live[0].name} on who serves some slots"
            elif links != roles:
                return f"{m.name} disagrees with {live[0].name} on who replicates whom"
        return None

    # -- failover --------------------------------------------------------------------------

    async def kill_master(self, master: Member, timeout_s: float = 30.0) -> Member:
        """SIGKILL `master`; return its replica once the cluster has promoted it: it says
        role:master, every live node marks the dead one failed and sees the promoted one
        serving its slots, and every live node is `cluster_state:ok` again."""
        if not master.alive or master.role != "master":
            raise ValueError(f"{master.name} is not a live master")
        candidates = self.replicas_of(master)
        if not candidates:
            raise ValueError(f"{master.name} has no live replica to take over")
        slots = master.slots
        master.kill()
        promoted: list[Member] = []

        async def taken_over() -> str | None:
            views = await self._views(candidates[0])
            winner = next((c for c in candidates if views[c.id].is_master), None)
            if winner is None:
                return f"no replica of {master.name} was promoted"
            async with winner.admin() as r:
                role = await r.execute_command("ROLE")
            if role[0] != "master":
                return f"{winner.name} does not say role:master yet"
            for m in self.members:
                if not m.alive:
                    continue
                views = await self._views(m)
                if not views[master.id].failed:
                    return f"{m.name} does not mark {master.name} failed"
                if views[winner.id].slots != slots:
                    return f"{m.name} does not see {winner.name} serving {master.name}'s slots"
            promoted[:] = [winner]
            return await self._agreed()

        await self._until(taken_over, timeout_s, f"no replica took over from {master.name}")
        await self.refresh()
        return promoted[0]

    async def restart(self, member: Member, timeout_s: float = 30.0) -> None:
        """Start a killed node again from its files (nodes.conf, AOF); return once it is back
        in the cluster: a master that lost its slots while down comes back as a replica of
        the node that serves them now, its replication link up."""
        if member.alive:
            raise ValueError(f"{member.name} is running")
        member.start()
        other = next(m for m in self.members if m.alive and m is not member)

        async def rejoined() -> str | None:
            # its own nodes.conf may still give it slots: ask another node what it serves
            if not (await self._views(other))[member.id].slots:
                async with member.admin() as r:
                    info = await r.info("replication")
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return f"{member.name} is not replicating from a master yet"
            return await self._agreed()

        await self._until(rejoined, timeout_s, f"{member.name} did not rejoin the cluster")
        await self.refresh()

    async def wait_replicated(self, timeout_s: float = 10.0) -> None:
        """Every live replica has applied all its master has written so far."""
        targets = {}
        for m in self.masters:
            async with m.admin() as r:
                targets[m.id] = int((await r.info("replication"))["master_repl_offset"])

        async def caught_up() -> str | None:
            for rep in self.replicas:
                async with rep.admin() as r:
                    offset = int((await r.info("replication"))["master_repl_offset"])
                if rep.master_id in targets and offset < targets[rep.master_id]:
                    return f"{rep.name} is at offset {offset} of {targets[rep.master_id]}"
            return None

        await self._until(caught_up, timeout_s, "a replica did not catch up")

    # -- resharding --------------------------------------------------------------------------

    async def migrate_slot(
        self,
        slot: int,
        to: Member,
        batch: int = 100,
        on_batch: Callable[[int], Awaitable[None]] | None = None,
        timeout_s: float = 30.0,
    ) -> int:
        """Move `slot` to the master `to`, keys and all, the way redis-cli reshards:
        SETSLOT IMPORTING on the target, SETSLOT MIGRATING on the source, GETKEYSINSLOT +
        MIGRATE `batch` keys at a time until the source has none left, then SETSLOT NODE on
        the target, the source and the other masters. Returns the number of keys moved, once
        every live node sees `to` serving the slot and no node has it half-moved.

        Clients keep working throughout: a key not yet moved is served by the source, any
        other gets an ASK redirect to the target, and MOVED once the slot is assigned.
        `on_batch(keys_moved_so_far)` is awaited after each MIGRATE: a test can look at the
        slot mid-migration there, or hold the migration until its load has run a while.
        A failing step raises and leaves the slot half-moved, as it would redis-cli."""
        source = self.master_of(slot)
        if to is source or to not in self.masters:
            raise ValueError(f"{to.name} is not a live master other than {source.name}")
        async with to.admin() as dst, source.admin() as src:
            await dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.id)
            await src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", to.id)
            moved = 0
            while keys := await src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):
                await src.execute_command(
                    "MIGRATE", HOST, to.port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys
                )
                moved += len(keys)
                if on_batch is not None:
                    await on_batch(moved)
            # the target first, so the slot is never left without an owner that knows it
            for m in [to, source, *(m for m in self.masters if m not in (to, source))]:
                async with m.admin() as r:
                    await r.execute_command("CLUSTER SETSLOT", slot, "NODE", to.id)

        async def assigned() -> str | None:
            for m in self.members:
                if not m.alive:
                    continue
                views = await self._views(m)
                if slot not in views[to.id].slots:
                    return f"{m.name} does not see {to.name} serving slot {slot}"
                mine = views[m.id]
                if slot in mine.migrating or slot in mine.importing:
                    return f"{m.name} still has slot {slot} half-moved"
            return await self._agreed()

        await self._until(assigned, timeout_s, f"slot {slot} did not settle on {to.name}")
        await self.refresh()
        return moved

    # -- plumbing --------------------------------------------------------------------------

    async def _views(self, m: Member) -> dict[str, NodeView]:
        async with m.admin() as r:
            # sent as two words: redis-py would otherwise parse the reply its own way
            return parse_cluster_nodes(await r.execute_command("CLUSTER", "NODES"))

    async def _until(
        self, check: Callable[[], Awaitable[str | None]], timeout_s: float, what: str
    ) -> None:
        """Poll other OS processes (bounded; they have no event to await) until `check`
        returns None; it returns what is still missing otherwise."""
        deadline = time.monotonic() + timeout_s
        missing = "no answer yet"
        while True:
            try:
                result = await check()
            except (RedisError, OSError) as exc:
                result = f"{type(exc).__name__}: {exc}"
            if result is None:
                return
            missing = result
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {m.name} :{m.port}\n{m.log()}" for m in self.members)
                raise TimeoutError(f"{what} within {timeout_s:g} s ({missing})\n{logs}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """Kill every node and remove their files."""
        for m in self.members:
            m.stop()
        for path in [self.workdir] if self._own_dir else [m.dir for m in self.members]:
            shutil.rmtree(path, ignore_errors=True)

    async def __aenter__(self) -> ClusterGroup:
        try:
            return await self.start()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _split_slots(n: int) -> list[list[int]]:
    """0..16383 in n contiguous ranges, as redis-cli splits them (3: 0-5460, 5461-10922,
    10923-16383)."""
    bounds = [round(i * SLOTS / n) for i in range(n)] + [SLOTS]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n)]
