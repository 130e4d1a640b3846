"""What a caller may ask the processor to send: no framing or hop-by-hop headers in
`request_headers`, and no credentials the HTTP client cannot send (refused at POST, never an
`Internal error` later)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from downloader.config import load_config
from downloader.errors import ConfigError
from harness.redis_nodes import StrRedis, data_keys
from harness.servers import CallbackReceiver, FileServer, job_request, valid_body
from tests.conftest import Service

ServiceFactory = Callable[..., Any]


body = valid_body


@pytest.fixture
async def api(service_factory: ServiceFactory) -> Service:
    """The API alone: jobs stay queued, nothing downloads them."""
    return await service_factory(None, {"api"})  # type: ignore[no-any-return]


async def refused(api: Service, redis_client: StrRedis, request: dict[str, Any]) -> Any:
    """POST `request`: it must be a 400 that stores nothing; its JSON body."""
    status, answer = await api.post("/download", request)
    assert status == 400, answer
    assert await data_keys(redis_client) == []
    return answer


# -- framing and hop-by-hop headers (finding 7) ---------------------------------------------------

FORBIDDEN = [
    ("Content-Length", "23", "frames the request"),
    ("content-length", "0", "frames the request"),
    ("Transfer-Encoding", "chunked", "frames the request"),
    ("Host", "other.example", "comes from url"),
    ("HOST", "other.example", "comes from url"),
    ("Connection", "close", "hop-by-hop"),
    ("Keep-Alive", "timeout=5", "hop-by-hop"),
    ("Proxy-Connection", "keep-alive", "hop-by-hop"),
    ("TE", "trailers", "hop-by-hop"),
    ("Trailer", "X-Sum", "hop-by-hop"),
    ("Upgrade", "websocket", "hop-by-hop"),
    ("Expect", "100-continue", "how the request is sent"),
    ("Proxy-Authorization", "Basic dTpw", "aggr_proxy"),
]


@pytest.mark.parametrize(("name", "value", "why"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
async def test_framing_and_hop_by_hop_headers_are_refused_naming_the_header(
    api: Service, redis_client: StrRedis, name: str, value: str, why: str
) -> None:
    """A request_headers entry the HTTP client owns (framing, hop-by-hop, Host, Expect, a proxy
    credential) is a 400 naming request_headers and the header, with the reason; nothing is
    stored."""
    headers = {"Accept": "image/*", name: value}
    answer = await refused(api, redis_client, body(request_headers=headers))
    assert answer["field"] == "request_headers"
    assert answer["error"].startswith(f"request_headers: {name} may not be set ("), answer
    assert why in answer["error"]


async def test_end_to_end_headers_pass(api: Service) -> None:
    """Headers that belong to the request itself stay allowed: Cookie, Authorization, Range,
    Accept-Encoding, custom ones."""
    headers = {
        "Cookie": "session=abc",
        "Authorization": "Bearer x",
        "Range": "bytes=0-",
        "Accept-Encoding": "gzip",
        "X-Tenant": 7,
    }
    status, answer = await api.post("/download", body(request_headers=headers))
    assert status == 201, answer


def test_configured_default_headers_are_checked_at_load(tmp_path: Path) -> None:
    """processor.request_headers with a framing header, a bad name or a CR/LF in a value stops
    the configuration from loading, naming the key."""
    for headers, words in (
        ({"Content-Length": "5"}, "Content-Length may not be set"),
        ({"Bad Name": "x"}, "not a valid header name"),
        ({"X-A": "a\r\nHost: b"}, "control characters"),
    ):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"processor": {"request_headers": headers}}))
        with pytest.raises(ConfigError) as err:
            load_config(path, environ={})
        assert "processor.request_headers" in str(err.value) and words in str(err.value)
    path.write_text(json.dumps({"processor": {"request_headers": {"User-Agent": "x\ty"}}}))
    assert load_config(path, environ={}).processor.request_headers == {"User-Agent": "x\ty"}


async def test_a_content_length_cannot_take_the_next_job_s_body(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """The review's attack: on one keep-alive origin, a job of one aggregation asks for
    `Content-Length: 23` so that the next request on the connection (another aggregation's job)
    is read as its body. It is refused at POST, and the other job gets its own bytes."""
    files.add("/victim.bin", b"V" * 64)
    attack = job_request(
        files.add("/attack.bin", b"A" * 64),
        receiver.url("/cb"),
        aggr_id="attacker",
        request_headers={"Content-Length": "23"},
    )
    status, answer = await service.post("/download", attack)
    assert (status, answer["field"]) == (400, "request_headers")
    victim = await service.submit(
        **job_request(files.url("/victim.bin"), receiver.url("/cb"), aggr_id="victim")
    )
    [callback] = await receiver.wait_for(victim)
    assert callback["success"] is True, callback
    stored = Path(service.config.processor.storage_dir) / victim[:3] / victim
    assert stored.read_bytes() == b"V" * 64
    assert files.count("/attack.bin") == 0


# -- credentials the HTTP client cannot send (finding 17) -----------------------------------------

TWO_CREDENTIALS = [
    pytest.param("http://user:pass@origin.test/a", "Authorization", id="user-and-password"),
    pytest.param("http://user@origin.test/a", "Authorization", id="user-only"),
    pytest.param("http://:pass@origin.test/a", "Authorization", id="password-only"),
    pytest.param("http://user:pass@origin.test/a", "authorization", id="lowercase-header"),
]


@pytest.mark.parametrize(("url", "header"), TWO_CREDENTIALS)
async def test_url_credentials_and_an_authorization_header_are_refused_together(
    api: Service, redis_client: StrRedis, url: str, header: str
) -> None:
    """A url with userinfo plus an Authorization request header (aiohttp raises ValueError,
    which ended jobs as `Internal error: ValueError`) is a 400 naming request_headers."""
    request = body(url=url, request_headers={header: "Bearer t"})
    answer = await refused(api, redis_client, request)
    assert answer["field"] == "request_headers"
    assert "Authorization cannot be combined with credentials in url" in answer["error"]


UNSENDABLE = [
    pytest.param({"url": "http://a%3Ab:pass@origin.test/x"}, "url", "':'", id="colon-in-user"),
    pytest.param({"url": "http://\u20ac:pass@origin.test/x"}, "url", "Latin-1", id="euro-user"),
    pytest.param({"url": "http://u:%E2%82%AC@origin.test/x"}, "url", "Latin-1", id="euro-pass"),
    pytest.param(
        {"aggr_proxy": "http://\u20ac:p@proxy.test:3128"}, "aggr_proxy", "Latin-1", id="proxy"
    ),
    pytest.param(
        {"aggr_proxy": "http://a%3Ab:p@proxy.test:3128"}, "aggr_proxy", "':'", id="proxy-colon"
    ),
    pytest.param(
        {"callback_dst": "http://\u20ac:p@receiver.test/cb"},
        "callback_dst",
        "Latin-1",
        id="callback",
    ),
    pytest.param({"url": "http://a\u200d.example/x"}, "url", "valid URL", id="zero-width-host"),
]


@pytest.mark.parametrize(("fields", "field", "words"), UNSENDABLE)
async def test_credentials_and_hosts_the_client_cannot_encode_are_refused(
    api: Service, redis_client: StrRedis, fields: dict[str, Any], field: str, words: str
) -> None:
    """URL credentials aiohttp cannot send as Basic auth (a ':' in the user name, characters
    outside Latin-1) and hosts it cannot encode raise ValueError at request time: each is a
    400 naming the field at POST."""
    answer = await refused(api, redis_client, body(**fields))
    assert answer["field"] == field and words in answer["error"], answer


async def test_url_credentials_with_a_configured_authorization_are_refused(
    service_factory: ServiceFactory, redis_client: StrRedis
) -> None:
    """When processor.request_headers sends an Authorization by default, credentials in url
    would collide with it in the HTTP client: a 400 naming url."""
    svc = await service_factory(
        {"processor": {"request_headers": {"Authorization": "Bearer d"}}}, {"api"}
    )
    answer = await refused(svc, redis_client, body(url="http://u:p@origin.test/a"))
    assert answer["field"] == "url" and "processor.request_headers" in answer["error"]


async def test_url_credentials_alone_are_sent_as_basic_auth(
    service: Service, files: FileServer, receiver: CallbackReceiver
) -> None:
    """The control case: Latin-1 credentials in url (no Authorization header) download, sent as
    Basic auth; a job never ends in `Internal error`."""
    url = files.add("/private.bin", b"secret bytes")
    authed = url.replace("http://", "http://us%C3%A9r:p%40ss@")
    job_id = await service.submit(**job_request(authed, receiver.url("/cb")))
    [callback] = await receiver.wait_for(job_id)
    assert callback["success"] is True, callback
    job = await service.job(job_id)
    assert "Internal error" not in json.dumps(job)
    sent = files.requests["/private.bin"][0]["Authorization"]
    assert base64.b64decode(sent.removeprefix("Basic ")) == "usér:p@ss".encode("latin-1")
