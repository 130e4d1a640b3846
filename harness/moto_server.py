"""A real S3-compatible HTTP server for tests: moto's server mode in a child process, no Docker."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from harness.servers import free_port

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "eu-west-1"


class MotoServer:
    """`python -m moto.server` on 127.0.0.1. State lives in its memory: a restart empties it.

    `auth_after` > 0 turns on moto's IAM checks after that many requests (before it, any key is
    accepted), so unknown access keys get a real `InvalidAccessKeyId`."""

    def __init__(self, port: int | None = None, auth_after: int = 0) -> None:
        self.port = port or free_port()
        self.auth_after = auth_after
        self.log_path = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> MotoServer:
        env = dict(os.environ)
        if self.auth_after:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.auth_after)
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while True:  # a child process gives no readiness signal but its open port
            if self.popen.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server not up on {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.popen = None
        self.log_path.unlink(missing_ok=True)

    def client(self) -> Any:
        """A boto3 client of this server, for the tests' own checks."""
        return boto3.session.Session().client(
            "s3",
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The `s3` config section pointing at this server."""
        return {
            "enabled": True,
            "endpoint_url": self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "addressing_style": "path",
            "max_attempts": 1,
            "connect_timeout_seconds": 2,
            "read_timeout_seconds": 5,
            **extra,
        }


async def make_bucket(server: MotoServer, name: str | None = None) -> str:
    """A new bucket in `server` (a random name unless given), in REGION."""
    name = name or f"t-{secrets.token_hex(6)}"
    await asyncio.to_thread(
        server.client().create_bucket,
        Bucket=name,
        CreateBucketConfiguration={"LocationConstraint": REGION},
    )
    return name


async def get_object(server: MotoServer, bucket: str, key: str) -> tuple[bytes, str]:
    """(body, Content-Type) of an object."""

    def read() -> tuple[bytes, str]:
        obj = server.client().get_object(Bucket=bucket, Key=key)
        return obj["Body"].read(), obj["ContentType"]

    return await asyncio.to_thread(read)


async def object_keys(server: MotoServer, bucket: str) -> list[str]:
    """The keys in a bucket (the first 1000: more than any test makes)."""
    res = await asyncio.to_thread(server.client().list_objects_v2, Bucket=bucket)
    return [o["Key"] for o in res.get("Contents", [])]
