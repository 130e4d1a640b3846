"""Every Redis key name. A shard's keys share its hash tag, `<prefix>:{<tag>}:`, so the scripts
of a shard run in one Redis Cluster slot; a few service-wide keys have tags of their own.

    <prefix>:{<tag>}:job:<id>            hash    a live job's projection (and sealed_* fields)
    <prefix>:{<tag>}:ev:<id>             list    a live job's events, one line each
    <prefix>:{<tag>}:done:<id>           string  a settled job, packed; expires after retention
    <prefix>:{<tag>}:jobs                zset    job id -> creation ms or last trim (rebuild)
    <prefix>:{<tag>}:events              stream  the shard's events, in order (the export's feed)
    <prefix>:{<tag>}:aggr:<a>            hash    an aggregation: limit, proxy, jobs, scope
    <prefix>:{<tag>}:ready:<a>           list    its jobs waiting for a slot
    <prefix>:{<tag>}:inflight:<a>        set     its jobs downloading now
    <prefix>:{<tag>}:aggregations[:<t>]  zset    aggregation -> jobs waiting (of tenant t)
    <prefix>:{<tag>}:wake                stream  "aggregation a may have work" (processors)
    <prefix>:{<tag>}:leases, lease-owners        running downloads' lease expiries and tokens
    <prefix>:{<tag>}:retries             zset    downloads waiting for their retry
    <prefix>:{<tag>}:callbacks           stream  callbacks to deliver (group `notifiers`)
    <prefix>:{<tag>}:callback-retries    zset    callbacks waiting for their retry
    <prefix>:{<tag>}:reap                zset    stored files due for deletion
    <prefix>:{<tag>}:idem:<key>          hash    an Idempotency-Key (expires after its window)
    <prefix>:{<tag>}:export:lock, export:position the event export of this shard
    <prefix>:{<tag>}:fence               never exists: declared by every script (see fence())
    <prefix>:{meta}:instances, stats:<role>:<id>, alive:<role>:<id>   who runs, and its stats
    <prefix>:{meta}:layout               hash    the data's layout: shards, model
    <prefix>:{dir}:aggr:<a>              string  the shard of an aggregation (placement)
    <prefix>:{dir}:idem:<key>            string  the job an Idempotency-Key was first used for
    <prefix>:{dir}:placements            hash    shard -> aggregations placed there (ties)
    <prefix>:{rate:<token>}              hash    a token's request bucket
"""

from __future__ import annotations

from downloader.ids import shard_of
from downloader.shards import shard_tags

__all__ = ["Keys"]


class Keys:
    """Key names, shard by shard. The Lua scripts build the shard's names from the prefix of
    their KEYS[1] (prelude.lua `KEY.*`); tests/test_contract.py checks both agree."""

    FIXED = (
        "jobs",
        "aggregations",
        "wake",
        "leases",
        "lease-owners",
        "retries",
        "callbacks",
        "callback-retries",
        "reap",
        "export:lock",
        "export:position",
    )
    """The names of a shard's keys that are the same for every job (besides `events`, and
    `fence`): every script declares them all, whichever it touches."""

    def __init__(self, prefix: str, shards: int = 16) -> None:
        self.prefix = prefix
        self.shards = shards
        self.tags = shard_tags(shards)
        self._fixed = [tuple(self.shard(s) + name for name in self.FIXED) for s in range(shards)]

    def shard(self, s: int) -> str:
        """The prefix of shard `s`'s keys: `<prefix>:{<tag>}:`."""
        return f"{self.prefix}:{{{self.tags[s]}}}:"

    # -- a job (its shard is in its id) ---------------------------------------------------------

    def job(self, job_id: str) -> str:
        return f"{self.shard(shard_of(job_id))}job:{job_id}"

    def ev(self, job_id: str) -> str:
        return f"{self.shard(shard_of(job_id))}ev:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.shard(shard_of(job_id))}done:{job_id}"

    # -- a shard ----------------------------------------------------------------------------------

    def events(self, s: int) -> str:
        return self.shard(s) + "events"

    def jobs(self, s: int) -> str:
        return self.shard(s) + "jobs"

    def aggr(self, s: int, aggr_id: str) -> str:
        return f"{self.shard(s)}aggr:{aggr_id}"

    def ready(self, s: int, aggr_id: str) -> str:
        return f"{self.shard(s)}ready:{aggr_id}"

    def inflight(self, s: int, aggr_id: str) -> str:
        return f"{self.shard(s)}inflight:{aggr_id}"

    def idempotency(self, s: int, key: str) -> str:
        return f"{self.shard(s)}idem:{key}"

    def aggregations(self, s: int) -> str:
        return self.shard(s) + "aggregations"

    def tenant_aggregations(self, s: int, scope: str) -> str:
        return f"{self.shard(s)}aggregations:{scope}"

    def wake(self, s: int) -> str:
        return self.shard(s) + "wake"

    def leases(self, s: int) -> str:
        return self.shard(s) + "leases"

    def lease_owners(self, s: int) -> str:
        return self.shard(s) + "lease-owners"

    def retries(self, s: int) -> str:
        return self.shard(s) + "retries"

    def callbacks(self, s: int) -> str:
        return self.shard(s) + "callbacks"

    def callback_retries(self, s: int) -> str:
        return self.shard(s) + "callback-retries"

    def reap(self, s: int) -> str:
        return self.shard(s) + "reap"

    def export_lock(self, s: int) -> str:
        return self.shard(s) + "export:lock"

    def export_position(self, s: int) -> str:
        return self.shard(s) + "export:position"

    def fixed(self, s: int) -> tuple[str, ...]:
        """Shard `s`'s keys named in FIXED."""
        return self._fixed[s]

    def fence(self, s: int) -> str:
        """A key that never exists. Every script of the shard declares it, so that none runs
        while the shard's slot migrates between cluster nodes: Redis answers TRYAGAIN to a
        script whose declared keys are not all on the node in a moving slot, where a script
        reading keys it did not declare could see half the shard (storage.base._call sends
        it again)."""
        return self.shard(s) + "fence"

    # -- service-wide ---------------------------------------------------------------------------

    @property
    def instances(self) -> str:
        return f"{self.prefix}:{{meta}}:instances"

    def stats(self, role: str, instance: str) -> str:
        return f"{self.prefix}:{{meta}}:stats:{role}:{instance}"

    def alive(self, role: str, instance: str) -> str:
        return f"{self.prefix}:{{meta}}:alive:{role}:{instance}"

    @property
    def layout(self) -> str:
        return f"{self.prefix}:{{meta}}:layout"

    def directory(self, aggr_id: str) -> str:
        return f"{self.prefix}:{{dir}}:aggr:{aggr_id}"

    @property
    def placements(self) -> str:
        return f"{self.prefix}:{{dir}}:placements"

    def idempotency_owner(self, key: str) -> str:
        return f"{self.prefix}:{{dir}}:idem:{key}"

    def rate(self, token_key: str) -> str:
        return f"{self.prefix}:{{rate:{token_key}}}"
