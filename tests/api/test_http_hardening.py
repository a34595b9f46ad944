"""What the public listener tells strangers and its log: secrets redacted from the access log
however they are encoded, malformed HTTP logged as one warning line."""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import pytest
from yarl import URL

from appservice.api.http import redact_query
from tests.api.test_validation import EMAIL_SUBMIT, link_from_mail, request_email
from tests.support.api_server import Api

SECRET = "s3cr3t-VALUE"


@pytest.mark.parametrize(
    ("path_qs", "logged"),
    [
        ("/p?access_token=a&x=1", "/p?access_token=<redacted>&x=1"),
        ("/p?t%6Fken=a", "/p?t%6Fken=<redacted>"),
        ("/p?client%5Fsecret=a&sid=1", "/p?client%5Fsecret=<redacted>&sid=1"),
        ("/p?client%5fsecret=a", "/p?client%5fsecret=<redacted>"),
        ("/p?CLIENT_SECRET=a", "/p?CLIENT_SECRET=<redacted>"),
        ("/p?%41ccess%5FToken=a", "/p?%41ccess%5FToken=<redacted>"),
        ("/p?id_access_token=a", "/p?id_access_token=<redacted>"),
        ("/p?token+=a", "/p?token+=<redacted>"),
        ("/p?t%256Fken=a", "/p?t%256Fken=<redacted>"),
        ("/p?x=1;token=a", "/p?x=1;token=<redacted>"),
        ("/p?sid=1&token=", "/p?sid=1&token=<redacted>"),
        ("/p?sid=1", "/p?sid=1"),
        ("/p", "/p"),
    ],
)
def test_secret_query_parameters_are_redacted_whatever_their_encoding(
    path_qs: str, logged: str
) -> None:
    assert redact_query(path_qs) == logged


async def test_access_log_of_the_listener_has_no_secret(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    host, port = await api.server.serve("127.0.0.1", 0)
    base = f"http://{host}:{port}/_matrix/identity/v2/validate/email/submitToken"
    queries = [
        f"sid=1&client%5Fsecret={SECRET}&t%6Fken={SECRET}",
        f"sid=1&Client_Secret={SECRET}&TOKEN={SECRET}",
        f"access%5ftoken={SECRET}&sid=1&client_secret=x%20{SECRET}+{SECRET}",
    ]
    async with aiohttp.ClientSession() as session:
        for query in queries:
            async with session.get(URL(f"{base}?{query}", encoded=True)) as resp:
                await resp.read()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) == len(queries)
    assert all("submitToken" in line and "<redacted>" in line for line in lines)
    assert not [line for line in lines if "s3cr3t" in line.lower()]


async def test_wrong_method_is_405_unrecognized_with_allow(api: Api) -> None:
    async with api.client.delete("/_matrix/identity/v2/terms") as resp:
        assert resp.status == 405
        assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"
        assert resp.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
    async with api.client.get("/_matrix/identity/v2/account/register") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "OPTIONS, POST"


PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _csp(header: str) -> dict[str, str]:
    directives = (d.strip().split(None, 1) for d in header.split(";") if d.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


async def test_validation_pages_forbid_scripts_frames_and_referrers(api: Api) -> None:
    _, token = await api.register()
    await request_email(api, token)
    await api.smtp.wait_for(1)
    good = link_from_mail(api)
    for params, status in ((dict(good, token="wrong"), 400), (good, 200), ({"sid": "1"}, 400)):
        async with api.client.get(EMAIL_SUBMIT, params=params, allow_redirects=False) as resp:
            assert resp.status == status
            assert resp.content_type == "text/html"
            assert {k: resp.headers.get(k) for k in PAGE_HEADERS} == PAGE_HEADERS
            assert _csp(resp.headers["Content-Security-Policy"]) == {
                "default-src": "'none'",
                "style-src": "'unsafe-inline'",
                "img-src": "data:",
                "frame-ancestors": "'none'",
                "form-action": "'none'",
                "base-uri": "'none'",
            }
            page = await resp.text()
        # What the built-in templates need is allowed: one inline <style> element, nothing
        # loaded, no script, no style attribute.
        assert page.count("<style>") == 1
        assert not re.search(r"<script|<link|<img|<iframe|<form|\sstyle=|\ssrc=|\shref=", page)


async def _send_raw(host: str, port: int, *requests: bytes) -> bytes:
    """Send each request on one connection, the next once the previous one is answered; the
    last answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests[:-1]:
            writer.write(request)
            await writer.drain()
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(
                b"HTTP/1.1 200 "
            )
            # The body of the answer (GET /health: a small JSON object).
            await asyncio.wait_for(reader.readuntil(b"}}"), 10)
        writer.write(requests[-1])
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"GARBAGE\r\n\r\n", "Invalid method encountered: b'GARBAGE'"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", "Invalid header token:"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "Invalid character in Content-Length: b'Content-Length: -1'",
        ),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", "Invalid char in url path: b'GET /\\x01 HTTP/1.1'"),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", "Got more than"),
    ],
)
async def test_malformed_request_is_one_warning_line_with_peer_and_reason(
    api: Api, caplog: pytest.LogCaptureFixture, request_bytes: bytes, reason: str
) -> None:
    host, port = await api.server.serve("127.0.0.1", 0)
    # Warnings and worse only: the access log's INFO lines, if an earlier test left its logger
    # at INFO, are not what is checked here.
    caplog.set_level(logging.WARNING)
    # As a connection's first request and after a good one (aiohttp treats them apart).
    for requests in ((request_bytes,), (HEALTH, request_bytes)):
        caplog.clear()
        answer = await _send_raw(host, port, *requests)
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        if requests == (b"GARBAGE\r\n\r\n",):
            # aiohttp logs a first request that is not HTTP at all at DEBUG only.
            assert records == []
            continue
        [record] = records
        assert record.levelno == logging.WARNING
        assert record.exc_info is None and record.exc_text is None
        message = record.getMessage()
        assert message.startswith("malformed HTTP request from 127.0.0.1: ")
        assert reason in message
        assert "\n" not in message and len(message) < 300
        assert caplog.text.count("\n") == 1  # no traceback either


REGISTER_HEAD = b"POST /_matrix/identity/v2/account/register HTTP/1.1\r\nHost: x\r\n"


async def test_undecodable_body_is_400_and_one_warning_line(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = await api.server.serve("127.0.0.1", 0)
    answer = await _send_raw(
        host,
        port,
        REGISTER_HEAD
        + b"Connection: close\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nabcde",
    )
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b'{"errcode":"M_UNKNOWN","error":"Malformed request body"}')
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == (
        "malformed HTTP request body from 127.0.0.1: Can not decode content-encoding: gzip"
    )


async def test_client_leaving_mid_body_is_one_info_line(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appservice.api.http")
    host, port = await api.server.serve("127.0.0.1", 0)
    for cut in (
        b"Content-Length: 100\r\n\r\n{",
        # A broken chunk after a good one: aiohttp stops the body there and waits.
        b"Transfer-Encoding: chunked\r\n\r\n3\r\n{ }\r\n",
    ):
        caplog.clear()
        _, writer = await asyncio.open_connection(host, port)
        writer.write(REGISTER_HEAD + cut)
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is reading the body
        if b"chunked" in cut:
            writer.write(b"zz\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.02)
        [record] = [r for r in caplog.records if r.name != "aiohttp.access"]
        assert (record.levelno, record.exc_info) == (logging.INFO, None)
        assert record.getMessage() == (
            "127.0.0.1 closed the connection during POST /_matrix/identity/v2/account/register"
        )
