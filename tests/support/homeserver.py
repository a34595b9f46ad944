"""A loopback HTTP homeserver that speaks the federation endpoints the identity server calls.

It is a test peer for the API tests (the end-to-end tests use a real Synapse): OpenID userinfo
answers for the tokens it was given, anything else is a 404 like a homeserver's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class FakeHomeserver:
    """``GET /_matrix/federation/v1/openid/userinfo`` on 127.0.0.1, for registered tokens."""

    def __init__(self, server_name: str = "hs.test") -> None:
        self.server_name = server_name
        self.openid_tokens: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        # When set, userinfo answers with this status (to test homeserver failures).
        self.userinfo_status: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"

    def issue_openid_token(self, user_id: str, token: str) -> dict[str, Any]:
        """Make ``token`` valid for ``user_id``; returns the OpenIdCredentials body."""
        self.openid_tokens[token] = user_id
        return {
            "access_token": token,
            "token_type": "Bearer",
            "matrix_server_name": self.server_name,
            "expires_in": 3600,
        }

    async def _userinfo(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if self.userinfo_status is not None:
            return web.json_response(
                {"errcode": "M_UNKNOWN", "error": "broken"}, status=self.userinfo_status
            )
        user_id = self.openid_tokens.get(request.query.get("access_token", ""))
        if user_id is None:
            return web.json_response(
                {"errcode": "M_UNKNOWN_TOKEN", "error": "Access Token unknown or expired"},
                status=401,
            )
        return web.json_response({"sub": user_id})

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_get("/_matrix/federation/v1/openid/userinfo", self._userinfo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
