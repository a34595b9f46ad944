"""A loopback stand-in for the homeserver's client-server API, as the application service uses it.

A fault-injection double for the appservice tests (the end-to-end tests use a real Synapse). It
checks ``Authorization: Bearer <as_token>`` on every request and answers, as an appservice user
(``?user_id=`` or else the bot):

- ``POST /_matrix/client/v3/register`` (``m.login.application_service``, ``inhibit_login``):
  200, or 400 ``M_USER_IN_USE`` for a user registered before;
- ``POST /_matrix/client/v3/rooms/{roomId}/leave`` (body ``{"reason"?}``), ``POST
  /_matrix/client/v3/join/{roomIdOrAlias}`` and ``/rooms/{roomId}/join``: recorded memberships;
- ``PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}``: recorded messages (only
  from a joined user);
- ``GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}``: the power levels and
  create event mautrix reads before it sends a message (only for a joined user);
- ``POST /_matrix/client/v1/appservice/{id}/ping``: like Synapse, calls the appservice's
  ``POST /_matrix/app/v1/ping`` with the hs_token and reports the round trip.

Like Synapse it refuses to let the appservice act as a user it has not registered (403). Failures
are switchable: ``fail_next(kind, ...)`` queues answers for the next requests of one kind
(``register``, ``leave``, ``join``, ``send``, ``state``, ``ping``), ``go_down()`` refuses
connections until ``come_up()``. Anything else is a 404 ``M_UNRECOGNIZED``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.loopback import LoopbackServer

# A planned answer: a status (with an error body, M_UNKNOWN unless given) or (status, body).
Answer = int | tuple[int, Any]

CLIENT_V3 = "/_matrix/client/v3"


def not_in_room(user_id: str, room_id: str) -> tuple[int, Any]:
    """Synapse's answer to a leave of a room the user is not in (mautrix ignores it)."""
    return 403, {"errcode": "M_FORBIDDEN", "error": f"User {user_id} not in room {room_id}"}


def not_invited() -> tuple[int, Any]:
    """A 403 of another kind (the invite is gone)."""
    return 403, {"errcode": "M_FORBIDDEN", "error": "You are not invited to this room."}


def no_such_room() -> tuple[int, Any]:
    """404 for a room the homeserver does not know."""
    return 404, {"errcode": "M_NOT_FOUND", "error": "Unknown room"}


@dataclass(frozen=True)
class ClientCall:
    """One request the fake received (answered or refused)."""

    kind: str
    method: str
    path: str
    # The user the appservice acted as (``user_id`` query, else the bot); None when refused
    # before it was known (bad token).
    user_id: str | None
    room_id: str | None
    body: Any
    status: int


@dataclass(frozen=True)
class Membership:
    """A membership change the fake accepted."""

    room_id: str
    user_id: str
    membership: str
    reason: str | None


@dataclass(frozen=True)
class SentMessage:
    """A message event the fake accepted."""

    room_id: str
    user_id: str
    event_type: str
    txn_id: str
    content: dict[str, Any]


class _Refused(Exception):
    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"errcode": errcode, "error": error}


class FakeClientApi(LoopbackServer):
    """The client-server API endpoints an application service calls, on 127.0.0.1."""

    def __init__(
        self,
        server_name: str = "hs.test",
        *,
        appservice_id: str = "identity-appservice",
        bot_localpart: str = "_identity_bot",
    ) -> None:
        super().__init__()
        self.server_name = server_name
        self.appservice_id = appservice_id
        self.bot_user_id = f"@{bot_localpart}:{server_name}"
        # Hex tokens (the config loader refuses anything looking like a placeholder).
        self.as_token = secrets.token_hex(16)
        self.hs_token = secrets.token_hex(16)
        # Where the appservice listens (the registration's url): the target of pings.
        self.appservice_url: str | None = None
        self.calls: list[ClientCall] = []
        self.registered: set[str] = set()
        self.memberships: list[Membership] = []
        self.messages: list[SentMessage] = []
        # What the appservice answered to our pings: (status, body).
        self.ping_answers: list[tuple[int, Any]] = []
        self._planned: dict[str, list[Answer]] = {}
        self._sent_txns: dict[tuple[str, str], str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Condition()

    def user_id(self, localpart: str) -> str:
        """A user ID on this homeserver."""
        return f"@{localpart}:{self.server_name}"

    def fail_next(self, kind: str, *answers: Answer) -> None:
        """Answer the next requests of ``kind`` with these, in order (then normally again)."""
        self._planned.setdefault(kind, []).extend(answers)

    def calls_of(self, kind: str) -> list[ClientCall]:
        """The requests of one kind, in order."""
        return [c for c in self.calls if c.kind == kind]

    def membership_of(self, room_id: str, user_id: str) -> str | None:
        """The user's last accepted membership in the room."""
        for change in reversed(self.memberships):
            if (change.room_id, change.user_id) == (room_id, user_id):
                return change.membership
        return None

    async def wait_for(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (at most ``within`` seconds) until ``condition()`` holds after a request."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(condition)

    # Serving.

    def routes(self, app: web.Application) -> None:
        """The client-server endpoints an appservice calls."""
        app.router.add_post(f"{CLIENT_V3}/register", self._register)
        app.router.add_post(f"{CLIENT_V3}/rooms/{{room_id}}/leave", self._leave)
        app.router.add_post(f"{CLIENT_V3}/rooms/{{room_id}}/join", self._join)
        app.router.add_post(f"{CLIENT_V3}/join/{{room_id}}", self._join)
        app.router.add_put(
            f"{CLIENT_V3}/rooms/{{room_id}}/send/{{event_type}}/{{txn_id}}", self._send
        )
        app.router.add_get(
            f"{CLIENT_V3}/rooms/{{room_id}}/state/{{event_type}}/{{state_key:.*}}", self._state
        )
        app.router.add_get(f"{CLIENT_V3}/rooms/{{room_id}}/state/{{event_type}}", self._state)
        app.router.add_post("/_matrix/client/v1/appservice/{appservice_id}/ping", self._ping)
        app.router.add_route("*", "/{tail:.*}", self._unknown)

    async def start(self) -> None:
        """Listen on a free loopback port, with a client session for the pings."""
        await super().start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def stop(self) -> None:
        """Stop listening."""
        if self._session is not None:
            await self._session.close()
        await super().stop()

    async def __aenter__(self) -> FakeClientApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Plumbing shared by the endpoints.

    async def _handle(
        self,
        kind: str,
        request: web.Request,
        work: Callable[[str, Any], Awaitable[tuple[int, Any]]],
        *,
        room_id: str | None = None,
        needs_body: bool = True,
    ) -> web.Response:
        """Authenticate, record, apply a planned failure or do ``work(user_id, body)``."""
        user_id: str | None = None
        body: Any = None
        try:
            self._check_token(request)
            user_id = request.query.get("user_id", self.bot_user_id)
            if needs_body:
                try:
                    body = await request.json()
                except ValueError:
                    raise _Refused(400, "M_NOT_JSON", "Content not JSON") from None
                if not isinstance(body, dict):
                    raise _Refused(400, "M_BAD_JSON", "Body must be a JSON object")
            if kind != "register" and user_id not in self.registered:
                # Synapse: an appservice may only act as users it registered (the bot excepted
                # only once it exists; here it must be registered as well).
                raise _Refused(
                    403, "M_FORBIDDEN", "Application service has not registered this user"
                )
            planned = self._planned.get(kind)
            if planned:
                status, answer = self._planned_answer(planned.pop(0))
            else:
                status, answer = await work(user_id, body)
        except _Refused as e:
            status, answer = e.status, e.body
        async with self._changed:
            call = ClientCall(kind, request.method, request.path, user_id, room_id, body, status)
            self.calls.append(call)
            self._changed.notify_all()
        return web.json_response(answer, status=status)

    @staticmethod
    def _planned_answer(planned: Answer) -> tuple[int, Any]:
        if isinstance(planned, tuple):
            return planned
        if 200 <= planned < 300:
            return planned, {}
        return planned, {"errcode": "M_UNKNOWN", "error": f"planned failure {planned}"}

    def _check_token(self, request: web.Request) -> None:
        header = request.headers.get("Authorization")
        if header is None:
            # Query-string tokens are deprecated for appservices: the header is required here.
            raise _Refused(401, "M_MISSING_TOKEN", "Missing access token")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not secrets.compare_digest(token, self.as_token):
            raise _Refused(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")

    def _record_membership(
        self, room_id: str, user_id: str, membership: str, reason: str | None
    ) -> None:
        self.memberships.append(Membership(room_id, user_id, membership, reason))

    def _require_joined(self, room_id: str, user_id: str) -> None:
        if self.membership_of(room_id, user_id) != "join":
            raise _Refused(403, "M_FORBIDDEN", f"User {user_id} not in room {room_id}")

    # Endpoints.

    async def _register(self, request: web.Request) -> web.Response:
        async def work(_user: str, body: Any) -> tuple[int, Any]:
            if body.get("type") != "m.login.application_service":
                raise _Refused(401, "M_FORBIDDEN", "an appservice registers with its type")
            if body.get("inhibit_login") is not True:
                raise _Refused(400, "M_APPSERVICE_LOGIN_UNSUPPORTED", "inhibit_login required")
            localpart = body.get("username")
            if not isinstance(localpart, str) or not localpart:
                raise _Refused(400, "M_INVALID_USERNAME", "username required")
            user_id = self.user_id(localpart)
            if user_id in self.registered:
                raise _Refused(400, "M_USER_IN_USE", "User ID already taken.")
            self.registered.add(user_id)
            return 200, {"user_id": user_id}

        return await self._handle("register", request, work)

    async def _leave(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]

        async def work(user_id: str, body: Any) -> tuple[int, Any]:
            reason = body.get("reason")
            self._record_membership(room_id, user_id, "leave", reason)
            return 200, {}

        return await self._handle("leave", request, work, room_id=room_id)

    async def _join(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]

        async def work(user_id: str, _body: Any) -> tuple[int, Any]:
            self._record_membership(room_id, user_id, "join", None)
            return 200, {"room_id": room_id}

        return await self._handle("join", request, work, room_id=room_id)

    async def _send(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        event_type = request.match_info["event_type"]
        txn_id = request.match_info["txn_id"]

        async def work(user_id: str, body: Any) -> tuple[int, Any]:
            self._require_joined(room_id, user_id)
            key = (user_id, txn_id)
            if key not in self._sent_txns:  # a retried send is idempotent by txnId
                self._sent_txns[key] = f"${secrets.token_urlsafe(16)}"
                self.messages.append(SentMessage(room_id, user_id, event_type, txn_id, body))
            return 200, {"event_id": self._sent_txns[key]}

        return await self._handle("send", request, work, room_id=room_id)

    async def _state(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        event_type = request.match_info["event_type"]
        state_key = request.match_info.get("state_key", "")

        async def work(user_id: str, _body: Any) -> tuple[int, Any]:
            self._require_joined(room_id, user_id)
            if event_type == "m.room.power_levels" and state_key == "":
                content: dict[str, Any] = {
                    "users": {f"@creator:{self.server_name}": 100},
                    "users_default": 0,
                    "events": {},
                    "events_default": 0,
                    "state_default": 50,
                }
            elif event_type == "m.room.create" and state_key == "":
                content = {"room_version": "10", "creator": f"@creator:{self.server_name}"}
            else:
                raise _Refused(404, "M_NOT_FOUND", "Event not found.")
            if request.query.get("format") != "event":
                return 200, content
            return 200, {
                "type": event_type,
                "state_key": state_key,
                "content": content,
                "room_id": room_id,
                "sender": f"@creator:{self.server_name}",
                "event_id": f"${secrets.token_urlsafe(16)}",
                "origin_server_ts": int(time.time() * 1000),
            }

        return await self._handle("state", request, work, room_id=room_id, needs_body=False)

    async def _ping(self, request: web.Request) -> web.Response:
        appservice_id = request.match_info["appservice_id"]

        async def work(_user: str, body: Any) -> tuple[int, Any]:
            if appservice_id != self.appservice_id:
                raise _Refused(403, "M_FORBIDDEN", "the token is not this appservice's")
            if self.appservice_url is None:
                raise _Refused(400, "M_URL_NOT_SET", "Application service URL is not set")
            assert self._session is not None
            sent: dict[str, Any] = {}
            if "transaction_id" in body:
                sent["transaction_id"] = body["transaction_id"]
            started = time.monotonic()
            try:
                async with self._session.post(
                    f"{self.appservice_url}/_matrix/app/v1/ping",
                    json=sent,
                    headers={"Authorization": f"Bearer {self.hs_token}"},
                ) as resp:
                    answer = await resp.json(content_type=None)
                    self.ping_answers.append((resp.status, answer))
                    if resp.status != 200:
                        return 502, {
                            "errcode": "M_BAD_STATUS",
                            "error": "Ping returned error response",
                            "status": resp.status,
                            "body": str(answer),
                        }
            except aiohttp.ClientError as e:
                return 502, {"errcode": "M_CONNECTION_FAILED", "error": str(e)}
            return 200, {"duration_ms": int((time.monotonic() - started) * 1000)}

        return await self._handle("ping", request, work)

    async def _unknown(self, request: web.Request) -> web.Response:
        async with self._changed:
            self.calls.append(
                ClientCall("unknown", request.method, request.path, None, None, None, 404)
            )
            self._changed.notify_all()
        return web.json_response(
            {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}, status=404
        )
