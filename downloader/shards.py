"""Virtual shards: the unit of Redis Cluster placement.

Every key of the service but a few service-wide ones lives in one of `redis.shards` shards (16
by default, at most 62, fixed for the life of a deployment's data): an aggregation and all its
jobs in one shard, so each transition is a script over one slot. A shard's keys share a hash tag
(`dl:{<tag>}:...`); the tags are chosen so that the shards' slots are spread evenly over the
16384 slots, and so over the masters of any cluster laid out in contiguous slot ranges."""

from __future__ import annotations

import functools

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ["MAX_SHARDS", "shard_tags", "slot_of_tag"]

MAX_SHARDS = 62  # a job id names its shard in one base62 character


def slot_of_tag(tag: str) -> int:
    return int(key_slot(tag.encode()))


@functools.cache
def shard_tags(shards: int) -> tuple[str, ...]:
    """The hash tag of each shard: tag i hashes into the i-th of `shards` equal ranges of the
    slot space (the first of `<i>`, `<i>.1`, `<i>.2`, ... that does)."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}")
    width = REDIS_CLUSTER_HASH_SLOTS / shards
    tags = []
    for i in range(shards):
        low, high = int(i * width), int((i + 1) * width)
        k = 0
        while not low <= slot_of_tag(tag := f"{i}" if k == 0 else f"{i}.{k}") < high:
            k += 1
        tags.append(tag)
    return tuple(tags)
