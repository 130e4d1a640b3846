"""Configuration: validation naming the key, environment overrides, the CLI refusing bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from downloader.config import load_config
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
    """notifier.claim_idle_ms (replaced by dead_after_ms) is accepted, so old files still load."""
    config = load_config(write(tmp_path, {"notifier": {"claim_idle_ms": 120000}}), environ={})
    assert config.notifier.claim_idle_ms == 120000
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
