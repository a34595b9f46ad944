"""3PID validation sessions: send a token, check it, and say what was validated."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from appservice.clock import Clock
from appservice.config import RateLimitsConfig, SessionConfig
from appservice.db.sessions import SessionStore, ValidationSession
from appservice.errors import MatrixError, forbidden, invalid_param
from appservice.metrics import Metrics
from appservice.notifications.connectors import EmailConnector, SmsConnector
from appservice.notifications.generator import MessageGenerator
from appservice.notifications.message import EmailMessage, NotificationError, SmsMessage
from appservice.notifications.smtp import Gate
from appservice.services.ratelimits import Event, RateLimiter
from appservice.threepid import is_opaque_id, parse_email, parse_phone_number

log = logging.getLogger(__name__)

# An email or an SMS, as the medium's ``prepare`` renders it for its ``send``.
Message = TypeVar("Message", EmailMessage, SmsMessage)

# The rate limits (``ratelimits`` names) a requestToken counts: per requester IP, per address.
REQUEST_LIMITS = ("request_token_per_ip", "request_token_per_address")
# The SMS delegate's (a homeserver relaying for all its users): a higher per-IP budget.
DELEGATE_LIMITS = ("msisdn_delegate_per_ip", "msisdn_delegate_per_number")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ValidatedThreepid:
    """What a validated session proves."""

    medium: str
    address: str
    validated_at: int


@dataclass(frozen=True)
class SubmitResult:
    """A successful validation and where the user may be sent next."""

    next_link: str | None


class SessionService:
    """Creates sessions, delivers their tokens and validates them."""

    def __init__(
        self,
        store: SessionStore,
        generator: MessageGenerator,
        email: EmailConnector,
        sms: SmsConnector,
        ratelimiter: RateLimiter,
        config: SessionConfig,
        limits: RateLimitsConfig,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._generator = generator
        self._email = email
        self._sms = sms
        self._ratelimiter = ratelimiter
        self._config = config
        self._limits = limits
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()

    def _require_enabled(self) -> None:
        if not self._config.policy.validation.enabled:
            raise forbidden("3PID validation is disabled on this identity server")

    @staticmethod
    def _check_client_secret(client_secret: str) -> None:
        if not is_opaque_id(client_secret):
            raise invalid_param("client_secret must match [0-9a-zA-Z.=_-]{1,255}")

    async def request_email_token(
        self,
        client_secret: str,
        email: str,
        send_attempt: int,
        next_link: str | None,
        requester_ip: str,
    ) -> str:
        """Start (or repeat) email validation; returns the session id."""
        self._require_enabled()
        self._check_client_secret(client_secret)
        address = parse_email(email)
        if address is None:
            raise MatrixError(400, "M_INVALID_EMAIL", "Invalid email address")

        def prepare(sid: str, token: str) -> EmailMessage:
            return self._generator.validation_email(
                address,
                token=token,
                sid=sid,
                client_secret=client_secret,
                next_link_present=next_link is not None,
            )

        async def send(message: EmailMessage, gate: Gate | None) -> bool:
            try:
                return await self._email.send_email(message, gate)
            except NotificationError as e:
                raise MatrixError(
                    400, "M_EMAIL_SEND_ERROR", f"Failed to send the email: {e}"
                ) from e

        return await self._request(
            "email", address, client_secret, send_attempt, next_link, requester_ip,
            token=secrets.token_urlsafe(32), prepare=prepare, send=send,
        )  # fmt: skip

    async def request_msisdn_token(
        self,
        client_secret: str,
        country: str,
        phone_number: str,
        send_attempt: int,
        next_link: str | None,
        requester_ip: str,
        *,
        delegate: bool = False,
    ) -> str:
        """Start (or repeat) phone number validation; returns the session id. ``delegate``: a
        homeserver asks as its users' SMS delegate, counted under :data:`DELEGATE_LIMITS`."""
        self._require_enabled()
        self._check_client_secret(client_secret)
        msisdn = parse_phone_number(country, phone_number)
        if msisdn is None:
            raise MatrixError(400, "M_INVALID_ADDRESS", "Invalid phone number")

        def prepare(_sid: str, token: str) -> SmsMessage:
            return self._generator.validation_sms(msisdn, token=token)

        async def send(message: SmsMessage, gate: Gate | None) -> bool:
            if gate is not None and not await gate:
                return False
            try:
                await self._sms.send_sms(message)
                return True
            except NotificationError as e:
                if e.destination_rejected:
                    raise MatrixError(
                        400, "M_DESTINATION_REJECTED", "Cannot send SMS to this destination"
                    ) from e
                raise MatrixError(400, "M_SEND_ERROR", f"Failed to send the SMS: {e}") from e

        return await self._request(
            "msisdn", msisdn, client_secret, send_attempt, next_link, requester_ip,
            token=f"{secrets.randbelow(10**6):06d}", prepare=prepare, send=send,
            limit_names=DELEGATE_LIMITS if delegate else REQUEST_LIMITS,
        )  # fmt: skip

    async def _request(
        self,
        medium: str,
        address: str,
        client_secret: str,
        send_attempt: int,
        next_link: str | None,
        requester_ip: str,
        *,
        token: str,
        prepare: Callable[[str, str], Message],
        send: Callable[[Message, Gate | None], Awaitable[bool]],
        limit_names: tuple[str, str] = REQUEST_LIMITS,
    ) -> str:
        """Create or re-send a session: ``prepare(sid, token)`` renders the message, ``send``
        sends it, delivering it only if its gate (storing the session) says yes."""
        check_next_link(next_link)
        existing = await self._store.by_key(medium, address, client_secret)
        if existing is not None and self._expired(existing):
            # An expired session is not resumed (its tokens could never validate): a new one
            # starts.
            await self._store.delete(existing.sid)
            existing = None
        elif existing is not None and existing.failed_attempts >= self._config.max_attempts:
            # Nor is one that used up its wrong tokens: a resend must not hand whoever is
            # guessing a fresh set of attempts on the same session.
            await self._store.delete_dead(existing.sid, self._config.max_attempts)
            existing = None
        if existing is not None and send_attempt <= existing.send_attempt:
            return existing.sid  # a retry: same session, nothing sent
        per_ip, per_address = limit_names
        limits: list[Event] = [
            (per_ip, requester_ip, getattr(self._limits, per_ip)),
            (per_address, f"{medium}:{address}", getattr(self._limits, per_address)),
        ]
        # A client or address already known to be over its limit is refused before any sending.
        self._ratelimiter.refuse_if_exhausted(limits)
        if existing is not None:
            return await self._resend(
                existing, limits, send_attempt, next_link, token=token, prepare=prepare, send=send
            )
        now = self._clock.now_ms()
        session = ValidationSession(
            sid=secrets.token_urlsafe(16),
            medium=medium,
            address=address,
            client_secret=client_secret,
            token_hash=_token_hash(token),
            send_attempt=send_attempt,
            next_link=next_link,
            created_ts=now,
            modified_ts=now,
            validated_ts=None,
            failed_attempts=0,
        )
        # The session is written and the rate limits are counted together, in one database
        # round trip, while the message is rendered (the yield lets both send their queries
        # first). Over a limit, the session written meanwhile is taken back.
        checks = asyncio.gather(
            self._store.create(session), self._ratelimiter.hit_all(limits), return_exceptions=True
        )
        await asyncio.sleep(0)
        stored: ValidationSession | None = None

        async def check_and_store() -> bool:
            # The message goes out while the session is stored and the limits counted; it is
            # delivered only if this request's session is the one stored. A refusal (429)
            # raised here drops it.
            nonlocal stored
            created, limited = await checks
            if isinstance(created, BaseException):
                raise created
            stored = created
            if isinstance(limited, BaseException):
                raise limited
            return created.token_hash == session.token_hash

        try:
            message = prepare(session.sid, token)
            await send(message, check_and_store())
        except BaseException:
            if stored is None:  # e.g. a failed render: the session may be written all the same
                created, _ = await checks
                stored = created if isinstance(created, ValidationSession) else None
            if stored is not None and stored.token_hash == session.token_hash:
                await self._store.delete(session.sid)  # nothing half-written
            raise
        assert stored is not None
        if stored.token_hash != session.token_hash:
            return stored.sid  # created concurrently by an identical request
        log.info("validation session %s created (%s)", session.sid, medium)
        self._metrics.validation_sessions_started.labels(medium).inc()
        return session.sid

    async def _resend(
        self,
        existing: ValidationSession,
        limits: list[Event],
        send_attempt: int,
        next_link: str | None,
        *,
        token: str,
        prepare: Callable[[str, str], Message],
        send: Callable[[Message, Gate | None], Awaitable[bool]],
    ) -> str:
        """A higher ``send_attempt`` for ``existing``: a new token replaces the old one, is sent."""
        hit = asyncio.ensure_future(self._ratelimiter.hit_all(limits))
        # The message is rendered while the rate limits are counted (the yield starts that).
        await asyncio.sleep(0)
        try:
            message = prepare(existing.sid, token)
        except BaseException:
            await asyncio.gather(hit, return_exceptions=True)
            raise
        await hit
        new_hash = _token_hash(token)
        if not await self._store.resend(
            existing.sid, new_hash, send_attempt, next_link, self._config.max_attempts
        ):
            return existing.sid
        try:
            await send(message, None)
        except MatrixError:
            await self._store.revert_resend(existing, new_hash)  # the old token stays valid
            raise
        log.info("validation session %s: token sent again (%s)", existing.sid, existing.medium)
        return existing.sid

    def _expired(self, session: ValidationSession) -> bool:
        """Whether ``session`` outlived ``session.lifetime`` since it last changed."""
        return self._clock.now_ms() - session.modified_ts > self._config.lifetime * 1000

    async def _live_session(self, sid: str, client_secret: str) -> ValidationSession:
        """The session for ``sid`` if ``client_secret`` matches and it has not expired."""
        self._check_client_secret(client_secret)
        session = await self._store.by_sid(sid) if is_opaque_id(sid) else None
        if session is None or not hmac.compare_digest(
            session.client_secret.encode(), client_secret.encode()
        ):
            raise MatrixError(404, "M_NO_VALID_SESSION", "No valid session was found")
        if self._expired(session):
            raise MatrixError(
                400, "M_SESSION_EXPIRED", "This validation session has expired: start a new one"
            )
        return session

    async def submit_token(self, sid: str, client_secret: str, token: str) -> SubmitResult:
        """Check a token; counts wrong ones and kills the session after too many.

        The attempt is reserved in the database before the comparison, so at most
        ``session.max_attempts`` tokens are ever compared per session token, however many
        requests arrive at once.
        """
        self._require_enabled()
        session = await self._live_session(sid, client_secret)
        reserved = await self._store.reserve_attempt(session.sid, self._config.max_attempts)
        if reserved is None:
            raise MatrixError(
                400,
                "M_SESSION_EXPIRED",
                "Too many incorrect tokens were submitted: start a new validation session",
            )
        token_hash, used = reserved
        if not hmac.compare_digest(token_hash, _token_hash(token.strip())) or not (
            await self._store.mark_validated(session.sid, token_hash, self._clock.now_ms())
        ):
            left = max(0, self._config.max_attempts - used)
            raise MatrixError(
                400,
                "M_TOKEN_INCORRECT",
                f"The token is incorrect ({left} attempt{'s' if left != 1 else ''} left).",
            )
        log.info("validation session %s validated (%s)", session.sid, session.medium)
        if session.validated_ts is None:  # a repeated submission validates nothing new
            self._metrics.validation_sessions_validated.labels(session.medium).inc()
        return SubmitResult(next_link=session.next_link)

    async def validated_threepid(self, sid: str, client_secret: str) -> ValidatedThreepid:
        """What a validated session proves (400 M_SESSION_NOT_VALIDATED until then)."""
        session = await self._live_session(sid, client_secret)
        if session.validated_ts is None:
            raise MatrixError(
                400, "M_SESSION_NOT_VALIDATED", "This validation session has not been validated"
            )
        return ValidatedThreepid(session.medium, session.address, session.validated_ts)

    async def purge_expired(self) -> int:
        """Delete sessions that can no longer be used."""
        cutoff = self._clock.now_ms() - int(self._config.lifetime * 1000)
        return await self._store.purge_modified_before(cutoff)

    def follows_next_link(self, next_link: str) -> bool:
        """Whether GET submitToken may redirect to ``next_link``: it starts with an allowed
        prefix, or it is a plain https:// URL to an allowed host (any host when
        ``session.next_link_hosts`` is empty)."""
        if any(next_link.startswith(prefix) for prefix in self._config.next_link_allowlist):
            return True
        host = _https_host(next_link)
        if host is None:
            return False
        hosts = self._config.next_link_hosts
        return not hosts or any(_host_matches(host, allowed) for allowed in hosts)


# A next_link is stored and sent back in a Location header: bounded, no control characters.
MAX_NEXT_LINK_LENGTH = 2048


def check_next_link(next_link: str | None) -> None:
    """400 M_INVALID_PARAM for a next_link no browser should be sent to."""
    if next_link is None:
        return
    if len(next_link) > MAX_NEXT_LINK_LENGTH or not next_link.isprintable():
        raise invalid_param(
            f"next_link must be a URL of at most {MAX_NEXT_LINK_LENGTH} printable characters"
        )


def _https_host(url: str) -> str | None:
    """The host of a plain ``https://host[:port]/…`` URL, lower-cased; None for anything a
    browser might read differently from us (user info, backslashes, spaces, controls)."""
    if not url.startswith("https://") or any(c in url for c in "\\ \t") or not url.isprintable():
        return None
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number
    except ValueError:
        return None
    del port
    if "@" in parts.netloc or not parts.hostname:
        return None
    return parts.hostname.rstrip(".")


def _host_matches(host: str, allowed: str) -> bool:
    if allowed.startswith("*."):
        return host.endswith(allowed[1:]) and len(host) > len(allowed) - 1
    return host == allowed
