"""The validation link from a real email, opened in a real browser (headless Chromium).

The identity server runs behind aiohttp's test server on 127.0.0.1 (plain HTTP); the mail goes
through the loopback SMTP sink; Chromium loads the link once and leaves a screenshot in the
artifacts directory (``TEST_ARTIFACTS``, default ``test-artifacts/``) for people to look at:
``validation_success.png`` and ``validation_failure.png``.

Nothing here is skipped: without Chromium (``scripts/ensure-chromium.sh`` installs it) the
tests fail and say why.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from tests.api.test_validation import EMAIL_SUBMIT, request_email
from tests.support.api_server import Api
from tests.support.browser import render_page

# Browser runs are slow and database-independent: SQLite only.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

LINK = re.compile(r"https://id\.test(/_matrix/identity/v2/validate/email/submitToken\?\S+)")


async def _mailed_link(api: Api) -> tuple[str, dict[str, str]]:
    """Ask for an email validation and read the link from the mail the SMTP sink received.

    Returns the link's path and query exactly as mailed, and its parsed parameters.
    """
    _, token = await api.register()
    status, body = await request_email(api, token, email="alice@example.com")
    assert status == 200, body
    [mail] = await api.smtp.wait_for(1)
    text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    match = LINK.search(text)
    assert match, text
    path_and_query = match.group(1)
    query = parse_qs(urlsplit(path_and_query).query)
    params = {key: values[0] for key, values in query.items()}
    assert params["sid"] == body["sid"]
    return path_and_query, params


def _local_url(api: Api, path_and_query: str) -> str:
    """The mailed link (``https://id.test/...``) pointed at the test server on loopback."""
    base = str(api.client.make_url("/")).rstrip("/")
    return base + path_and_query


# The pages' background (body, light or dark scheme): the inline <style> was applied, so the
# Content-Security-Policy lets the built-in templates render as designed.
STYLED_BACKGROUNDS = {(0xF3, 0xF4, 0xF6), (0x11, 0x18, 0x27)}


def _top_left_pixel(png: bytes) -> tuple[int, int, int]:
    """The RGB colour of a PNG's first pixel (8-bit RGB or RGBA; whatever its row's filter, the
    first pixel of the first row is stored as is)."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    bit_depth, colour_type = header[8], header[9]
    assert (bit_depth, colour_type) in {(8, 2), (8, 6)}, header
    row = zlib.decompressobj().decompress(idat, 16)
    return row[1], row[2], row[3]


def _text(dom: str) -> str:
    """The visible-ish text of a DOM: tags removed, entities decoded, whitespace collapsed."""
    no_style = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", no_style)).split())


async def test_link_from_mail_shows_success_page(api: Api, artifacts_dir: Path) -> None:
    path_and_query, params = await _mailed_link(api)
    screenshot = artifacts_dir / "validation_success.png"

    dom = await render_page(_local_url(api, path_and_query), screenshot)

    text = _text(dom)
    assert "<title>Email address verified" in dom
    assert "Email address verified" in text
    assert "your email address is verified" in text
    assert "return to your Matrix client" in text
    assert "Verification failed" not in text
    assert _top_left_pixel(screenshot.read_bytes()) in STYLED_BACKGROUNDS

    # The browser's visit really validated the session.
    _, token = await api.register()
    status, body = await api.request(
        "GET",
        "/_matrix/identity/v2/3pid/getValidated3pid?"
        + urlencode({"sid": params["sid"], "client_secret": params["client_secret"]}),
        token=token,
    )
    assert status == 200, body
    assert body["address"] == "alice@example.com"


async def test_wrong_token_shows_failure_page(api: Api, artifacts_dir: Path) -> None:
    _, params = await _mailed_link(api)
    bad = dict(params, token="wrong")
    url = str(api.client.make_url(EMAIL_SUBMIT)) + "?" + urlencode(bad)
    screenshot = artifacts_dir / "validation_failure.png"

    dom = await render_page(url, screenshot)

    text = _text(dom)
    assert "<title>Verification failed" in dom
    assert "Verification failed" in text
    assert "The token is incorrect" in text
    assert "ask for a new verification email" in text
    assert "Email address verified" not in text
    assert _top_left_pixel(screenshot.read_bytes()) in STYLED_BACKGROUNDS
