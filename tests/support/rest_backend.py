"""A loopback backend speaking the ``rest`` identity store's JSON contract, for tests.

It answers from ``mxids`` (3PID -> Matrix ID) and ``roles`` (Matrix ID -> roles), records
every request, and can be told to misbehave::

    backend = RestBackend({("email", "alice@example.org"): "@alice:example.org"})
    await backend.start()
    backend.delay = 2.0          # answer late
    backend.status = 500         # answer every request with this status
    backend.raw_body = b"<html>" # answer these bytes (200) instead of JSON (.chunked: streamed)
    backend.wrong_shape = True   # answer a JSON list instead of an object
    backend.answers["/bulk_lookup"] = {...}  # answer this JSON on one path
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.loopback import LoopbackServer


@dataclass(frozen=True)
class BackendRequest:
    """One request the backend got."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None


class RestBackend(LoopbackServer):
    """``/lookup``, ``/bulk_lookup``, ``/threepids`` and ``/roles`` on 127.0.0.1."""

    def __init__(
        self,
        mxids: dict[tuple[str, str], str] | None = None,
        roles: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.mxids: dict[tuple[str, str], str] = dict(mxids or {})
        self.roles: dict[str, list[str]] = dict(roles or {})
        self.requests: list[BackendRequest] = []
        # When set, requests without "Authorization: Bearer <token>" get 401.
        self.token: str | None = None
        # The most entries one page of GET /threepids holds, whatever limit is asked.
        self.page_size = 1000
        # GET /threepids gives this cursor as next on every page (a broken backend).
        self.repeat_cursor = False
        # /lookup answers 404 rather than {} for an unknown 3PID.
        self.unknown_as_404 = False
        # Misbehaviours, checked in this order after the request is recorded.
        self.delay = 0.0
        self.status: int | None = None
        self.raw_body: bytes | None = None
        # raw_body is sent chunked, without a Content-Length, pausing this long after the
        # first chunk.
        self.chunked = False
        self.body_delay = 0.0
        self.wrong_shape = False
        self.answers: dict[str, Any] = {}
        self._released = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        """The contract's four endpoints."""
        app.router.add_post("/lookup", self._endpoint(self._lookup))
        app.router.add_post("/bulk_lookup", self._endpoint(self._bulk_lookup))
        app.router.add_get("/threepids", self._endpoint(self._threepids))
        app.router.add_post("/roles", self._endpoint(self._roles))

    async def stop(self) -> None:
        """Wake delayed handlers, then stop listening."""
        self._released.set()
        await super().stop()

    async def _pause(self, seconds: float) -> None:
        # Cut short by stop(), so a test's teardown does not wait for it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), seconds)

    def _endpoint(
        self, answer: Callable[[web.Request, Any], web.Response]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            body: Any = None
            if request.method == "POST":
                try:
                    body = json.loads(await request.read())
                except ValueError:
                    return web.json_response({"error": "body is not JSON"}, status=400)
            self.requests.append(
                BackendRequest(
                    request.method,
                    request.path,
                    dict(request.query),
                    body,
                    request.headers.get("Authorization"),
                )
            )
            if self.delay:
                await self._pause(self.delay)
            if self.token is not None and (
                request.headers.get("Authorization") != f"Bearer {self.token}"
            ):
                return web.json_response({"error": "unauthorised"}, status=401)
            if self.status is not None:
                return web.json_response({"error": "broken"}, status=self.status)
            if self.raw_body is not None:
                if not self.chunked:
                    return web.Response(body=self.raw_body, content_type="application/json")
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                response.enable_chunked_encoding()
                await response.prepare(request)
                for start in range(0, len(self.raw_body), 65536):
                    await response.write(self.raw_body[start : start + 65536])
                    if start == 0 and self.body_delay:
                        await self._pause(self.body_delay)
                await response.write_eof()
                return response
            if self.wrong_shape:
                return web.json_response(["not", "an", "object"])
            if request.path in self.answers:
                return web.json_response(self.answers[request.path])
            return answer(request, body)

        return handle

    def _lookup(self, request: web.Request, body: Any) -> web.Response:
        mxid = self.mxids.get((body["medium"], body["address"]))
        if mxid is None:
            return web.json_response({}, status=404 if self.unknown_as_404 else 200)
        return web.json_response({"mxid": mxid})

    def _bulk_lookup(self, request: web.Request, body: Any) -> web.Response:
        known = []
        for item in body["threepids"]:
            key = (item["medium"], item["address"])
            if key in self.mxids:
                known.append({"medium": key[0], "address": key[1], "mxid": self.mxids[key]})
        return web.json_response({"threepids": known})

    def _threepids(self, request: web.Request, body: Any) -> web.Response:
        limit = min(int(request.query["limit"]), self.page_size)
        start = int(request.query.get("since", "0"))
        items = sorted(self.mxids.items())
        page = [
            {"medium": medium, "address": address, "mxid": mxid}
            for (medium, address), mxid in items[start : start + limit]
        ]
        more = start + limit < len(items)
        nxt = str(start + limit) if more else None
        if self.repeat_cursor:
            nxt = request.query.get("since", "0")
        return web.json_response({"threepids": page, "next": nxt})

    def _roles(self, request: web.Request, body: Any) -> web.Response:
        return web.json_response({"roles": self.roles.get(body["mxid"], [])})
