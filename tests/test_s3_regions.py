"""Callers choose `s3_region`: `s3.allowed_regions` limits it at POST, and the S3 clients, one per
region, stay within `s3.max_clients` however many regions come (S3Store against a real moto
server in a child process)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient

from downloader.config import S3Config
from downloader.errors import ConfigError
from downloader.s3store import S3Store
from harness.moto_server import MotoServer
from harness.redis_nodes import StrRedis, data_keys
from tests.conftest import Service

ServiceFactory = Callable[..., Any]
MakeConfig = Callable[..., tuple[Path, Any]]
NO_SERVER = {"enabled": True, "endpoint_url": "http://127.0.0.1:9"}
"""An `s3` section for API-only tests: the API never talks to S3."""


def s3_body(region: str) -> dict[str, Any]:
    return {
        "aggr_id": "regions",
        "aggr_limit": 1,
        "url": "http://origin.test/a",
        "s3_bucket": "good-bucket",
        "s3_region": region,
    }


def live_clients() -> int:
    """botocore clients alive in this process, after a full collection (weak proxies to
    them, which boto3 keeps, pass isinstance too: not counted)."""
    gc.collect()
    return sum(
        isinstance(o, BaseClient) and not isinstance(o, weakref.ProxyTypes)
        for o in gc.get_objects()
    )


# -- at POST -------------------------------------------------------------------------------------

ALLOWED = ["eu-west-1", "us-east-1"]


@pytest.mark.parametrize("region", ["eu-central-1", "us-east-2", "cn-north-1", "auto"])
async def test_region_outside_the_allow_list_is_400_naming_s3_region(
    service_factory: ServiceFactory, redis_client: StrRedis, region: str
) -> None:
    """With s3.allowed_regions set, any other s3_region answers 400 naming s3_region and
    stores nothing."""
    api: Service = await service_factory({"s3": {**NO_SERVER, "allowed_regions": ALLOWED}}, {"api"})
    status, answer = await api.post("/download", s3_body(region))
    assert status == 400, answer
    assert answer["field"] == "s3_region"
    assert answer["error"] == f"s3_region {region!r} is not one of the allowed regions"
    assert await data_keys(redis_client) == []


@pytest.mark.parametrize(
    ("allowed", "region"),
    [(ALLOWED, "us-east-1"), (ALLOWED, "eu-west-1"), ([], "ap-south-2"), ([], "auto")],
    ids=["listed", "listed-2", "no-list", "no-list-auto"],
)
async def test_allowed_region_is_accepted(
    service_factory: ServiceFactory, allowed: list[str], region: str
) -> None:
    """A listed region, or any well-formed region when the list is empty, is accepted."""
    api: Service = await service_factory({"s3": {**NO_SERVER, "allowed_regions": allowed}}, {"api"})
    job = await api.job(await api.submit(**s3_body(region)))
    assert job["s3_region"] == region


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"allowed_regions": ["eu-west-1", "EU-WEST-2"]}, "s3.allowed_regions.1: 'EU-WEST-2' is"),
        ({"allowed_regions": "eu-west-1"}, "s3.allowed_regions: Input should be a valid list"),
        ({"max_clients": 0}, "s3.max_clients: Input should be greater than or equal to 1"),
    ],
    ids=["bad-region", "not-a-list", "no-clients"],
)
def test_bad_region_settings_stop_the_config_naming_the_key(
    make_config: MakeConfig, patch: dict[str, Any], message: str
) -> None:
    """A malformed allowed_regions or a max_clients below 1 is a config error naming the key."""
    with pytest.raises(ConfigError) as err:
        make_config({"s3": {**NO_SERVER, **patch}})
    assert message in str(err.value), str(err.value)


# -- the client cache ----------------------------------------------------------------------------


def store_for(moto: MotoServer, max_clients: int) -> S3Store:
    cfg = S3Config.model_validate(
        {**moto.settings(), "max_clients": max_clients, "read_timeout_seconds": 20}
    )
    return S3Store(cfg, max_uploads=4)


async def test_many_regions_keep_the_clients_at_the_bound(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """Uploads through 24 regions (moto signs with any) all land, and never more than
    s3.max_clients (4) S3 clients exist: evicted ones are closed and collected."""
    path = tmp_path / "f.txt"
    path.write_bytes(b"one region after another\n")
    baseline = live_clients()
    store = store_for(moto, max_clients=4)
    try:
        peak = 0
        for i in range(24):
            await store.upload(path, bucket, f"xx-region-{i}", f"k{i}", "text/plain")
            assert store.open_clients <= 4
            peak = max(peak, live_clients() - baseline)
        keys = await asyncio.to_thread(moto.client().list_objects_v2, Bucket=bucket)
        assert sorted(o["Key"] for o in keys["Contents"]) == sorted(f"k{i}" for i in range(24))
        assert peak == 4, peak
        assert store.open_clients == 4
    finally:
        store.close()
    assert live_clients() - baseline == 0


async def test_recently_used_region_keeps_its_client(moto: MotoServer) -> None:
    """A region used again stays cached (the same client), while the least recently used one
    is evicted when a new region comes."""
    store = store_for(moto, max_clients=2)
    try:
        with store.lease("a-1") as a:
            pass
        with store.lease("b-1"):
            pass
        with store.lease("a-1") as again:  # a-1 is now the most recent
            assert again is a
        with store.lease("c-1"):  # evicts b-1
            pass
        with store.lease("a-1") as still:
            assert still is a
        assert store.open_clients == 2
    finally:
        store.close()


async def test_client_evicted_while_leased_is_closed_only_after_its_lease(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """A client evicted while an upload holds it keeps working until the lease ends, and is
    closed and let go of then: the number of open clients returns to the bound."""
    path = tmp_path / "g.txt"
    path.write_bytes(b"meanwhile\n")
    store = store_for(moto, max_clients=2)
    try:
        with store.lease("held-1") as held:
            for i in range(5):
                await store.upload(path, bucket, f"other-{i}", f"o{i}", "text/plain")
            assert store.open_clients == 3  # the two cached, and the one still leased
            await asyncio.to_thread(held.put_object, Bucket=bucket, Key="held", Body=b"late")
        assert store.open_clients == 2
        with store.lease("held-1") as fresh:  # evicted: a new client for the region
            assert fresh is not held
        got = await asyncio.to_thread(moto.client().get_object, Bucket=bucket, Key="held")
        assert got["Body"].read() == b"late"
    finally:
        store.close()
