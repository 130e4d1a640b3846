"""Throwaway single-node Apache Kafka (KRaft) broker for tests, fetched with Maven, no Docker."""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import deque
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.4.0")
"""Kafka release fetched from Maven Central (4.x only: KRaft, log4j2)."""

LOG4J_VERSION = "2.25.5"
"""log4j2 version pinned for the slf4j binding (Kafka 4.4.0 ships log4j-core 2.25.5)."""

DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MIN_JAVA = 17
REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 50

_QUIET_CLIENT: dict[str, Any] = {
    "log_level": 0,  # librdkafka would otherwise print "Connection refused" to stderr
    "reconnect.backoff.ms": 50,
    "reconnect.backoff.max.ms": 200,
}


_COORDINATOR_PENDING = {
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_COORDINATOR,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
}


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started."""


# --------------------------------------------------------------------------- environment


def external_bootstrap() -> str | None:
    """Return ``$KAFKA_BOOTSTRAP_SERVERS`` if set (use that broker instead of starting one)."""
    value = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    return value or None


def default_cache_dir() -> Path:
    """Return ``$KAFKA_CACHE_DIR`` or ``<repo>/.cache/kafka``."""
    env = os.environ.get("KAFKA_CACHE_DIR", "").strip()
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "kafka"


def _java() -> str | None:
    """Path of the java launcher ($JAVA_HOME first, then PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


@cache
def _java_major(java: str) -> int | None:
    """Major version of ``java`` (17 for "17.0.15"), None if it cannot be run."""
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def kafka_available() -> tuple[bool, str]:
    """Say whether a broker can be had here: external one, or java >= 17 plus mvn (or a cache)."""
    if external_bootstrap():
        return True, "using KAFKA_BOOTSTRAP_SERVERS"
    how = (
        "install a JDK 17+ and Maven (e.g. `apt-get install openjdk-17-jdk-headless maven`), "
        "or set KAFKA_BOOTSTRAP_SERVERS=host:port to use an existing broker"
    )
    java = _java()
    if java is None:
        return False, f"no `java` on PATH: {how}"
    major = _java_major(java)
    if major is None or major < MIN_JAVA:
        return False, f"`{java}` is Java {major}, Kafka 4 needs {MIN_JAVA}+: {how}"
    if shutil.which("mvn") is None and not _marker(default_cache_dir(), KAFKA_VERSION).exists():
        return False, f"no `mvn` on PATH and no cached Kafka jars: {how}"
    return True, ""


# --------------------------------------------------------------------------- fetching jars


def _version_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"kafka_2.13-{version}"


def _marker(cache_dir: Path, version: str) -> Path:
    return _version_dir(cache_dir, version) / "classpath.txt"


def _pom(version: str) -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.test</groupId>
  <artifactId>kafka-test-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencyManagement>
    <dependencies>
      <dependency>
        <groupId>org.apache.logging.log4j</groupId>
        <artifactId>log4j-api</artifactId>
        <version>{LOG4J_VERSION}</version>
      </dependency>
      <dependency>
        <groupId>org.apache.logging.log4j</groupId>
        <artifactId>log4j-core</artifactId>
        <version>{LOG4J_VERSION}</version>
      </dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- Kafka logs through slf4j 1.7; without a binding the broker is silent. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""


def kafka_classpath(cache_dir: Path, version: str = KAFKA_VERSION) -> str:
    """Fetch kafka_2.13 plus runtime dependencies with mvn into ``cache_dir``; return the classpath.

    Idempotent: once ``classpath.txt`` exists no mvn process is started. Safe to call from
    several processes at once (a file lock serialises the fetch).
    """
    cache_dir = Path(cache_dir).resolve()
    vdir = _version_dir(cache_dir, version)
    marker = _marker(cache_dir, version)
    if marker.exists():
        return marker.read_text().strip()
    vdir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".kafka_2.13-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # another process fetched it while we waited
            return marker.read_text().strip()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaBrokerError(kafka_available()[1] or "mvn not found")
        lib = vdir / "lib"
        shutil.rmtree(lib, ignore_errors=True)
        for stale in vdir.glob("*.jsa"):  # class-data archives are tied to the jar files
            stale.unlink()
        (vdir / "pom.xml").write_text(_pom(version))
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(vdir / "pom.xml"),
            f"-Dmaven.repo.local={cache_dir / 'm2'}",
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={lib}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, check=False, stdin=subprocess.DEVNULL
        )
        jars = sorted(lib.glob("*.jar")) if lib.is_dir() else []
        if proc.returncode != 0 or not any(j.name.startswith("kafka_2.13-") for j in jars):
            out = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise KafkaBrokerError(
                f"fetching Kafka {version} with Maven failed (exit {proc.returncode}):\n"
                f"$ {' '.join(cmd)}\n{out}"
            )
        classpath = os.pathsep.join(str(j) for j in jars)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(classpath + "\n")
        tmp.replace(marker)
        return classpath


@cache
def _storage_tool_class(classpath: str) -> str:
    """Main class of the storage tool in this Kafka (Scala one in 4.x, Java one if moved)."""
    candidates = ("kafka/tools/StorageTool.class", "org/apache/kafka/tools/StorageTool.class")
    for jar in classpath.split(os.pathsep):
        name = Path(jar).name
        if not (name.startswith("kafka_2.13-") or name.startswith("kafka-tools-")):
            continue
        with zipfile.ZipFile(jar) as zf:
            names = set(zf.namelist())
        for cls in candidates:
            if cls in names:
                return cls.removesuffix(".class").replace("/", ".")
    return "kafka.tools.StorageTool"


# --------------------------------------------------------------------------- ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Free loopback ports *outside* the ephemeral range.

    A port inside it can be grabbed by a client's own outgoing connection (TCP
    self-connect to 127.0.0.1:P while nothing listens on P), after which the broker
    cannot bind it; clients retrying against a restarting broker do exactly that.
    """
    lo, hi = _ephemeral_range()
    pool = list(range(10000, lo)) if lo - 10000 >= 1000 else list(range(hi + 1, 65536))
    rng = random.Random(os.urandom(8))
    ports: list[int] = []
    for _ in range(2000):
        if len(ports) == count or not pool:
            break
        port = rng.choice(pool)
        if port not in ports and _bindable(port):
            ports.append(port)
    while len(ports) < count:  # pathological port range: let the kernel choose
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


# --------------------------------------------------------------------------- admin helpers


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, **_QUIET_CLIENT})


def create_topic(
    bootstrap: str, name: str, partitions: int = 1, *, exist_ok: bool = False, timeout: float = 30
) -> None:
    """Create ``name`` (replication 1) and wait until every partition has a leader."""
    admin = _admin(bootstrap)
    fut = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)],
        operation_timeout=timeout,
        request_timeout=timeout,
    )[name]
    try:
        fut.result(timeout=timeout)
    except KafkaException as exc:
        if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise
    deadline = time.monotonic() + timeout
    while True:
        topic = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
        if (
            topic is not None
            and topic.error is None
            and len(topic.partitions) >= partitions
            and all(p.leader >= 0 for p in topic.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise KafkaBrokerError(f"topic {name!r} has no leader after {timeout}s")
        time.sleep(0.05)


def delete_topic(
    bootstrap: str, name: str, *, missing_ok: bool = True, timeout: float = 30
) -> None:
    """Delete ``name`` and wait until it is gone from the metadata."""
    admin = _admin(bootstrap)
    fut = admin.delete_topics([name], operation_timeout=timeout, request_timeout=timeout)[name]
    try:
        fut.result(timeout=timeout)
    except KafkaException as exc:
        if not (missing_ok and exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise
    deadline = time.monotonic() + timeout
    while name in admin.list_topics(timeout=timeout).topics:
        if time.monotonic() > deadline:
            raise KafkaBrokerError(f"topic {name!r} still listed {timeout}s after deletion")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the broker

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = OUT
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""

_FAST_START_JVM = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData"]
"""Startup-oriented JVM flags (C1 only, serial GC): roughly halves broker boot time."""

_live: set[KafkaBroker] = set()
"""Brokers not closed yet (strong refs: a dropped broker is still stopped at exit)."""


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_live):
        with contextlib.suppress(Exception):
            broker.close()


def _pdeathsig() -> Any:
    """preexec_fn that makes the JVM die with this process (Linux, main thread only)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG fires when the *thread* that forked exits
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return set_pdeathsig


def _kafka_uuid() -> str:
    """Random Kafka Uuid string (base64url, 22 chars, not starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _read_properties(path: Path) -> dict[str, str]:
    """Minimal java.util.Properties reader (key=value lines, # comments)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


class KafkaBroker:
    """One combined broker+controller JVM on 127.0.0.1; same ports and data across restarts.

    ``stop()`` keeps the data directory (``start()`` afterwards resumes it); ``close()``
    (or leaving the ``with`` block) also deletes the temp dir when this object created it.
    """

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        work_dir: Path | None = None,
        auto_create_topics: bool = False,
        extra_config: dict[str, str] | None = None,
        heap: str = "512m",
        fast_jvm: bool = True,
        class_data_sharing: bool | None = None,
        log_level: str = "INFO",
        warm_group_coordinator: bool = True,
        startup_timeout: float = 90.0,
        version: str = KAFKA_VERSION,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._own_dir = work_dir is None
        self.work_dir = (
            Path(tempfile.mkdtemp(prefix="kafka-broker-")) if work_dir is None else Path(work_dir)
        )
        self.auto_create_topics = auto_create_topics
        self.extra_config = dict(extra_config or {})
        self.heap = heap
        self.fast_jvm = fast_jvm
        if class_data_sharing is None:
            class_data_sharing = os.environ.get("KAFKA_BROKER_CDS", "1") != "0"
        self.class_data_sharing = class_data_sharing
        self.log_level = log_level
        self.warm_group_coordinator = warm_group_coordinator
        self.startup_timeout = startup_timeout
        self.version = version
        self.port: int | None = None
        self.controller_port: int | None = None
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._classpath: str | None = None
        self._cds_dump: Path | None = None
        self._starts = 0
        _live.add(self)

    # -- paths and properties

    @property
    def data_dir(self) -> Path:
        """Kafka ``log.dirs`` (also holds the KRaft metadata log)."""
        return self.work_dir / "data"

    @property
    def log_file(self) -> Path:
        """File receiving the JVM's stdout and stderr (appended across restarts)."""
        return self.work_dir / "kafka.log"

    @property
    def config_file(self) -> Path:
        """Generated server.properties."""
        return self.work_dir / "server.properties"

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>`` of the PLAINTEXT listener (stable across restarts)."""
        if self.port is None:
            raise KafkaBrokerError("broker has no port yet: call start() first")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running JVM, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_running(self) -> bool:
        """True while the JVM process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle

    def start(self) -> KafkaBroker:
        """Fetch jars if needed, format storage on first start, launch and wait until ready."""
        if self.is_running():
            return self
        t0 = time.monotonic()
        if self._classpath is None:
            self._classpath = kafka_classpath(self.cache_dir, self.version)
        self.timings["classpath"] = time.monotonic() - t0
        first = self.port is None
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                self.port, self.controller_port = _free_ports(2)
            self._write_config()
            t1 = time.monotonic()
            if not (self.data_dir / "meta.properties").exists():
                self._format()
            self.timings["format"] = time.monotonic() - t1
            t2 = time.monotonic()
            try:
                self._launch_and_wait()
            except KafkaBrokerError:
                if attempt + 1 < attempts and "Address already in use" in self._log_tail():
                    continue  # lost a race for the port: pick others
                raise
            self.timings["launch"] = time.monotonic() - t2
            self.timings["start"] = time.monotonic() - t0
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM to the process group, SIGKILL after ``timeout``); data kept."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the JVM's process group (crash simulation); data kept."""
        self._terminate(signal.SIGKILL, 10.0)

    def restart(self, *, hard: bool = False) -> KafkaBroker:
        """Stop (or kill if ``hard``) and start again on the same ports and data dir."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the work dir if it was created here."""
        self.stop()
        _live.discard(self)
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create_topic(self, name: str, partitions: int = 1, *, exist_ok: bool = False) -> None:
        """Create a topic (replication 1) and wait for its leaders."""
        create_topic(self.bootstrap_servers, name, partitions, exist_ok=exist_ok)

    def delete_topic(self, name: str, *, missing_ok: bool = True) -> None:
        """Delete a topic and wait until it is gone."""
        delete_topic(self.bootstrap_servers, name, missing_ok=missing_ok)

    # -- internals

    def _config(self) -> dict[str, str]:
        port, cport = self.port, self.controller_port
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",  # 50 by default: slow first group join
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # a restarted (esp. SIGKILLed) broker cannot re-register until the old
            # incarnation's session expires: 9 s by default
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
            "log.segment.bytes": str(16 * 1024 * 1024),
            "log.index.size.max.bytes": str(1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        }
        config.update(self.extra_config)
        return config

    def _write_config(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in self._config().items()]
        self.config_file.write_text("\n".join(lines) + "\n")
        (self.work_dir / "log4j2.properties").write_text(_LOG4J2.format(level=self.log_level))

    def _cds_archive(self) -> Path:
        """Class-data archive for this Kafka + JDK (saves ~1s per JVM start)."""
        java = os.path.realpath(_java() or "java")
        stamp = os.stat(java).st_mtime_ns if os.path.exists(java) else 0
        key = f"{java}:{stamp}:{self.fast_jvm}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return _version_dir(self.cache_dir.resolve(), self.version) / f"kafka-{digest}.jsa"

    def _jvm_cmd(self, main: str, *args: str, dump_cds: bool = False) -> list[str]:
        java = _java()
        if java is None:
            raise KafkaBrokerError(kafka_available()[1])
        assert self._classpath is not None
        cmd = [java, f"-Xmx{self.heap}", "-Djava.awt.headless=true"]
        if self.fast_jvm:
            cmd += _FAST_START_JVM
        if self.class_data_sharing:
            archive = self._cds_archive()
            if archive.exists():
                cmd += [f"-XX:SharedArchiveFile={archive}", "-Xlog:cds=off,cds+dynamic=off"]
            elif dump_cds:
                self._cds_dump = archive.with_name(f"{archive.stem}.{os.getpid()}.{id(self)}.tmp")
                cmd += [f"-XX:ArchiveClassesAtExit={self._cds_dump}", "-Xlog:cds=off"]
        cmd += [f"-Dlog4j2.configurationFile={self.work_dir / 'log4j2.properties'}"]
        cmd += ["-cp", self._classpath, main, *args]
        return cmd

    def _format(self) -> None:
        """Lay out formatted storage in ``data_dir``.

        The storage tool runs once per Kafka version and storage-relevant config; its
        output (bootstrap metadata checkpoint) is kept as a template, and later brokers get
        a copy plus a fresh meta.properties (new cluster.id and directory.id): one JVM
        start fewer. ``KAFKA_BROKER_FORMAT_TEMPLATE=0`` runs the tool every time.
        """
        if os.environ.get("KAFKA_BROKER_FORMAT_TEMPLATE", "1") == "0":
            self._run_storage_tool(self.config_file)
            return
        template = self._format_template()
        meta = _read_properties(template / "meta.properties")
        if not {"cluster.id", "directory.id", "node.id"} <= meta.keys():
            self._run_storage_tool(self.config_file)  # unknown layout: do it the slow way
            return
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.copytree(template, self.data_dir, ignore=shutil.ignore_patterns("meta.properties"))
        meta["cluster.id"] = _kafka_uuid()
        meta["directory.id"] = _kafka_uuid()
        body = "".join(f"{k}={v}\n" for k, v in meta.items())
        (self.data_dir / "meta.properties").write_text("#\n" + body)

    def _format_template(self) -> Path:
        """Formatted storage for this version and config, made once in the cache."""
        per_broker = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs"}
        generic = {k: v for k, v in self._config().items() if k not in per_broker}
        key = repr((self.version, sorted(generic.items()), _java_major(_java() or "java")))
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        template = _version_dir(self.cache_dir.resolve(), self.version) / f"formatted-{digest}"
        if (template / "meta.properties").exists():
            return template
        tmp = template.with_name(f"{template.name}.{os.getpid()}.{id(self)}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = {**self._config(), "log.dirs": str(tmp / "data")}
        props = tmp / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        try:
            self._run_storage_tool(props)
            try:
                (tmp / "data").rename(template)
            except OSError:  # another process made it first
                if not (template / "meta.properties").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return template

    def _run_storage_tool(self, config_file: Path) -> None:
        assert self._classpath is not None
        cmd = self._jvm_cmd(
            _storage_tool_class(self._classpath),
            "format",
            "--ignore-formatted",
            "-t",
            _kafka_uuid(),
            "-c",
            str(config_file),
        )
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as log:
            log.write(f"===== storage format: {' '.join(cmd[-6:])}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise KafkaBrokerError(
                f"kafka storage format failed (exit {proc.returncode}), log {self.log_file}, "
                f"last {LOG_TAIL_LINES} lines:\n{self._log_tail()}"
            )

    def _launch_and_wait(self) -> None:
        self._starts += 1
        cmd = self._jvm_cmd("kafka.Kafka", str(self.config_file), dump_cds=True)
        with open(self.log_file, "ab") as log:
            log.write(f"===== broker start #{self._starts} on {self.bootstrap_servers}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig(),
            )
        try:
            self._wait_ready()
        except BaseException:
            self._terminate(signal.SIGKILL, 10.0)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self._proc is not None and self.port is not None
        # 1) cheap TCP probe (port is outside the ephemeral range: no self-connect risk)
        while True:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._fail(f"port {self.port} not open after {self.startup_timeout}s")
            time.sleep(0.02)
        # 2) a real Kafka round trip
        admin = _admin(self.bootstrap_servers)
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    break
            except KafkaException as exc:
                last = exc
            time.sleep(0.05)
        else:
            self._fail(f"no metadata from {self.bootstrap_servers} after startup: {last}")
        if self.warm_group_coordinator:
            self._warm_coordinator(admin, deadline)

    def _warm_coordinator(self, admin: AdminClient, deadline: float) -> None:
        """Make the broker create __consumer_offsets now (~0.1 s).

        Otherwise the first consumer group of a fresh broker triggers it and librdkafka
        backs off 1-3 s before asking for the coordinator again.
        """
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                fut = admin.describe_consumer_groups(["__kafka_broker_warmup"])
                fut["__kafka_broker_warmup"].result(timeout=5)
                return
            except TimeoutError:
                pass
            except KafkaException as exc:
                err = exc.args[0]
                pending = isinstance(err, KafkaError) and (
                    err.retriable() or err.code() in _COORDINATOR_PENDING
                )
                if not pending:  # e.g. GROUP_ID_NOT_FOUND: the coordinator did answer
                    return
            time.sleep(0.05)
        self._fail("group coordinator not available after startup")

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            self._fail(f"Kafka JVM exited with code {code} during startup")

    def _fail(self, why: str) -> None:
        raise KafkaBrokerError(
            f"{why}; log {self.log_file}, last {LOG_TAIL_LINES} lines:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return "(no log)"

    def _terminate(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        else:  # already dead: make sure nothing else lingers in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        dump, self._cds_dump = self._cds_dump, None
        if dump is not None:
            # only an archive written by a clean exit (not a SIGKILL mid-write) is trusted
            clean = proc.returncode in (0, 143, -signal.SIGTERM)
            if clean and dump.exists() and dump.stat().st_size:
                with contextlib.suppress(OSError):
                    dump.replace(self._cds_archive())
            with contextlib.suppress(OSError):
                dump.unlink()
