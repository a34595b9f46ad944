"""The invite policy: who may invite by email or phone number, enforced in front of the homeserver.

Homeservers do not ask an identity server before a 3PID invite, so the operator's reverse proxy
sends the client-server endpoints that can make one (``/rooms/{roomId}/invite`` and
``/createRoom``) to us. This service recognises 3PID invites in those request bodies, asks the
homeserver who the caller is (``/account/whoami`` with the caller's own credentials), applies
``invites.policy`` and forwards the request to the homeserver unchanged, streaming the answer
back. Everything that is not a 3PID invite is forwarded without asking anything.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from appservice.config import RateLimit
from appservice.config.model import Duration, InvitePolicyConfig
from appservice.errors import MatrixError, bad_json, forbidden
from appservice.identity_stores import IdentityStores, StoreError
from appservice.services.invites import redact_address
from appservice.services.ratelimits import RateLimiter

log = logging.getLogger(__name__)

WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
RATELIMIT_NAME = "invite_policy_per_sender"
DAY_S = 86_400.0
# Connecting and each read are bounded; the whole exchange too, since a 3PID invite makes the
# homeserver call the identity server and send mail before it answers.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
TOTAL_TIMEOUT_S = 300.0
WHOAMI_TIMEOUT_S = 15.0
MAX_WHOAMI_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024

# RFC 9110 section 7.6.1, plus the proxy-era Keep-Alive and Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp would add these to a forwarded request when the client did not send them.
_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_MEDIUM_WORDS = {"email": "email", "msisdn": "phone number"}

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class ThreepidInvite:
    """A 3PID invite found in a request body."""

    medium: str
    address: str


@dataclass(frozen=True)
class UpstreamResponse:
    """The homeserver's answer to a forwarded request, its body still to be read."""

    status: int
    reason: str
    headers: Headers
    chunks: AsyncIterator[bytes]


class HomeserverAnswer(Exception):
    """The homeserver refused to say who the caller is (401, 403, ...): its answer, to pass back
    to the client as is."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        super().__init__(f"homeserver answered {status}")
        self.status = status
        self.headers = headers
        self.body = body


class UpstreamBroken(Exception):
    """The homeserver's answer broke off after it began (the client gets a truncated answer)."""


def end_to_end_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """``headers`` without the hop-by-hop ones (also those a ``Connection`` header names)."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def _parse_json(raw: bytes) -> Any:
    """The body as JSON, or None when it is not JSON.

    More lenient than the homeserver (any UTF encoding, NaN), so that nothing the homeserver
    would accept as a 3PID invite slips through as "not JSON".
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _threepid(entry: dict[str, Any]) -> ThreepidInvite | None:
    # Synapse makes a 3PID invite whenever both keys are present, even next to a user_id.
    if "medium" not in entry or "address" not in entry:
        return None
    medium, address = entry["medium"], entry["address"]
    if not isinstance(medium, str) or not isinstance(address, str):
        raise bad_json("medium and address must be strings")
    return ThreepidInvite(medium, address)


def invite_in_body(raw: bytes) -> ThreepidInvite | None:
    """The 3PID invite of a ``/rooms/{roomId}/invite`` body; None for an invite by user ID, a
    body that is not JSON or anything else the homeserver will not take for a 3PID invite."""
    body = _parse_json(raw)
    return _threepid(body) if isinstance(body, dict) else None


def invites_in_create_room(raw: bytes) -> list[ThreepidInvite]:
    """The 3PID invites (``invite_3pid``) of a ``/createRoom`` body."""
    body = _parse_json(raw)
    if not isinstance(body, dict) or body.get("invite_3pid") is None:
        return []
    entries = body["invite_3pid"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad_json("invite_3pid must be a list of objects")
    return [invite for entry in entries if (invite := _threepid(entry)) is not None]


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes (a longer one is cut there)."""
    body = bytearray()
    while len(body) < limit:
        chunk = await stream.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _medium_word(medium: str) -> str:
    return _MEDIUM_WORDS.get(medium, medium)


def _redacted(invite: ThreepidInvite) -> str:
    if invite.medium == "email":
        return redact_address(invite.address.strip(), 1, 1)
    return f"…{invite.address.strip()[-2:]}"


def _email_domain(address: str) -> str:
    return address.strip().rpartition("@")[2].rstrip(".").lower()


def _under(domain: str, parents: Sequence[str]) -> bool:
    return any(domain == p or domain.endswith("." + p) for p in parents)


class InvitePolicyService:
    """Decides 3PID invites by ``invites.policy`` and forwards requests to the homeserver."""

    def __init__(
        self,
        policy: InvitePolicyConfig,
        stores: IdentityStores,
        ratelimiter: RateLimiter,
        homeserver_url: str,
    ) -> None:
        self._policy = policy
        self._stores = stores
        self._ratelimiter = ratelimiter
        self._base_url = homeserver_url.rstrip("/")
        self._roles = frozenset(policy.roles)
        self._senders = [re.compile(p) for p in policy.allowed_senders]
        self._allowed_domains = [d.strip(".").lower() for d in policy.allowed_domains]
        self._denied_domains = [d.strip(".").lower() for d in policy.denied_domains]
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # The client's Accept-Encoding is forwarded, so bodies pass through as sent.
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=TOTAL_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
                ),
            )
        return self._session

    async def close(self) -> None:
        """Close the connections to the homeserver."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Who is asking.

    async def whoami(self, authorization: Sequence[str], query: Sequence[tuple[str, str]]) -> str:
        """The caller's user ID, asked of the homeserver with the caller's own credentials
        (``Authorization`` headers and the ``access_token``/``user_id`` query parameters).

        Raises :class:`HomeserverAnswer` when the homeserver refuses (an unknown token: the
        client gets that answer) and 502 when it cannot be asked.
        """
        headers = CIMultiDict([("Authorization", v) for v in authorization])
        headers["Accept-Encoding"] = "identity"
        try:
            async with self._client().get(
                self._base_url + WHOAMI_PATH,
                params=list(query),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=WHOAMI_TIMEOUT_S),
                allow_redirects=False,
            ) as resp:
                body = await _read_bounded(resp.content, MAX_WHOAMI_BYTES + 1)
                if 400 <= resp.status < 500:
                    raise HomeserverAnswer(
                        resp.status, end_to_end_headers(resp.headers.items()), body
                    )
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("invite policy: cannot reach the homeserver for whoami: %r", e)
            raise MatrixError(
                502, "M_UNKNOWN", "Cannot reach the homeserver to check who you are"
            ) from None
        answer = _parse_json(body) if status == 200 and len(body) <= MAX_WHOAMI_BYTES else None
        user_id = answer.get("user_id") if isinstance(answer, dict) else None
        if not isinstance(user_id, str) or not user_id.startswith("@"):
            log.warning("invite policy: whoami answered %d without a user ID", status)
            raise MatrixError(502, "M_UNKNOWN", "The homeserver did not say who you are")
        return user_id

    # The policy.

    async def check(self, sender: str, room: str, invites: Sequence[ThreepidInvite]) -> None:
        """Allow ``sender``'s 3PID invites into ``room`` or raise: 403 ``M_FORBIDDEN`` (why),
        429 ``M_LIMIT_EXCEEDED`` over the daily limit, 503 when a store cannot tell the roles.
        Logs one line per invite."""
        for invite in invites:
            reason = self._domain_refusal(invite)
            if reason is None:
                reason = await self._sender_refusal(sender, room, invite)
            if reason is not None:
                self._log(sender, room, invite, f"denied ({reason})")
                raise forbidden(
                    f"You are not allowed to invite by {_medium_word(invite.medium)}: {reason}"
                )
        if self._policy.max_per_day > 0:
            limit = RateLimit(self._policy.max_per_day, Duration(DAY_S))
            for invite in invites:
                try:
                    await self._ratelimiter.hit(RATELIMIT_NAME, sender, limit)
                except MatrixError as e:
                    self._log(sender, room, invite, "denied (daily limit)")
                    raise MatrixError(
                        429,
                        "M_LIMIT_EXCEEDED",
                        f"You may send at most {self._policy.max_per_day} invites by email or "
                        "phone number a day; try again later",
                        headers=e.headers,
                        **e.extra,
                    ) from None
        for invite in invites:
            self._log(sender, room, invite, "allowed")

    def _domain_refusal(self, invite: ThreepidInvite) -> str | None:
        if invite.medium != "email":
            return None
        domain = _email_domain(invite.address)
        if _under(domain, self._denied_domains):
            return f"addresses at {domain} may not be invited"
        if self._allowed_domains and not _under(domain, self._allowed_domains):
            return "only addresses at " + ", ".join(self._allowed_domains) + " may be invited"
        return None

    async def _sender_refusal(self, sender: str, room: str, invite: ThreepidInvite) -> str | None:
        if not self._roles and not self._senders:
            return None
        if any(p.fullmatch(sender) for p in self._senders):
            return None
        if self._roles:
            try:
                roles = await self._stores.roles(sender)
            except StoreError as e:
                self._log(
                    sender, room, invite, f"undecided (roles unavailable: {e})", logging.WARNING
                )
                raise MatrixError(
                    503,
                    "M_UNKNOWN",
                    "The identity server cannot check your roles right now; try again later",
                ) from None
            if roles & self._roles:
                return None
        return "your account is not among those allowed to send such invites"

    def _log(
        self,
        sender: str,
        room: str,
        invite: ThreepidInvite,
        decision: str,
        level: int = logging.INFO,
    ) -> None:
        log.log(
            level,
            "invite policy: %s inviting %s %s to %s: %s",
            sender,
            invite.medium,
            _redacted(invite),
            room,
            decision,
        )

    # Forwarding.

    @asynccontextmanager
    async def forward(
        self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        """Send the request to the homeserver as received (raw path and query, body, headers
        minus hop-by-hop ones and Host) and yield its answer, whose body is read chunk by chunk.

        502 when the homeserver cannot be reached, 504 when it does not answer in time;
        :class:`UpstreamBroken` when its answer breaks off.
        """
        sent = CIMultiDict(
            (k, v)
            for k, v in end_to_end_headers(headers)
            # Content-Length is recomputed from the same bytes.
            if k.lower() not in ("host", "content-length")
        )
        url = URL(self._base_url + path_qs, encoded=True)
        try:
            resp = await self._client().request(
                method,
                url,
                data=body,
                headers=sent,
                skip_auto_headers=_AUTO_HEADERS,
                allow_redirects=False,
            )
        except TimeoutError:
            log.warning("invite proxy: the homeserver did not answer %s in time", method)
            raise MatrixError(504, "M_UNKNOWN", "The homeserver did not answer in time") from None
        except aiohttp.ClientError as e:
            log.warning("invite proxy: cannot reach the homeserver: %r", e)
            raise MatrixError(502, "M_UNKNOWN", "Cannot reach the homeserver") from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as e:
                raise UpstreamBroken(f"the homeserver's answer broke off: {e!r}") from None

        try:
            yield UpstreamResponse(
                resp.status,
                resp.reason or "",
                end_to_end_headers(resp.headers.items()),
                chunks(),
            )
        finally:
            resp.release()
