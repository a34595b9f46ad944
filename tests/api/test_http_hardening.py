"""What the public listener tells strangers and its log: secrets redacted from the access log
however they are encoded, malformed HTTP logged as one warning line."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from yarl import URL

from appservice.api.http import redact_query
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
