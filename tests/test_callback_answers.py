"""What the HTTP callback backend does with a receiver's answer: it reads a few KiB at most,
never decompresses, drops the connection instead of draining the rest, and quotes a short,
printable excerpt of a non-2xx answer in `delivery_error`.

The memory tests run the notifier as a real OS process (`downloader notifier`) against hostile
receivers on loopback, and compare its resident memory before and after (/proc/<pid>/status)."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from downloader.backends.http import ANSWER_READ_BYTES, EXCERPT_CHARS, answer_excerpt
from downloader.config import Config
from harness.servers import CallbackReceiver, FileServer, _Server, job_request
from tests.conftest import Proc, Service

MakeConfig = Callable[..., tuple[Path, Config]]
ServiceFactory = Callable[..., Any]
Spawn = Callable[..., Proc]

MIB = 1024 * 1024
GIB = 1024 * MIB
HUGE_BYTES = GIB
"""The size of a hostile answer's body, and of what the gzip bomb inflates to."""
RSS_GROWTH_BOUND = 64 * MIB
"""How much the notifier's peak resident memory may grow over one hostile answer."""
_ZEROS = bytes(MIB)


@cache
def _bomb_parts() -> tuple[bytes, bytes, bytes]:
    """(gzip header, one deflate piece that inflates to 1 MiB of zeros, the final block).

    A full flush resets the compressor, so every piece after one is byte for byte the same:
    the bomb is the header, the piece repeated, the final block and the trailer."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(_ZEROS) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(_ZEROS) + deflate.flush(zlib.Z_FULL_FLUSH) == piece
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, mtime 0, unix
    return header, piece, deflate.flush()


@cache
def _zeros_crc32(mib: int) -> int:
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(_ZEROS, crc)
    return crc


def gzip_bomb(inflated_mib: int) -> tuple[int, Iterator[bytes]]:
    """A valid gzip stream of `inflated_mib` MiB of zeros, ~1 KiB per MiB: (its size in bytes,
    its chunks). Generated as it is sent; never held in memory whole."""
    header, piece, final = _bomb_parts()
    trailer = struct.pack("<II", _zeros_crc32(inflated_mib), (inflated_mib * MIB) & 0xFFFFFFFF)
    size = len(header) + inflated_mib * len(piece) + len(final) + len(trailer)

    def chunks() -> Iterator[bytes]:
        yield header
        batch = piece * 64
        for _ in range(inflated_mib // 64):
            yield batch
        yield piece * (inflated_mib % 64)
        yield final + trailer

    return size, chunks()


def filler(size: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """`size` bytes of text ("xxx..."), `chunk` at a time, from one buffer."""
    block = b"x" * chunk
    for _ in range(size // chunk):
        yield block
    yield block[: size % chunk]


class HostileReceiver(_Server):
    """A callback receiver whose answers a tenant chose to hurt the notifier. Paths:
    `/huge` 200 with a HUGE_BYTES body, `/bomb` 200 with a gzip bomb (Content-Encoding: gzip)
    inflating to HUGE_BYTES, `/huge500` 500 with a HUGE_BYTES body, `/text500` 500 with a short
    text holding control characters, `/stall200` and `/stall503` the status and the start of a
    body, then nothing until `close`. Bodies are generated as they are sent.

    `sent` counts the body bytes written per path, `finished` the answers sent to their end
    (a notifier that drops the connection early finishes none)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []
        self.sent: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.request_headers: list[dict[str, str]] = []
        self._closing = asyncio.Event()

    async def start(self) -> HostileReceiver:
        app = web.Application()
        app.router.add_post("/{kind}", self._handle)
        await self._start(app)
        return self

    async def close(self) -> None:
        self._closing.set()
        await super().close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        self.received.append(json.loads(await request.read()))
        self.request_headers.append(dict(request.headers))
        if kind in ("stall200", "stall503"):
            resp = web.StreamResponse(status=int(kind[-3:]))
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b"maintenance until 14:00")
            await self._closing.wait()
            return resp
        if kind == "text500":
            text = "database\r\nis down\x1b[31m\u202e " + "y" * 4 * ANSWER_READ_BYTES
            return web.Response(status=500, text=text)
        status = 500 if kind == "huge500" else 200
        headers = {"Content-Type": "text/plain"}
        if kind == "bomb":
            size, chunks = gzip_bomb(HUGE_BYTES // MIB)
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        else:
            size, chunks = HUGE_BYTES, filler(HUGE_BYTES)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = size
        await resp.prepare(request)
        try:
            for chunk in chunks:
                await resp.write(chunk)
                self.sent[kind] += len(chunk)
            await resp.write_eof()
        except ConnectionError:
            return resp  # the notifier hung up: what it did not read was never sent
        self.finished[kind] += 1
        return resp


@pytest.fixture
async def hostile() -> AsyncIterator[HostileReceiver]:
    server = await HostileReceiver().start()
    yield server
    await server.close()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak resident) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# -- the excerpt ---------------------------------------------------------------------------------


def test_excerpt_is_one_printable_line_of_bounded_length() -> None:
    """Control, format and separator characters become spaces, blanks collapse, and a long
    answer is cut to EXCERPT_CHARS characters ending in '...'."""
    head = b"  oops\r\nX-Injected: 1\x00\x1b[2J\xe2\x80\xae\xe2\x80\xa8 " + b"z" * 1000
    text = answer_excerpt(head)
    assert text.startswith("oops X-Injected: 1 [2J z")
    assert text.endswith("...") and len(text) == EXCERPT_CHARS
    assert text.isprintable()


def test_excerpt_of_undecodable_or_compressed_answers() -> None:
    """Bytes that are not UTF-8 come out as the replacement character; a compressed answer is
    not quoted at all."""
    assert answer_excerpt(b"bad \xff\xfe byte") == "bad \ufffd\ufffd byte"
    assert answer_excerpt(b"\x1f\x8b\x08\x00", "gzip") == ""
    assert answer_excerpt(b"plain", " Identity ") == "plain"
    assert answer_excerpt(b"\r\n\t ") == ""


# -- a live receiver, in process -----------------------------------------------------------------


async def test_non_2xx_answer_is_quoted_printable_and_short(
    service: Service, files: FileServer, hostile: HostileReceiver
) -> None:
    """A 500 whose text holds CR/LF, an escape sequence and a bidi override is recorded as
    `Received status code 500: <excerpt>`, one printable line of at most EXCERPT_CHARS."""
    url = files.add("/t.txt", b"text\n")
    job_id = await service.submit(**job_request(url, hostile.url("/text500")))
    job = await service.wait_job(job_id, lambda j: j["delivery_error"] != "")
    error = job["delivery_error"]
    prefix = "Received status code 500: "
    assert error.startswith(prefix + "database is down [31m y"), error
    assert error.isprintable() and error.endswith("...")
    assert len(error) == len(prefix) + EXCERPT_CHARS


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("path", "state", "error"),
    [
        ("/stall200", "Success", ""),
        ("/stall503", "Pending", "Received status code 503: maintenance until 14:00"),
    ],
    ids=["2xx", "503"],
)
async def test_answer_whose_body_stalls_is_recorded_by_its_status(
    service_factory: ServiceFactory,
    files: FileServer,
    hostile: HostileReceiver,
    path: str,
    state: str,
    error: str,
) -> None:
    """A receiver that sends its status and part of a body, then nothing, is recorded by that
    status (a 2xx delivered, a 503 a retry quoting what came), not as an answer that never
    came: the body of a 2xx is not waited for, that of a non-2xx only for the excerpt."""
    svc: Service = await service_factory(
        {
            "backends": {"http": {"timeout": 60}},
            "notifier": {"retry_schedule_seconds": [3600]},
        }
    )
    job_id = await svc.submit(**job_request(files.add("/s.txt", b"s\n"), hostile.url(path)))
    job = await svc.wait_job(
        job_id,
        lambda j: j["callback_state"] == "Success" or j["delivery_error"] != "",
        timeout=90,
    )
    assert (job["callback_state"], job["delivery_error"]) == (state, error), job
    assert job["callback_attempts"] == 1


async def test_callbacks_ask_for_no_compression(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """The notifier asks receivers for an uncompressed answer (Accept-Encoding: identity)."""
    job_id = await service.submit(**job_request(files.add("/i.txt", b"i\n"), receiver.url("/c")))
    await receiver.wait_for(job_id)
    assert receiver.headers[-1]["Accept-Encoding"] == "identity"


# -- a hostile receiver and a real notifier process ----------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("path", "recorded"),
    [
        ("/huge", "delivered"),
        ("/bomb", "delivered"),
        ("/huge500", "retry"),
    ],
)
async def test_hostile_answer_leaves_notifier_memory_bounded(
    path: str,
    recorded: str,
    make_config: MakeConfig,
    service_factory: ServiceFactory,
    spawn: Spawn,
    files: FileServer,
    receiver: CallbackReceiver,
    hostile: HostileReceiver,
) -> None:
    """A receiver answering with a 1 GiB body, a gzip bomb of 1 GiB or a 500 with a 1 GiB body
    has its callback recorded as for any answer (delivered on 2xx, a retry on 500) while the
    notifier process's peak resident memory grows by less than RSS_GROWTH_BOUND, and the answer
    is never read to its end."""
    patch = {
        # a timeout long enough to read a whole GiB: the bound must come from reading less
        "backends": {"http": {"timeout": 120}},
        "notifier": {"retry_schedule_seconds": [3600]},
    }
    config_path, _config = make_config(patch)
    svc: Service = await service_factory(patch, {"api", "processor"})
    notifier = spawn("notifier", config_path)
    assert notifier.popen is not None
    pid = notifier.popen.pid

    # warm up: one ordinary callback, so the process has delivered before we measure
    url = files.add("/warm.txt", b"warm\n")
    warm = await svc.submit(**job_request(url, receiver.url("/warm")))
    await svc.wait_job(warm, lambda j: j["callback_state"] == "Success", timeout=60)
    before = memory_kib(pid)

    job_id = await svc.submit(**job_request(files.add("/h.txt", b"h\n"), hostile.url(path)))
    job = await svc.wait_job(
        job_id,
        lambda j: j["callback_state"] == "Success" or j["delivery_error"] != "",
        timeout=150,
    )
    after = memory_kib(pid)
    growth_kib = after["VmHWM"] - before["VmRSS"]
    print(f"\nnotifier {path}: before {before} KiB, after {after} KiB, growth {growth_kib} KiB")
    assert growth_kib * 1024 < RSS_GROWTH_BOUND, (before, after)

    if recorded == "delivered":
        assert (job["callback_state"], job["delivery_error"]) == ("Success", ""), job
    else:
        _status, body = await svc.get(f"/jobs/{job_id}/events")
        types = [e["type"] for e in body["events"]]
        assert types[-2:] == ["callback.attempted", "callback.retry_scheduled"], types
        assert job["callback_state"] == "Pending", job
        assert job["delivery_error"].startswith("Received status code 500: xxx"), job
        assert len(job["delivery_error"]) < 300
    assert len(hostile.received) == 1
    if path != "/bomb":  # the bomb is small enough to fit in the sockets' buffers
        assert hostile.finished[path.lstrip("/")] == 0
