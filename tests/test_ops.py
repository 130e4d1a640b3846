"""ops/: the compose stack, the image, the systemd units and the nginx configs, checked without a
Docker engine or a running systemd: the files parse, every command is a real `downloader`
subcommand, every config loads through `downloader check` with the environment its service gets,
and users, paths and ports line up. nginx and systemd's own checkers run where installed."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from downloader.cli import _exposure_problem, _is_loopback
from downloader.config import Config, load_config
from downloader.filestore import FileStore
from harness.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
UNITS = sorted((OPS / "systemd").glob("*.service"))
JOB_ID = "Bq3NwYf0ZpJ8xT"


# -- reading the files ---------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A checker on PATH (nginx, systemd-analyze, systemd-sysusers). A developer's machine may
    lack one and the static checks still run; under CI (.ci/run installs them) a missing one
    fails the test instead of quietly checking less."""
    path = shutil.which(name)
    if path is None and os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; .ci/run installs it")
    return path


def compose() -> dict[str, Any]:
    data = yaml.safe_load((OPS / "docker-compose.yml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def downloader_services() -> dict[str, dict[str, Any]]:
    """The compose services built from our image (the others run stock images)."""
    services = {n: s for n, s in compose()["services"].items() if "build" in s}
    assert set(services) == {"api", "processor", "notifier"}
    return services


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment:` as the container sees it (compose turns scalars to strings)."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment: as a mapping"
    return {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in env.items()}


def mounted_file(service: dict[str, Any], target: str) -> Path:
    """The local file a service bind-mounts at `target` (sources are relative to ops/)."""
    for volume in service.get("volumes", []):
        source, dest = volume.split(":")[:2]
        if dest == target:
            assert source.startswith("./"), f"{target} is a bind mount of a file in ops/"
            return Path(OPS / str(source))
    raise AssertionError(f"nothing is mounted at {target}")


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> where the service mounts it."""
    mounts = (v.split(":")[:2] for v in service.get("volumes", []))
    return {source: dest for source, dest in mounts if not source.startswith(("./", "/"))}


def config_arg(command: list[str]) -> str:
    return command[command.index("-c") + 1]


def effective_config(service: dict[str, Any]) -> Config:
    path = mounted_file(service, config_arg(service["command"]))
    return load_config(path, environ=service_env(service))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, with no DOWNLOADER__ variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOWNLOADER__")}
    return subprocess.run(
        [sys.executable, "-m", "downloader", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def assert_real_command(argv: list[str]) -> None:
    """argv[1] is a downloader subcommand and every option after it is one it takes."""
    result = cli(argv[1], "--help")
    assert result.returncode == 0, f"`downloader {argv[1]}` is not a subcommand: {result.stderr}"
    for option in (a for a in argv[2:] if a.startswith("-")):
        assert re.search(rf"(^|[\s,]){re.escape(option)}\b", result.stdout), (argv, option)


def seconds(duration: str) -> float:
    """A compose or systemd duration such as `30s`, `1m30s` or `30`."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|min)?", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), duration
    scale = {"ms": 0.001, "": 1, "s": 1, "m": 60, "min": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [
        line for line in (OPS / "Dockerfile").read_text().splitlines() if not line.startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines())
        if parts
    ]


def image_dirs(user: str) -> dict[str, int]:
    """Directories the image creates with `install -d -o <user>`, with their modes."""
    dirs: dict[str, int] = {}
    for kind, arg in dockerfile():
        if kind != "RUN":
            continue
        for step in arg.split("&&"):
            words = shlex.split(step)
            if words[:1] != ["install"] or "-d" not in words:
                continue
            opts: dict[str, str] = {}
            paths = []
            rest = iter(words[1:])
            for word in rest:
                if word in ("-o", "-g", "-m"):
                    opts[word] = next(rest)
                elif word.startswith("/"):
                    paths.append(word)
            if opts.get("-o") == user:
                dirs.update(dict.fromkeys(paths, int(opts.get("-m", "0755"), 8)))
    return dirs


def nginx_conf(path: Path) -> dict[str, Any]:
    """The few directives of a small nginx server block that the stack depends on."""
    text = path.read_text()
    return {
        "listen": re.findall(r"^\s*listen\s+([^;]+);", text, re.M),
        "aliases": dict(re.findall(r"location\s+(/\S*)\s*\{[^{}]*?alias\s+([^;]+);", text)),
        "proxy_pass": re.findall(r"proxy_pass\s+([^;]+);", text),
    }


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def readme_venv() -> str:
    """The venv the README's Deploying steps create."""
    text = (ROOT / "README.md").read_text()
    deploying = text[text.index("## Deploying") :]
    match = re.search(r"python3 -m venv (\S+)", deploying)
    assert match, "the README's Deploying section creates a venv"
    return match.group(1)


def sysusers() -> dict[str, str]:
    """User name -> home directory, from the shipped sysusers.d file (`u NAME ID GECOS HOME`)."""
    users = {}
    for line in (OPS / "systemd" / "downloader.sysusers").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["u"]:
            users[words[1]] = words[4] if len(words) > 4 else "/"
    return users


def under(path: str, roots: list[str]) -> bool:
    return any(Path(path) == Path(r) or Path(r) in Path(path).parents for r in roots)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Any]:
    """Runs a shipped nginx server block on a loopback port, its file store in tmp_path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(conf: Path, alias: str) -> tuple[str, Path]:
        port = free_port()
        root = tmp_path / "files"
        root.mkdir()
        text = re.sub(r"listen\s+80;", f"listen 127.0.0.1:{port};", conf.read_text())
        (tmp_path / "server.conf").write_text(text.replace(alias, f"{root}/"))
        temp = " ".join(
            f"{k}_temp_path {tmp_path / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi")
        )
        (tmp_path / "nginx.conf").write_text(
            # as root, nginx's workers would run as nobody, who cannot enter pytest's tmp_path
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"pid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\n"
            f"http {{ access_log off; {temp} scgi_temp_path {tmp_path / 'scgi'};\n"
            f"  include {tmp_path / 'server.conf'}; }}\n"
        )
        args = ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen([*args, "-g", "daemon off;"]))
        return f"http://127.0.0.1:{port}", root

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


async def serves_store(start: Any, conf: Path, alias: str, url_path: str) -> None:
    """With nginx on PATH: run `conf` and fetch a stored file at `url_path` (a download_url's
    path): the bytes come back opaque and nosniff, and temporary files stay hidden."""
    if tool("nginx") is None:
        return
    origin, root = start(conf, alias)
    await wait_http(f"{origin}{url_path}/")  # 403 (no index) once nginx is up
    store = FileStore(root, origin + url_path)
    store.path(JOB_ID).parent.mkdir()
    store.path(JOB_ID).write_bytes(b"<script>alert(1)</script>")
    (store.tmp_dir / JOB_ID).write_bytes(b"partial")
    async with aiohttp.ClientSession() as session:
        async with session.get(store.url(JOB_ID)) as response:
            assert response.status == 200
            assert await response.read() == b"<script>alert(1)</script>"
            assert response.content_type == "application/octet-stream"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with session.get(f"{origin}{url_path}/.tmp/{JOB_ID}") as response:
            assert response.status == 404


# -- docker compose ------------------------------------------------------------------------------


def test_compose_services_run_real_downloader_subcommands() -> None:
    """Every service built from our image runs `downloader <role>` with options that role takes."""
    for name, service in downloader_services().items():
        command = service["command"]
        assert command[:2] == ["downloader", name], name
        assert_real_command(command)


def test_compose_configs_load_through_the_cli() -> None:
    """Each service's mounted config, with that service's DOWNLOADER__ env, passes `check`."""
    for name, service in downloader_services().items():
        path = mounted_file(service, config_arg(service["command"]))
        result = cli("check", "-c", str(path), env=service_env(service))
        assert result.returncode == 0, (name, result.stderr)
    # the same run refuses a bad override, so the env really reaches the check
    api = downloader_services()["api"]
    path = mounted_file(api, config_arg(api["command"]))
    bad = cli("check", "-c", str(path), env={**service_env(api), "DOWNLOADER__API__NOPE": "1"})
    assert bad.returncode == 2 and "api.nope" in bad.stderr


def test_production_config_loads_through_the_cli(tmp_path: Path) -> None:
    """ops/config.production.json passes `downloader check` alone; an unknown key in it fails."""
    path = OPS / "config.production.json"
    assert cli("check", "-c", str(path)).returncode == 0
    broken = tmp_path / "config.json"
    broken.write_text(path.read_text().replace('"processor": {', '"processor": {"nope": 1,'))
    result = cli("check", "-c", str(broken))
    assert result.returncode == 2 and "processor.nope" in result.stderr


def test_compose_api_listens_on_the_network_only_with_a_token() -> None:
    """The compose api listens beyond loopback (`--host 0.0.0.0`), which it may do only because
    its environment gives it a token; the shared config file alone keeps to loopback."""
    api = downloader_services()["api"]
    command = api["command"]
    host = command[command.index("--host") + 1]
    config = effective_config(api)
    assert not _is_loopback(host) and config.api.tokens
    assert _exposure_problem(host, config) is None
    bare = load_config(mounted_file(api, config_arg(command)), environ={})
    assert _exposure_problem(host, bare) is not None, "without the env it would be refused"
    assert _is_loopback(bare.api.host)


def test_prometheus_scrapes_every_replica_on_the_configured_ports() -> None:
    """Prometheus finds every container of each role by DNS, on the port its config serves."""
    prometheus = yaml.safe_load((OPS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for name, service in downloader_services().items():
        config = effective_config(service)
        port = config.api.port if name == "api" else getattr(config, name).metrics_port
        assert port, f"{name} serves metrics"
        job = jobs[f"downloader-{name}"]
        if name != "api":  # Prometheus runs in another container
            assert getattr(config, name).metrics_host == "0.0.0.0", name
        assert "static_configs" not in job, "a static target reaches one replica per scrape"
        assert job["dns_sd_configs"] == [{"names": [name], "type": "A", "port": port}]
        if name == "api":
            assert job["authorization"]["type"] == "Bearer"
            assert job["authorization"]["credentials"] in config.api.tokens
    assert prometheus.get("global", {}).keys() <= {"scrape_interval", "scrape_timeout"}


async def test_compose_download_url_is_served_by_the_file_server(
    tmp_path: Path, nginx: Any
) -> None:
    """A stored file's download_url maps, through the published port and the nginx alias, to the
    volume the processors write it to."""
    services = compose()["services"]
    processor = services["processor"]
    config = effective_config(processor)
    url = urlsplit(FileStore(tmp_path, config.processor.download_url).url(JOB_ID))
    assert url.hostname == "localhost" and url.port, "a caller on the Docker host reaches it"
    servers = [s for s in services.values() if f"{url.port}:80" in s.get("ports", [])]
    assert len(servers) == 1, f"one service publishes port {url.port}"
    server = servers[0]
    conf = nginx_conf(mounted_file(server, "/etc/nginx/conf.d/default.conf"))
    assert conf["listen"] == ["80"]
    prefix, alias = next((p, a) for p, a in conf["aliases"].items() if url.path.startswith(p))
    served = Path(alias) / url.path[len(prefix) :]
    volume = next(v for v, dest in named_volumes(server).items() if Path(alias) == Path(dest))
    assert f"{volume}:{alias.rstrip('/')}:ro" in server["volumes"], "read-only"
    assert named_volumes(processor)[volume] == config.processor.storage_dir
    stored = FileStore(config.processor.storage_dir, "").path(JOB_ID)
    assert served.relative_to(alias) == stored.relative_to(config.processor.storage_dir)
    assert "processor" in server.get("depends_on", []), "processors mount the new volume first"
    conf_path = mounted_file(server, "/etc/nginx/conf.d/default.conf")
    await serves_store(nginx, conf_path, alias, prefix.rstrip("/"))


def test_compose_grace_periods_limits_and_healthchecks_match_the_configs() -> None:
    """Compose waits longer than each role's shutdown grace, lifts the fd limit, and health-checks
    each role on the port its config sets."""
    for name, service in downloader_services().items():
        config = effective_config(service)
        grace = getattr(config, name).shutdown_grace_seconds if name != "api" else 0
        assert seconds(service["stop_grace_period"]) > grace + 5, name
        assert service["ulimits"]["nofile"] >= 65536, name
        port = config.api.port if name == "api" else getattr(config, name).metrics_port
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/" in probe, name
        assert service.get("restart") == "unless-stopped", name
    assert downloader_services()["processor"]["deploy"]["replicas"] >= 2


def test_image_user_owns_every_path_the_stack_writes() -> None:
    """The image runs as a dedicated user that owns each volume mount point and the heartbeat
    directory, so a fresh named volume is writable; the file store is readable by nginx."""
    instructions = dockerfile()
    user = [arg for kind, arg in instructions if kind == "USER"][-1].strip()
    assert user not in ("root", "0", "nobody"), user
    runs = " ".join(arg for kind, arg in instructions if kind == "RUN")
    assert re.search(rf"useradd [^&]*--uid \d+ [^&]*\b{user}\b", runs), "a fixed-uid user"
    assert "libmagic1" in runs
    owned = image_dirs(user)
    for name, service in downloader_services().items():
        config = effective_config(service)
        for dest in named_volumes(service).values():
            assert dest in owned, f"{name} mounts a volume at {dest}, which the image lacks"
        if name == "api":
            assert str(Path(config.api.heartbeat_path).parent) in owned
        if name == "processor":
            assert owned[config.processor.storage_dir] & 0o005 == 0o005, "others may read"


# -- systemd and nginx on a host -----------------------------------------------------------------


def test_systemd_units_run_the_cli_from_the_readme_venv(tmp_path: Path) -> None:
    """Each unit runs its role from the venv the README creates, with the production config, a
    raised fd limit and a stop timeout above the grace; systemd-analyze accepts it."""
    venv = readme_venv()
    config = load_config(OPS / "config.production.json", environ={})
    # on a host, metrics stay on loopback unless <role>.env says otherwise (README, systemd)
    assert config.processor.metrics_host == config.notifier.metrics_host == "127.0.0.1"
    assert [u.name for u in UNITS] == [
        f"downloader-{role}.service" for role in ("api", "notifier", "processor")
    ]
    readme = (ROOT / "README.md").read_text()
    for path in UNITS:
        service = unit(path)["Service"]
        argv = shlex.split(service["ExecStart"])
        role = path.stem.removeprefix("downloader-")
        assert argv[:2] == [f"{venv}/bin/downloader", role]
        assert_real_command(["downloader", *argv[1:]])
        assert f"ops/config.production.json {config_arg(argv)}" in readme, "the README installs it"
        assert int(service["LimitNOFILE"]) >= 65536
        grace = getattr(config, role).shutdown_grace_seconds if role != "api" else 0
        assert seconds(service["TimeoutStopSec"]) > grace + 5
        assert service["KillSignal"] == "SIGTERM"
    analyze = tool("systemd-analyze")
    if analyze:  # the ExecStart binary must exist: point the copies at this venv's
        here = str(Path(sys.executable).parent.parent)
        assert (Path(here) / "bin" / "downloader").exists()
        for path in UNITS:
            (tmp_path / path.name).write_text(path.read_text().replace(venv, here))
        copies = [str(tmp_path / p.name) for p in UNITS]
        result = subprocess.run(
            [analyze, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_systemd_user_and_writable_paths_are_created_by_shipped_files(tmp_path: Path) -> None:
    """Each unit's User comes from the shipped sysusers file, and every path the role writes (and
    the heartbeat file an operator creates) lies in its StateDirectory, outside the private /tmp."""
    config = load_config(OPS / "config.production.json", environ={})
    users = sysusers()
    for path in UNITS:
        service = unit(path)["Service"]
        role = path.stem.removeprefix("downloader-")
        assert service["User"] in users
        assert service["ProtectSystem"] == "strict"
        writable = [f"/var/lib/{d}" for d in service["StateDirectory"].split()]
        writable += service.get("ReadWritePaths", "").split()
        assert users[service["User"]] in writable, "the user's home is its state directory"
        writes = {"processor": [config.processor.storage_dir], "api": [], "notifier": []}[role]
        for written in [*writes, config.api.heartbeat_path]:
            assert under(written, writable), (path.name, written)
        assert service["WorkingDirectory"] in writable
    sysusers_bin = tool("systemd-sysusers")
    if sysusers_bin:  # create the users for real, in a scratch root
        (tmp_path / "etc").mkdir()
        result = subprocess.run(
            [sysusers_bin, f"--root={tmp_path}", str(OPS / "systemd" / "downloader.sysusers")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        passwd = (tmp_path / "etc" / "passwd").read_text()
        for name, home in users.items():
            assert re.search(rf"^{name}:x:\d+:\d+:[^:]*:{home}:", passwd, re.M), passwd


async def test_host_nginx_serves_the_file_store_and_proxies_the_api(nginx: Any) -> None:
    """ops/nginx/downloader.conf serves stored files at the production download_url's path as
    opaque bytes, hides temp files, and proxies the rest to the api's address."""
    config = load_config(OPS / "config.production.json", environ={})
    conf = nginx_conf(OPS / "nginx" / "downloader.conf")
    assert conf["proxy_pass"] == [f"http://{config.api.host}:{config.api.port}"]
    path = urlsplit(config.processor.download_url).path.rstrip("/")
    alias = conf["aliases"][path + "/"]
    assert alias == config.processor.storage_dir.rstrip("/") + "/"
    await serves_store(nginx, OPS / "nginx" / "downloader.conf", alias, path)


def test_readme_deploying_names_only_shipped_files() -> None:
    """Every ops/ file the README names exists, and every file in ops/ is named or used."""
    readme = (ROOT / "README.md").read_text()
    named: set[str] = set()
    for pattern in set(re.findall(r"\bops/[\w./*-]*\w", readme)):
        found = {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}
        assert found, f"the README names {pattern}, which does not exist"
        named |= found
    services = compose()["services"].values()
    used = {f"ops/{v.split(':')[0][2:]}" for s in services for v in s.get("volumes", [])}
    used |= {s["build"]["dockerfile"] for s in services if "build" in s}
    shipped = {str(p.relative_to(ROOT)) for p in OPS.rglob("*") if p.is_file()}
    assert shipped <= named | used, shipped - named - used
