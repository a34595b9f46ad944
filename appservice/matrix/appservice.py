"""The application service web app (mautrix ``AppService``) with strict hs_token checks and
durable, idempotent transactions.

mautrix acknowledges a transaction even when a handler fails, and remembers handled transaction
ids only in memory. Here a transaction is acknowledged only after what it asks of us was written
to the database (otherwise the homeserver gets a 500 and retries), and handled ids are stored, so
a retried transaction is not processed twice, also across restarts.
"""

from __future__ import annotations

import hmac
import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from aiohttp import web
from mautrix.appservice import AppService, AppServiceAPI
from mautrix.appservice.state_store import ASStateStore
from mautrix.types import JSON, StateEvent, UserID

from appservice.api.http import (
    SERVER_LOG,
    Handler,
    RedactingAccessLogger,
    RequestTracker,
    json_body,
    json_response,
    matrix_middleware,
)
from appservice.config import AppserviceConfig
from appservice.errors import MatrixError, bad_json
from appservice.matrix.state_store import RoomStateStore
from appservice.metrics import Metrics

log = logging.getLogger(__name__)

# (txn_id, events) -> None once everything the transaction asks for is recorded durably.
TransactionHandler = Callable[[str, list[dict[str, Any]]], Awaitable[None]]

_AUTHENTICATED_PREFIXES = ("/_matrix/app/", "/transactions/", "/users/", "/rooms/")


class IdentityAppService(AppService):
    """mautrix's AppService, wired to our database."""

    def __init__(
        self,
        config: AppserviceConfig,
        state_store: ASStateStore,
        on_transaction: TransactionHandler,
        metrics: Metrics | None = None,
    ) -> None:
        with warnings.catch_warnings():
            # mautrix passes loop= to aiohttp's Application, which aiohttp deprecated.
            warnings.filterwarnings("ignore", "loop argument is deprecated", DeprecationWarning)
            super().__init__(
                server=config.homeserver_url,
                domain=config.homeserver_domain,
                as_token=config.as_token,
                hs_token=config.hs_token,
                bot_localpart=config.bot_localpart,
                id=config.id,
                state_store=state_store,
                log="appservice.matrix.mautrix",
            )
        self._legacy_query_auth = config.legacy_query_auth
        self._expired_user_id = config.expired_user_id
        self._on_transaction = on_transaction
        self._metrics = metrics if metrics is not None else Metrics()
        # Request ids: a transaction's lines in the log carry the id of its request.
        self.requests = RequestTracker()
        self.app.middlewares.append(self.requests.middleware)
        self.app.middlewares.append(self._metrics.http_middleware("appservice"))
        self.app.middlewares.append(matrix_middleware)
        self.app.middlewares.append(self._auth_middleware)

    async def start(self, host: str = "127.0.0.1", port: int = 8091) -> None:
        """mautrix's ``start``, but the access log redacts ``?access_token=`` (the hs_token, when
        the homeserver uses legacy query authentication)."""
        await self.state_store.open()
        self._http_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connection_limit),
            headers={"User-Agent": self.default_ua},
        )
        self._intent = AppServiceAPI(
            base_url=self.server,
            bot_mxid=self.bot_mxid,
            log=self.log,
            token=self.as_token,
            state_store=self.state_store,
            bridge_name=self.bridge_name,
            client_session=self._http_session,
            default_retry_count=self.default_http_retry_count,
        ).bot_intent()
        self.runner = web.AppRunner(
            self.app,
            access_log_class=RedactingAccessLogger,
            logger=SERVER_LOG,
            handle_signals=False,
        )
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    def _token_problem(self, request: web.Request) -> MatrixError | None:
        """Why a request is not from our homeserver, or None when it is."""
        header = request.headers.get("Authorization")
        bearer = None
        if header is not None:
            scheme, _, value = header.partition(" ")
            bearer = value.strip() if scheme.lower() == "bearer" else ""
        query = request.query.get("access_token") if self._legacy_query_auth else None
        given = [t for t in (bearer, query) if t is not None]
        if not given:
            return MatrixError(401, "M_UNAUTHORIZED", "Missing hs_token")
        if not all(hmac.compare_digest(t.encode(), self.hs_token.encode()) for t in given):
            return MatrixError(403, "M_FORBIDDEN", "Invalid hs_token")
        return None

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(_AUTHENTICATED_PREFIXES):
            problem = self._token_problem(request)
            if problem is not None:
                raise problem
        return await handler(request)

    def _check_token(self, request: web.Request) -> bool:
        # Called by mautrix's handlers; the middleware has already answered 401/403.
        return self._token_problem(request) is None

    async def _http_query_user(self, request: web.Request) -> web.Response:
        """``GET /users/{userId}``: 200 ``{}`` for our two users (registered first, as the spec
        requires the appservice to have created them), 404 for anyone else."""
        user_id = request.match_info["user_id"]
        if user_id not in (self.bot_mxid, self._expired_user_id):
            raise MatrixError(404, "M_NOT_FOUND", "Not a user of this application service")
        try:
            await self.intent.user(UserID(user_id)).ensure_registered()
        except Exception as e:  # the homeserver asked, so it should answer; report, don't crash
            log.warning("could not register %s on request: %s", user_id, e)
            raise MatrixError(
                502, "M_UNKNOWN", "Could not register the user with the homeserver"
            ) from None
        return json_response({})

    async def _update_state_store(self, events: list[dict[str, Any]]) -> None:
        """Keep mautrix's state store (power levels, create events, memberships) current with
        the rooms' state events, as mautrix's own transaction handler does; the bot reads the
        power levels from it. A cache: an event it cannot take is logged and skipped.

        When the bot leaves a room (or is kicked or banned) the room is forgotten: no more of
        its events will arrive, and if the bot comes back the state is read afresh."""
        for raw in events:
            if "state_key" not in raw:
                continue
            try:
                event = StateEvent.deserialize(cast(JSON, raw))
                await self.state_store.update_state(event)
                if self._bot_left(raw) and isinstance(self.state_store, RoomStateStore):
                    await self.state_store.forget_room(str(event.room_id))
            except Exception as e:  # a malformed event, or the database: the cache may lag
                log.warning("state store not updated for %s: %s", raw.get("event_id"), e)

    def _bot_left(self, event: dict[str, Any]) -> bool:
        content = event.get("content")
        return (
            event.get("type") == "m.room.member"
            and event.get("state_key") == self.bot_mxid
            and isinstance(content, dict)
            and content.get("membership") in ("leave", "ban")
        )

    async def _http_handle_transaction(self, request: web.Request) -> web.Response:
        txn_id = request.match_info["transaction_id"]
        body = await json_body(request)
        events = body.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise bad_json("events must be a list of events")
        transactions = self._metrics.appservice_transactions
        await self._update_state_store(events)
        try:
            await self._on_transaction(txn_id, events)
        except Exception:  # the homeserver must retry: nothing may be lost
            transactions.labels("error").inc()
            log.exception("could not record transaction %s", txn_id)
            raise MatrixError(
                500, "M_UNKNOWN", "Could not record the transaction; retry later"
            ) from None
        transactions.labels("recorded").inc()
        return json_response({})
