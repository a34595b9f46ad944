"""Where the email link may send a browser after validation (issue 14: no open redirect beyond
what the operator allows), and next_link input checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appservice.config import ConfigError, load_config_text
from tests.api.test_validation import EMAIL_REQUEST, EMAIL_SUBMIT, link_from_mail
from tests.support.api_server import Api


async def request_with_next_link(api: Api, token: str, next_link: str) -> tuple[int, Any]:
    """requestToken for a new email session with ``next_link``."""
    return await api.request(
        "POST",
        EMAIL_REQUEST,
        token=token,
        json={
            "client_secret": "s3cret",
            "email": "a@example.com",
            "send_attempt": 1,
            "next_link": next_link,
        },
    )


async def redirect_after_validation(api: Api, next_link: str) -> str | None:
    """Validate a fresh session with ``next_link`` by its email link; where it redirects."""
    _, token = await api.register()
    status, body = await request_with_next_link(api, token, next_link)
    assert status == 200, body
    await api.smtp.wait_for(1)
    link = link_from_mail(api)
    async with api.client.get(EMAIL_SUBMIT, params=link, allow_redirects=False) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "*"  # on every response
        if resp.status == 302:
            return resp.headers["Location"]
        assert resp.status == 200
        assert next_link not in await resp.text()
        return None


class TestHostAllowList:
    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "session: {next_link_hosts: [app.element.io, '*.example.org'],"
            " next_link_allowlist: ['http://localhost:3000/']}"
        )

    @pytest.mark.parametrize(
        ("next_link", "followed"),
        [
            ("https://app.element.io/#/room/!a:b", True),
            ("https://APP.Element.io./welcome", True),
            ("https://app.element.io:8443/x", True),
            ("https://chat.example.org/done", True),
            ("https://a.b.example.org/", True),
            ("http://localhost:3000/done", True),  # a prefix of next_link_allowlist
            ("https://example.org/", False),  # "*.example.org" is subdomains only
            ("https://evil.example/phish", False),
            ("https://app.element.io.evil.example/", False),
            ("https://evilexample.org/", False),
            ("https://app.element.io@evil.example/", False),  # user info: the host is evil
            ("https://evil.example\\@app.element.io/", False),  # browsers read evil.example
            ("https://evil.example\\.app.element.io/", False),
            ("https://app.element.io:notaport/", False),
            ("http://app.element.io/", False),
            ("http://localhost:3000.evil.example/", False),
            ("javascript:alert(1)", False),
            ("//app.element.io/", False),
        ],
    )
    async def test_only_listed_hosts_are_followed(
        self, api: Api, next_link: str, followed: bool
    ) -> None:
        location = await redirect_after_validation(api, next_link)
        # (aiohttp's client lower-cases the host it reads from Location.)
        assert (location or "").lower() == (next_link.lower() if followed else "")


class TestDefault:
    @pytest.mark.parametrize(
        ("next_link", "followed"),
        [
            # Documented: without next_link_hosts any plain https:// URL is followed.
            ("https://anything.example/welcome", True),
            ("https://good.example@evil.example/", False),
            ("https://evil.example\\@good.example/", False),
            ("http://anything.example/", False),
        ],
    )
    async def test_any_plain_https_url_is_followed(
        self, api: Api, next_link: str, followed: bool
    ) -> None:
        location = await redirect_after_validation(api, next_link)
        assert location == (next_link if followed else None)

    @pytest.mark.parametrize(
        "next_link", ["https://x.example/" + "a" * 2100, "https://x.example/\r\nSet-Cookie: a=b"]
    )
    async def test_request_token_refuses_an_unusable_next_link(
        self, api: Api, next_link: str
    ) -> None:
        _, token = await api.register()
        status, body = await request_with_next_link(api, token, next_link)
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
        assert api.smtp.mails == []


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("session: {next_link_hosts: ['Bad Host']}", "session.next_link_hosts[0]"),
        ("session: {next_link_hosts: ['https://app.example']}", "session.next_link_hosts[0]"),
        ("session: {next_link_hosts: ['*example.org']}", "session.next_link_hosts[0]"),
        ("session: {next_link_allowlist: ['http://localhost:3000']}", "next_link_allowlist[0]"),
        ("session: {next_link_allowlist: ['localhost/']}", "next_link_allowlist[0]"),
    ],
)
def test_config_refuses_loose_next_link_rules(tmp_path: Path, yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config_text(yaml_text, tmp_path, environ={})
