"""What the public listener tells strangers and its log: secrets redacted from the access log
however they are encoded, malformed HTTP logged as one warning line."""

from __future__ import annotations

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
