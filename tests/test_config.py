"""Configuration: validation naming the key, environment overrides, the CLI refusing bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from downloader.config import S3Storage, load_config
from downloader.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return path


def test_repository_config_is_valid() -> None:
    """The config.json shipped at the root validates."""
    config = load_config(ROOT / "config.json", environ={})
    assert config.backends.http is not None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"processor": {"retry_backoff_seconds": "soon"}}, "processor.retry_backoff_seconds"),
        ({"processor": {"unknown": 1}}, "processor.unknown"),
        ({"nope": {}}, "nope"),
        ({"notifier": {"retry_schedule_seconds": [1, -1]}}, "notifier.retry_schedule_seconds"),
        ({"security": {"allowed_networks": ["10.0.0.0/33"]}}, "security.allowed_networks"),
        ({"notifier": {"signing_secret": "plain"}}, "notifier.signing_secret"),
        ({"notifier": {"heartbeat_ms": 3000}}, "notifier.dead_after_ms"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"api": {"port": 70000}}, "api.port"),
        ({"s3": {"allowed_buckets": ["Not_A_Bucket"]}}, "s3.allowed_buckets"),
        ({"s3": {"endpoint_url": "minio:9000"}}, "s3.endpoint_url"),
        ({"s3": {"key_prefix": "/abs/"}}, "s3.key_prefix"),
        ({"s3": {"addressing_style": "dns"}}, "s3.addressing_style"),
        ({"s3": {"access_key_id": "AKIA"}}, "secret_access_key"),
        ({"s3": {"enabled": "yes please"}}, "s3.enabled"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, data: object, key: str) -> None:
    """An invalid file raises ConfigError whose message names the key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, data), environ={})


def test_a_config_with_the_deprecated_claim_idle_ms_still_loads(tmp_path: Path) -> None:
    """notifier.claim_idle_ms (replaced by dead_after_ms) is accepted with a warning, which
    `downloader check` prints too, so old files still load."""
    warnings: list[str] = []
    path = write(tmp_path, {"notifier": {"claim_idle_ms": 120000}})
    config = load_config(path, environ={}, warnings=warnings)
    assert config.notifier.dead_after_ms == 5000
    assert any("claim_idle_ms is deprecated" in w for w in warnings), warnings
    assert config.notifier.dead_after_ms == 5000


def test_environment_overrides_keys(tmp_path: Path) -> None:
    """DOWNLOADER__SECTION__KEY overrides a key; JSON values are parsed."""
    path = write(tmp_path, {"redis": {"addr": "a:1"}, "notifier": {"concurrency": 3}})
    config = load_config(
        path,
        environ={
            "DOWNLOADER__REDIS__ADDR": "b:2",
            "DOWNLOADER__NOTIFIER__CONCURRENCY": "7",
            "DOWNLOADER__NOTIFIER__RETRY_SCHEDULE_SECONDS": "[1, 2]",
            "DOWNLOADER__BACKENDS__KAFKA": '{"bootstrap.servers": "k:9092"}',
            "UNRELATED": "x",
        },
    )
    assert config.redis.addr == "b:2"
    assert config.notifier.concurrency == 7
    assert config.notifier.retry_schedule_seconds == [1.0, 2.0]
    assert config.backends.kafka == {"bootstrap.servers": "k:9092"}


def test_s3_section_from_the_environment(tmp_path: Path) -> None:
    """The s3 section is off by default and set like any other through DOWNLOADER__S3__*."""
    assert load_config(write(tmp_path, {}), environ={}).s3.enabled is False
    config = load_config(
        write(tmp_path, {}),
        environ={
            "DOWNLOADER__S3__ENABLED": "true",
            "DOWNLOADER__S3__ENDPOINT_URL": "http://minio:9000",
            "DOWNLOADER__S3__KEY_PREFIX": "downloads/",
            "DOWNLOADER__S3__ALLOWED_BUCKETS": '["media", "media.example.com"]',
        },
    )
    assert config.s3.enabled and config.s3.endpoint_url == "http://minio:9000"
    assert config.s3.key_prefix == "downloads/"
    assert config.s3.allowed_buckets == ["media", "media.example.com"]
    assert config.s3.access_key_id is None  # boto3's default credential chain


def test_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    """A bad value from the environment is reported under its key."""
    with pytest.raises(ConfigError, match=r"notifier\.concurrency"):
        load_config(write(tmp_path, {}), environ={"DOWNLOADER__NOTIFIER__CONCURRENCY": "many"})


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    """A file that is not JSON, or a named file that does not exist, is refused clearly."""
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.json", environ={})


def test_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    """`downloader api` with a bad config exits 2 and prints the key."""
    path = write(tmp_path, {"api": {"port": "eighty"}})
    proc = subprocess.run(
        [sys.executable, "-m", "downloader", "api", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "api.port" in proc.stderr


def test_check_command_validates_a_file_without_starting_anything(tmp_path: Path) -> None:
    """`downloader check -c FILE` exits 0 on a valid file and 2 naming the key on a bad one."""
    good = subprocess.run(
        [sys.executable, "-m", "downloader", "check", "-c", str(ROOT / "config.json")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "downloader", "check", "-c", str(write(tmp_path, {"nope": 1}))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "nope: unknown key" in bad.stderr


# -- the original's config forms ----------------------------------------------------------------

ORIGINAL_SAMPLE = ROOT / "tests" / "data" / "original-config.sample.json"  # the original's own


def test_original_sample_loads_with_one_warning_per_meaningless_key() -> None:
    """The original's sample config validates; notifier.download_url and the Go client's
    go.delivery.reports are dropped, each with one warning naming what to use instead."""
    warnings: list[str] = []
    config = load_config(ORIGINAL_SAMPLE, environ={}, warnings=warnings)
    assert config.processor.files_root == "/tmp/"
    assert config.processor.request_headers == {"Accept": "*/*", "User-Agent": "Downloader v1"}
    assert config.notifier.deletion_interval == 180
    assert config.backends.kafka is not None and "go.delivery.reports" not in config.backends.kafka
    assert config.backends.kafka["request.required.acks"] == -1
    [download_url, go] = warnings
    assert download_url.startswith("notifier.download_url is ignored")
    assert "processor.download_url" in download_url
    assert go.startswith("backends.kafka['go.delivery.reports'] is ignored")
    assert "librdkafka does not know" in go


@pytest.mark.parametrize(
    ("processor", "root"),
    [
        pytest.param(
            {"filestorage": {"type": "filesystem", "rootdir": "/srv/f"}}, "/srv/f", id="obj"
        ),
        pytest.param({"filestorage": {"type": "filesystem"}}, "/srv/s", id="obj-no-rootdir"),
        pytest.param({"filestorage": "filesystem"}, "/srv/s", id="flat"),
        pytest.param({}, "/srv/s", id="missing"),
        pytest.param({"filestorage": {"rootdir": "/srv/env"}}, "/srv/env", id="no-type"),
    ],
)
def test_filestorage_filesystem_forms_resolve_one_root(
    tmp_path: Path, processor: dict[str, object], root: str
) -> None:
    """The filesystem store's root is filestorage.rootdir, else storage_dir, whatever the form."""
    path = write(tmp_path, {"processor": {"storage_dir": "/srv/s", **processor}})
    assert load_config(path, environ={}).processor.files_root == root


def test_filestorage_s3_object(tmp_path: Path) -> None:
    """`{"type": "s3", "region", "bucket"}` selects the bucket; there is no local files root."""
    path = write(
        tmp_path,
        {"processor": {"filestorage": {"type": "s3", "region": "eu-west-2", "bucket": "media"}}},
    )
    processor = load_config(path, environ={}).processor
    assert processor.files_root is None
    assert isinstance(processor.filestorage, S3Storage)
    assert (processor.filestorage.type, processor.filestorage.bucket) == ("s3", "media")


def test_filestorage_rootdir_from_the_environment(tmp_path: Path) -> None:
    """DOWNLOADER__PROCESSOR__FILESTORAGE__ROOTDIR moves the files of the original's object form."""
    path = write(tmp_path, {"processor": {"filestorage": {"type": "filesystem", "rootdir": "/a"}}})
    environ = {"DOWNLOADER__PROCESSOR__FILESTORAGE__ROOTDIR": "/b"}
    assert load_config(path, environ=environ).processor.files_root == "/b"


@pytest.mark.parametrize(
    ("filestorage", "key"),
    [
        ({"type": "s3", "region": "eu-west-1"}, r"processor\.filestorage\.bucket: Field required"),
        ({"type": "s3", "region": "eu-west-1", "bucket": "Bad_Name"}, r"filestorage\.bucket"),
        ({"type": "s3", "region": "EU West", "bucket": "media"}, r"filestorage\.region"),
        ({"type": "s3", "region": "r", "bucket": "media", "prefix": "/x"}, r"\.prefix: unknown"),
        ({"type": "gcs"}, r"processor\.filestorage: .*'filesystem', 's3'"),
        ("s3", r"processor\.filestorage\.region"),
    ],
)
def test_bad_filestorage_names_the_key(tmp_path: Path, filestorage: object, key: str) -> None:
    """A bad filestorage object is an error naming the key inside it."""
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, {"processor": {"filestorage": filestorage}}), environ={})


def test_filestorage_keys_of_the_other_type_are_ignored_with_a_warning(tmp_path: Path) -> None:
    """As in the original (a plain map), a rootdir next to type s3 is ignored, and warned about."""
    s3 = {"type": "s3", "region": "eu-west-1", "bucket": "media", "rootdir": "/old"}
    warnings: list[str] = []
    config = load_config(write(tmp_path, {"processor": {"filestorage": s3}}), {}, warnings)
    assert config.processor.files_root is None
    assert warnings == ["processor.filestorage.rootdir is ignored with type 's3'"]


def test_serve_files_needs_files_on_the_filesystem(tmp_path: Path) -> None:
    """api.serve_files with an S3 filestorage is refused (there is no directory to serve)."""
    s3 = {"type": "s3", "region": "eu-west-1", "bucket": "media"}
    path = write(tmp_path, {"api": {"serve_files": True}, "processor": {"filestorage": s3}})
    with pytest.raises(ConfigError, match=r"api\.serve_files"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("redis", "sentinels", "master"),
    [
        pytest.param(
            {"addr": "127.0.0.1:6379", "sentinel": ["10.0.0.1:26379", "s2"], "master_name": "m"},
            [("10.0.0.1", 26379), ("s2", 26379)],
            "m",
            id="list",
        ),
        pytest.param(
            {"addr": "a:1, b:2", "sentinel": True}, [("a", 1), ("b", 2)], "mymaster", id="true"
        ),
        pytest.param({"addr": "a:1", "sentinel": [], "master_name": "m"}, [], "m", id="empty"),
        pytest.param({"addr": "a:1"}, [], "mymaster", id="none"),
    ],
)
def test_redis_sentinel_forms_resolve_one_list(
    tmp_path: Path, redis: dict[str, object], sentinels: list[tuple[str, int]], master: str
) -> None:
    """redis.sentinel is true (sentinels in addr) or the original's list; both give one list."""
    config = load_config(write(tmp_path, {"redis": redis}), environ={})
    assert (config.redis.sentinels, config.redis.master) == (sentinels, master)


def test_sentinel_list_without_master_name_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """As the original, a sentinel list without master_name means plain redis.addr (warned)."""
    warnings: list[str] = []
    path = write(tmp_path, {"redis": {"addr": "a:1", "sentinel": ["s:26379"]}})
    config = load_config(path, environ={}, warnings=warnings)
    assert (config.redis.sentinels, config.redis.server) == ([], ("a", 1))
    assert len(warnings) == 1 and "redis.master_name" in warnings[0]


@pytest.mark.parametrize(
    ("redis", "key"),
    [
        ({"sentinel": ["s:port"], "master_name": "m"}, r"redis\.sentinel"),
        ({"sentinel": "yes please"}, r"redis\.sentinel"),
        ({"sentinel": True}, r"redis: sentinel: true needs addr"),
        ({"addr": "a:1,b:x", "sentinel": True}, r"redis\.addr"),
        ({"cluster": True}, r"redis: cluster: true needs addr"),
        ({"cluster": True, "addr": "a:1", "db": 2}, r"cluster: true needs db 0"),
        ({"cluster": True, "addr": "a:1", "sentinel": True}, r"exclude each other"),
        ({"addr": "a:6379,b:6380"}, r"addr names several servers"),
        ({"shards": 0}, r"redis\.shards"),
        ({"shards": 63}, r"redis\.shards"),
        ({"key_prefix": "dl{x}"}, r"redis\.key_prefix"),
    ],
)
def test_bad_sentinel_settings_name_the_key(
    tmp_path: Path, redis: dict[str, object], key: str
) -> None:
    """A sentinel address that is not host:port, or `true` without addresses, is refused; so
    are a cluster without seeds or with a database, shards outside 1..62 and a key prefix with
    braces (it precedes the hash tags)."""
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, {"redis": redis}), environ={})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"notifier": {"download_urls": "x"}}, r"notifier\.download_urls: unknown key"),
        ({"processor": {"rootdir": "/x"}}, r"processor\.rootdir: unknown key"),
        ({"api": {"download_url": "x"}}, r"api\.download_url: unknown key"),
    ],
)
def test_keys_nobody_knows_stay_errors(tmp_path: Path, data: object, key: str) -> None:
    """Only the original's own meaningless keys are forgiven; any other unknown key is an error."""
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, data), environ={}, warnings=[])


def test_check_prints_each_warning_once(tmp_path: Path) -> None:
    """`downloader check` on the original's sample exits 0 and prints each warning once."""
    proc = subprocess.run(
        [sys.executable, "-m", "downloader", "check", "-c", str(ORIGINAL_SAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(" is ignored")[0] for line in lines] == [
        "warning: notifier.download_url",
        "warning: backends.kafka['go.delivery.reports']",
    ]
