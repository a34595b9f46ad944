"""A loopback homeserver client-server API that records every request exactly as received, for
the invite proxy tests (the end-to-end tests use a real Synapse).

- ``GET /_matrix/client/v3/account/whoami``: the user of a known access token (``Authorization:
  Bearer`` or ``?access_token=``; an appservice token acts as ``?user_id=``), else 401
  ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN`` like Synapse;
- anything else: the next planned :class:`Answer` (default ``200 {}``), streamed in the chunks
  given, optionally pausing after the first one until the test lets it go on, or cut there.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.loopback import LoopbackServer

WHOAMI = "/_matrix/client/v3/account/whoami"


@dataclass(frozen=True)
class Received:
    """One request as it arrived: raw target (path and query), headers in order, body bytes."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass
class Answer:
    """What the fake answers to the next forwarded request."""

    status: int = 200
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("Content-Type", "application/json")]
    )
    chunks: list[bytes] = field(default_factory=lambda: [b"{}"])
    # Send a Content-Length (else the answer is chunked).
    content_length: bool = True
    # When set, the answer waits after its first chunk until this event is set.
    hold: asyncio.Event | None = None
    # Cut the connection after the first chunk (a homeserver crashing mid-answer).
    cut: bool = False


class RecordingClientApi(LoopbackServer):
    """Records requests and answers them as planned, on 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        # access token -> user ID.
        self.tokens: dict[str, str] = {}
        # Appservice tokens, which may act as any ``?user_id=``.
        self.appservice_tokens: set[str] = set()
        self.answers: list[Answer] = []
        self.first_chunk_sent = asyncio.Event()

    def forwarded(self) -> list[Received]:
        """The requests other than whoami."""
        return [r for r in self.received if not r.target.startswith(WHOAMI)]

    def whoamis(self) -> list[Received]:
        """The whoami requests."""
        return [r for r in self.received if r.target.startswith(WHOAMI)]

    def routes(self, app: web.Application) -> None:
        """whoami, and everything else answered as planned."""
        app.router.add_get(WHOAMI, self._whoami)
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _record(self, request: web.Request) -> None:
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers)
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, headers, body))

    async def _whoami(self, request: web.Request) -> web.Response:
        await self._record(request)
        header = request.headers.get("Authorization")
        token = header.removeprefix("Bearer ") if header else request.query.get("access_token")
        if not token:
            return web.json_response(
                {"errcode": "M_MISSING_TOKEN", "error": "Missing access token."}, status=401
            )
        if token in self.appservice_tokens and "user_id" in request.query:
            return web.json_response({"user_id": request.query["user_id"]})
        if token not in self.tokens:
            return web.json_response(
                {
                    "errcode": "M_UNKNOWN_TOKEN",
                    "error": "Unknown access token.",
                    "soft_logout": False,
                },
                status=401,
                headers={"X-Whoami": "refused"},
            )
        return web.json_response({"user_id": self.tokens[token], "device_id": "DEV"})

    async def _any(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        answer = self.answers.pop(0) if self.answers else Answer()
        response = web.StreamResponse(status=answer.status)
        for name, value in answer.headers:
            response.headers.add(name, value)
        if answer.content_length:
            response.content_length = sum(len(c) for c in answer.chunks)
        await response.prepare(request)
        for i, chunk in enumerate(answer.chunks):
            await response.write(chunk)
            if i == 0:
                self.first_chunk_sent.set()
                if answer.hold is not None:
                    await asyncio.wait_for(answer.hold.wait(), 10)
                if answer.cut and request.transport is not None:
                    request.transport.abort()
                    return response
        await response.write_eof()
        return response
