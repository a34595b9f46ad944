"""A loopback aiohttp server that a test can take down and bring back on the same port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopbackServer:
    """Serves ``self.routes(app)`` on 127.0.0.1; ``go_down``/``come_up`` simulate an outage."""

    def __init__(self) -> None:
        self.port = 0
        self._down = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def base_url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        """Add the server's routes (subclasses)."""
        raise NotImplementedError

    @web.middleware
    async def _refuse_when_down(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A keep-alive connection opened before going down is cut like a crashed server's.
        if self._down and request.transport is not None:
            request.transport.abort()
            raise web.HTTPServiceUnavailable()
        return await handler(request)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application(middlewares=[self._refuse_when_down])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen(0)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", port)
        await self._site.start()
        self.port = self._runner.addresses[0][1]

    async def go_down(self) -> None:
        """Refuse new connections and cut requests on connections already open."""
        self._down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def come_up(self) -> None:
        """Listen again, on the same port."""
        self._down = False
        if self._site is None:
            await self._listen(self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
