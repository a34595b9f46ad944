"""A loopback HTTP homeserver that speaks the federation endpoints the identity server calls.

It is a test peer for the API tests (the end-to-end tests use a real Synapse): OpenID userinfo
answers for the tokens it was given, ``POST /_matrix/federation/v1/3pid/onbind`` records what it
receives and answers from a queue of statuses (then ``200 {}``), it can be taken down (connections
refused) and brought back up on the same port, and anything else is a 404 like a homeserver's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from tests.support.loopback import LoopbackServer

ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"


class FakeHomeserver(LoopbackServer):
    """OpenID userinfo for registered tokens and onbind notifications, on 127.0.0.1."""

    def __init__(self, server_name: str = "hs.test") -> None:
        super().__init__()
        self.server_name = server_name
        self.openid_tokens: dict[str, str] = {}
        # (method, path) of every request answered.
        self.requests: list[tuple[str, str]] = []
        # When set, userinfo answers with this status (to test homeserver failures).
        self.userinfo_status: int | None = None
        # Every onbind body received, whatever the answer was.
        self.onbind_bodies: list[Any] = []
        # The onbind bodies answered with 2xx (what the homeserver "processed").
        self.onbind_accepted: list[Any] = []
        # Answers to the next onbind requests, consumed in order: a status (with an M_UNKNOWN
        # error body unless 2xx) or (status, body). When empty: 200 {}.
        self.onbind_statuses: list[int | tuple[int, Any]] = []
        # Seconds each onbind takes to be answered (a slow homeserver).
        self.onbind_delay_s = 0.0
        # time.monotonic() at the arrival of each onbind request.
        self.onbind_arrivals: list[float] = []
        self._changed = asyncio.Condition()

    @property
    def is_down(self) -> bool:
        """Whether it currently refuses connections."""
        return self._down

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

    async def _onbind(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        self.onbind_arrivals.append(time.monotonic())
        body = await request.json()
        if self.onbind_delay_s:
            await asyncio.sleep(self.onbind_delay_s)
        status, answer = 200, {}
        if self.onbind_statuses:
            planned = self.onbind_statuses.pop(0)
            if isinstance(planned, tuple):
                status, answer = planned
            else:
                status = planned
                if not 200 <= status < 300:
                    answer = {"errcode": "M_UNKNOWN", "error": f"planned failure {status}"}
        async with self._changed:
            self.onbind_bodies.append(body)
            if 200 <= status < 300:
                self.onbind_accepted.append(body)
            self._changed.notify_all()
        return web.json_response(answer, status=status)

    async def wait_for_onbind(self, count: int, within: float = 5.0) -> list[Any]:
        """Wait (at most ``within`` seconds) until ``count`` onbinds were accepted; return them."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.onbind_accepted) >= count)
        return list(self.onbind_accepted)

    def routes(self, app: web.Application) -> None:
        """OpenID userinfo and onbind."""
        app.router.add_get("/_matrix/federation/v1/openid/userinfo", self._userinfo)
        app.router.add_post(ONBIND_PATH, self._onbind)
