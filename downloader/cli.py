"""`downloader api|processor|notifier|run|rebuild`: one process, one or all roles."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import ipaddress
import resource
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import start_http_server

from downloader.api import FRONT_DOOR, build_app
from downloader.backends import Backend
from downloader.backends.http import HttpBackend
from downloader.config import Config, load_config
from downloader.embedded import (
    AddressInUse,
    EmbeddedRedis,
    EmbeddedRedisError,
    listen_error,
    reachable,
)
from downloader.errors import ConfigError, StorageUnavailable
from downloader.heartbeat import new_instance_id
from downloader.log import configure_logging, get_logger
from downloader.netguard import NetworkPolicy
from downloader.notifier import Notifier
from downloader.processor import Processor
from downloader.storage import Storage, connect
from downloader.tenants import Tenants

__all__ = ["main"]

log = get_logger("downloader")

FILES_BESIDES_CONNECTIONS = 1024
"""Open files an api needs besides its client connections and their Redis connections: Redis
connections of its own, refused connections being answered, and in `run` the processor's
downloads (a socket and a file each) and the notifier's callbacks."""


def make_backends(config: Config) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    if config.backends.http is not None:
        policy = NetworkPolicy.from_config(config.security)
        backends["http"] = HttpBackend(
            config.backends.http.timeout,
            policy,
            config.notifier.signing_secret,
            config.notifier.concurrency,
            Tenants(config.api).signing_secrets(),
        )
    if config.backends.kafka is not None:
        from downloader.backends.kafka import KafkaBackend

        backends["kafka"] = KafkaBackend(config.backends.kafka, config.events.kafka_topic or None)
    return backends


def make_notifier(config: Config, storage: Storage, instance: str) -> Notifier:
    """A notifier with the configured backends, exporting events when events.kafka_topic is set."""
    backends = make_backends(config)
    exporter = None
    if config.events.kafka_topic and config.backends.kafka is not None:
        from downloader.exporter import EventExporter

        exporter = EventExporter(
            storage,
            config.backends.kafka,
            config.events.kafka_topic,
            instance,
            lock_ms=config.events.export_lock_ms,
        )
    return Notifier(config, storage, instance, backends, exporter)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@contextlib.asynccontextmanager
async def _storage(config: Config) -> AsyncIterator[Storage]:
    storage = Storage(connect(config), config)
    try:
        yield storage
    finally:
        await storage.close()


async def _start_api(
    config: Config, storage: Storage, host: str, port: int, serve_files: bool
) -> tuple[web.AppRunner, str]:
    """Listen on host:port through the front door (connection limits and deadlines); the
    runner and the dashboard's URL (with the port bound for 0)."""
    app = build_app(config, storage, serve_files=serve_files)
    door = app[FRONT_DOOR]
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=door.keepalive_timeout_s)
    await runner.setup()
    try:
        bound = await door.serve(runner, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    log.info("api listening", host=host, port=bound, max_connections=door.max_connections)
    return runner, f"http://{_url_host(host)}:{bound}/"


def _url_host(host: str) -> str:
    """How to reach a listen address from this machine, as the host part of a URL."""
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"[{host}]" if ":" in host else host


async def _serve_until(runner: web.AppRunner, stop: asyncio.Event) -> None:
    try:
        await stop.wait()
    finally:
        runner.app[FRONT_DOOR].close()  # stop listening first
        await runner.cleanup()


async def _watch_embedded(embedded: EmbeddedRedis, stop: asyncio.Event) -> None:
    """Stop everything when the embedded redis-server dies: without it nothing can work."""
    code = await embedded.wait_exit()
    log.error("embedded redis-server exited; stopping", exit_code=code, log=str(embedded.log_path))
    stop.set()


def _print_ready(url: str) -> None:
    """Where to look and what to try, on stdout, plain whatever the log format."""
    print(
        "downloader is running (Ctrl-C stops it)\n"
        f"  dashboard: {url}\n"
        f"  try:       curl -s {url}dashboard/instances  (then the demo in README.md, Quick start)",
        flush=True,
    )


async def _run(args: argparse.Namespace, config: Config, embedded: EmbeddedRedis | None) -> int:
    stop = _stop_event()
    instance = new_instance_id()
    roles = {"api", "processor", "notifier"} if args.command == "run" else {args.command}
    if "notifier" in roles and not make_backends(config):
        print(
            "error: the notifier needs a backend: set backends.http and/or backends.kafka",
            file=sys.stderr,
        )
        return 2
    if args.command != "run" or "api" not in roles:
        for role in roles - {"api"}:
            section = getattr(config, role)
            if section.metrics_port:
                start_http_server(section.metrics_port, addr=section.metrics_host)
    async with _storage(config) as storage:
        # a Redis laid out for another config stops us before any work is taken; one that is
        # not up yet is checked once it answers (and stops us then)
        refused: list[str] = []
        layout = asyncio.create_task(_layout_problem(storage, stop))
        await asyncio.wait({layout}, timeout=2)
        if layout.done() and layout.result():
            print(f"error: {layout.result()}", file=sys.stderr)
            return 2
        layout.add_done_callback(functools.partial(_refuse_on_problem, stop, refused))
        # the API listens first: a port in use stops us before any work is taken
        tasks: list[asyncio.Task[None]] = []
        url = ""
        if "api" in roles:
            host, port = _api_address(args, config)
            try:
                runner, url = await _start_api(config, storage, host, port, config.api.serve_files)
            except OSError as exc:  # taken since _ports_problem looked
                print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
                return 2
            tasks.append(asyncio.create_task(_serve_until(runner, stop)))
        if "processor" in roles:
            tasks.append(asyncio.create_task(Processor(config, storage, instance).run(stop)))
        if "notifier" in roles:
            tasks.append(asyncio.create_task(make_notifier(config, storage, instance).run(stop)))
        watch = asyncio.create_task(_watch_embedded(embedded, stop)) if embedded else None
        await asyncio.sleep(0)  # every role has begun
        if args.command == "run":
            _print_ready(url)
        try:
            await asyncio.gather(*tasks)
        finally:
            redis_died = watch is not None and watch.done()
            if watch is not None:
                watch.cancel()
            layout.cancel()
    return 2 if refused else 1 if redis_died else 0


async def _layout_problem(storage: Storage, stop: asyncio.Event) -> str | None:
    """storage.layout_problem(), once Redis answers."""
    while not stop.is_set():
        try:
            return await storage.layout_problem()
        except StorageUnavailable:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
    return None


def _refuse_on_problem(stop: asyncio.Event, refused: list[str], task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None and task.result():
        refused.append(task.result())
        log.error("stopping: this Redis cannot be served with this config", problem=task.result())
        stop.set()


async def _rebuild(config: Config) -> int:
    """Refold every live job's projection from its events, shard by shard (from each shard's
    job index: no key scan). A packed job's projection is folded whenever it is read."""
    jobs = events = 0
    async with _storage(config) as storage:
        if problem := await storage.layout_problem():
            print(f"error: {problem}", file=sys.stderr)
            return 2
        for shard in storage.all_shards:
            for job_id in await storage.job_ids(shard):
                folded = await storage.rebuild(job_id)
                jobs += folded > 0
                events += folded
    print(f"rebuilt {jobs} live jobs from {events} events")
    return 0


def _api_address(args: argparse.Namespace, config: Config) -> tuple[str, int]:
    return args.host or config.api.host, args.port or config.api.port


def _ports_problem(args: argparse.Namespace, config: Config) -> str | None:
    """A one-line error when a port this command listens on is taken, before anything starts."""
    if args.command in ("api", "run"):
        host, port = _api_address(args, config)
        error = listen_error(host, port)
        if error is not None and error.errno == errno.EADDRINUSE:
            holder = "another downloader" if _is_downloader(host, port) else "another program"
            return (
                f"{host}:{port} is already in use by {holder}; stop it, or set api.port or --port"
            )
        if error is not None:
            return f"cannot listen on {host}:{port}: {error.strerror}; set api.host or --host"
    if args.command in ("processor", "notifier"):
        section = getattr(config, args.command)
        port, host = section.metrics_port, section.metrics_host
        error = listen_error(host, port)  # where prometheus_client listens
        if error is not None and error.errno == errno.EADDRINUSE:
            return f"{args.command}.metrics_port {port} is already in use; stop it or set another"
        if error is not None:
            return (
                f"cannot listen on {args.command}.metrics_host {host} port {port}: {error.strerror}"
            )
    return None


def _exposure_problem(host: str, config: Config) -> str | None:
    """A one-line refusal when the API would listen beyond this machine with no token."""
    if config.api.tokens or config.api.allow_anonymous or _is_loopback(host):
        return None
    return (
        f"the api would listen on {host or 'every address'}, which is not a loopback address, "
        "with no api.tokens: anyone who can reach it could submit jobs. Set api.tokens, or "
        "api.allow_anonymous: true to serve without tokens on purpose"
    )


def _is_loopback(host: str) -> bool:
    """Whether a listen address is this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _file_limit_problem(config: Config) -> str | None:
    """Raise this process's open-file limit to what api.max_connections needs (as far as the
    hard limit allows); a one-line error when it cannot get there."""
    needed = 2 * config.api.max_connections + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return None
    return (
        f"api.max_connections {config.api.max_connections} needs about {needed} open files, "
        f"but this process may open {hard} (ulimit -n, LimitNOFILE, compose ulimits); "
        "raise the limit or lower api.max_connections"
    )


def _is_downloader(host: str, port: int) -> bool:
    """Whether a downloader API answers on host:port (its /hb says OK, disabled or unavailable)."""
    try:
        with urllib.request.urlopen(f"http://{_url_host(host)}:{port}/hb", timeout=1) as resp:
            body = resp.read(64)
    except urllib.error.HTTPError as exc:
        body = exc.read(64)
    except (OSError, ValueError):
        return False
    return body in (b"OK", b"disabled", b"storage unavailable")


def _embed_if_needed(config: Config) -> tuple[Config, EmbeddedRedis | None]:
    """`run` with no Redis configured, or a loopback one where nothing answers: start one.

    Raises EmbeddedRedisError (AddressInUse when the port is taken) with a one-line reason."""
    if config.redis.sentinels:
        return config, None
    host, port = "127.0.0.1", 6379
    if config.redis.addr:
        host, port = config.redis.server
        if reachable(host, port) or host not in ("127.0.0.1", "localhost", "::1"):
            log.info("using redis", addr=config.redis.addr)
            return config, None
    embedded = EmbeddedRedis(
        config.redis.embedded_dir, "127.0.0.1" if host == "localhost" else host, port
    )
    try:
        embedded.start()
    except AddressInUse as exc:
        advice = (
            "stop it, or set redis.addr to a free port"
            if config.redis.addr
            else f"set redis.addr to {embedded.addr} to use that server, or stop it"
        )
        raise AddressInUse(f"{exc}; {advice}") from None
    assert embedded.proc is not None
    log.info(
        "started embedded redis",
        addr=embedded.addr,
        pid=embedded.proc.pid,
        data_dir=str(embedded.data_dir),
    )
    redis = config.redis.model_copy(update={"addr": embedded.addr})
    return config.model_copy(update={"redis": redis}), embedded


async def _receive(host: str, port: int) -> int:
    """Print every callback POSTed to host:port (a debugging aid for trying the service)."""
    stop = _stop_event()

    async def show(request: web.Request) -> web.Response:
        print(
            f"{request.method} {request.path} {(await request.read()).decode(errors='replace')}",
            flush=True,
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", show)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"listening for callbacks on http://{host}:{port}/", flush=True)
    await stop.wait()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="downloader", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("api", "the HTTP API"),
        ("processor", "download jobs"),
        ("notifier", "deliver callbacks"),
        ("run", "api, processor and notifier in one process (embeds Redis when none is set)"),
        ("rebuild", "recompute every job projection from its events"),
        ("check", "validate a configuration file and exit (0: valid, 2: invalid)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "-c", "--config", default="config.json", help="configuration file (default config.json)"
        )
        if name in ("api", "run"):
            p.add_argument("--host", default=None, help="listen address (default api.host)")
            p.add_argument(
                "--port", type=int, default=None, help="listen port (default api.port, 8000)"
            )
    rec = sub.add_parser(
        "receive", help="print callbacks POSTed to --port (for trying the service)"
    )
    rec.add_argument("--host", default="127.0.0.1")
    rec.add_argument("--port", type=int, default=9001)
    args = parser.parse_args(argv)
    if args.command == "receive":
        return asyncio.run(_receive(args.host, args.port))
    notes: list[str] = []  # keys of the original service that mean nothing here
    try:
        config = load_config(args.config, warnings=notes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        if problem := _exposure_problem(config.api.host, config):
            print(f"error: {problem}", file=sys.stderr)
            return 2
        print(f"{args.config}: valid configuration")
        return 0
    configure_logging(config.log)
    for note in notes:
        log.warning(note, config=args.config)
    if args.command in ("api", "run"):
        problem = _exposure_problem(_api_address(args, config)[0], config)
        if problem := problem or _file_limit_problem(config):
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if problem := _ports_problem(args, config):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    embedded = None
    try:
        if args.command == "run":
            config, embedded = _embed_if_needed(config)
        elif not config.redis.addr and not config.redis.sentinels:
            print("error: redis.addr is not set (only `run` embeds a Redis)", file=sys.stderr)
            return 2
        if args.command == "rebuild":
            return asyncio.run(_rebuild(config))
        return asyncio.run(_run(args, config, embedded))
    except EmbeddedRedisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
