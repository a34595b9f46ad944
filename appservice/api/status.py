"""Discovery and health: ``/_matrix/identity/versions``, ``/_matrix/identity/v2``, ``/health``
(readiness, as ``/health/ready``) and ``/health/live``."""

from __future__ import annotations

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import json_response

# The spec versions whose identity API this server implements.
SUPPORTED_VERSIONS = ["v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9",
                      "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16", "v1.17",
                      "v1.18", "v1.19"]  # fmt: skip


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def versions(_request: web.Request) -> web.Response:
        return json_response({"versions": SUPPORTED_VERSIONS})

    async def v2_status(_request: web.Request) -> web.Response:
        return json_response({})

    async def ready(_request: web.Request) -> web.Response:
        report = await ctx.health()
        return json_response(report, 200 if report.get("status") == "ok" else 503)

    async def live(_request: web.Request) -> web.Response:
        # The process is up and its loop answers: nothing else is checked, so a database outage
        # does not get the process restarted.
        return json_response({"status": "ok"})

    router.add_get("/_matrix/identity/versions", versions)
    router.add_get("/_matrix/identity/v2", v2_status)
    router.add_get("/health/live", live)
    router.add_get("/health/ready", ready)
    # Readiness, as it always was.
    router.add_get("/health", ready)
