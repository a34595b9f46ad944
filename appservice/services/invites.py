"""3PID invites: store them, mail the invitee, resolve them once (bound or expired) and queue
the onbind notification for the homeserver in the same transaction."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import nacl.signing
import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64

from appservice.clock import Clock
from appservice.config import InvitesConfig, RateLimitsConfig
from appservice.crypto.signing import KeyRing
from appservice.db.bindings import Binding, BindingStore
from appservice.db.database import AppDatabase
from appservice.db.invites import BOUND, EXPIRED, PENDING, Invite, InviteStore
from appservice.db.outbox import OutboxStore
from appservice.errors import MatrixError, forbidden, invalid_param
from appservice.identity_stores import IdentityStores
from appservice.metrics import Metrics
from appservice.notifications.connectors import EmailConnector
from appservice.notifications.generator import MessageGenerator
from appservice.notifications.message import NotificationError
from appservice.services.keys import normalise_public_key
from appservice.services.ratelimits import Event, RateLimiter
from appservice.threepid import is_opaque_id, is_room_id, parse_email, user_id_server

log = logging.getLogger(__name__)

ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"
# Where the invite email's sign_url points: v2 (Bearer) unless the unauthenticated v1 API is on.
SIGN_ED25519_V2 = "/_matrix/identity/v2/sign-ed25519"
SIGN_ED25519_V1 = "/_matrix/identity/api/v1/sign-ed25519"
# Optional store-invite fields kept for the invite email; Synapse sends "" for unset ones.
DETAIL_FIELDS = (
    "room_alias",
    "room_avatar_url",
    "room_join_rules",
    "room_name",
    "room_type",
    "sender_display_name",
    "sender_avatar_url",
)
_BATCH = 500


def redact_address(address: str, local_chars: int, domain_chars: int) -> str:
    """A display form of an email address that does not reveal it (``a…@e…``)."""
    local, _, domain = address.partition("@")
    return f"{local[:local_chars]}…@{domain[:domain_chars]}…"


@dataclass(frozen=True)
class StoreInviteRequest:
    """The fields of a store-invite request."""

    medium: str
    address: str
    room_id: str
    sender: str
    details: Mapping[str, str]


class InviteService:
    """The rules of 3PID invites."""

    def __init__(
        self,
        db: AppDatabase,
        invites: InviteStore,
        outbox: OutboxStore,
        bindings: BindingStore,
        keyring: KeyRing,
        generator: MessageGenerator,
        email: EmailConnector,
        ratelimiter: RateLimiter,
        config: InvitesConfig,
        limits: RateLimitsConfig,
        *,
        server_name: str,
        public_base_url: str,
        expired_user_id: str,
        clock: Clock,
        stores: IdentityStores | None = None,
        metrics: Metrics | None = None,
        sign_ed25519_path: str = SIGN_ED25519_V2,
    ) -> None:
        self._db = db
        self._sign_ed25519_path = sign_ed25519_path
        self._metrics = metrics if metrics is not None else Metrics()
        self._stores = stores or IdentityStores(())
        self._invites = invites
        self._outbox = outbox
        self._bindings = bindings
        self._keyring = keyring
        self._generator = generator
        self._email = email
        self._ratelimiter = ratelimiter
        self._config = config
        self._limits = limits
        self._server_name = server_name
        self._public_base_url = public_base_url.rstrip("/")
        self._expired_user_id = config.expiration.resolve_to or expired_user_id
        self._clock = clock
        # Called after a notification was queued, to wake this instance's delivery worker.
        self.on_queued: Callable[[], None] = lambda: None

    @property
    def expired_user_id(self) -> str:
        """Who expired invites are resolved to."""
        return self._expired_user_id

    async def store_invite(
        self, request: StoreInviteRequest, caller: str | None, requester_ip: str
    ) -> dict[str, Any]:
        """Store an invite, mail the invitee, and answer what the homeserver puts in the room.

        Limited per sender, per invited address and per requesting IP (the homeserver's, as
        homeservers make this call for their users). ``caller``: the authenticated user, who
        must be the sender; None for the unauthenticated v1 API (the sender is taken as given).
        """
        if request.medium != "email":
            raise MatrixError(400, "M_UNRECOGNIZED", f"Unsupported medium {request.medium!r}")
        address = parse_email(request.address)
        if address is None:
            raise MatrixError(400, "M_INVALID_EMAIL", "Invalid email address")
        if not is_room_id(request.room_id):
            raise invalid_param(
                "room_id must be a room ID: '!' then printable ASCII, at most 255 characters"
            )
        if user_id_server(request.sender) is None:
            raise invalid_param("sender must be a Matrix user ID")
        if caller is not None and request.sender != caller:
            raise forbidden("sender must be the authenticated user")
        limits: list[Event] = [
            ("store_invite_per_sender", request.sender, self._limits.store_invite_per_sender),
            ("store_invite_per_address", f"email:{address}", self._limits.store_invite_per_address),
            ("store_invite_per_ip", requester_ip, self._limits.store_invite_per_ip),
        ]
        # A sender, address or IP already known to be over its limit is refused before any mail
        # is started.
        self._ratelimiter.refuse_if_exhausted(limits)
        ephemeral = nacl.signing.SigningKey.generate()
        server_key = self._keyring.current
        details = {k: v for k, v in request.details.items() if k in DETAIL_FIELDS and v}
        invite = Invite(
            # Hex: an id never starts with "-", which a command line would take for an option.
            id=secrets.token_hex(12),
            token=secrets.token_urlsafe(32),
            medium="email",
            address=address,
            room_id=request.room_id,
            sender=request.sender,
            display_name=redact_address(
                address, self._config.redaction.local_chars, self._config.redaction.domain_chars
            ),
            ephemeral_public_key=encode_base64(bytes(ephemeral.verify_key)),
            details=details,
            created_ts=self._clock.now_ms(),
            state=PENDING,
            resolved_mxid=None,
            resolved_ts=None,
            signing_key_id=server_key.key_id,
            # The seed, as sign-ed25519 takes it back (sydent's encoding too).
            ephemeral_private_key=encode_base64(bytes(ephemeral)),
        )
        # The write (which checks the address is unbound in the same statement) and the rate
        # limits' hits go out together, so the mail's gate waits for one database round trip,
        # not two; an attempt for a bound address counts too. They run while the email is
        # rendered: the yield lets them send their queries first (a task does not start
        # before its creator awaits something).
        checks = asyncio.gather(
            self._invites.create_unless_bound(invite),
            self._ratelimiter.hit_all(limits),
            return_exceptions=True,
        )
        await asyncio.sleep(0)
        stored = False

        async def check_and_store() -> bool:
            # The email goes out while the invite is stored and the rate limit is counted; the
            # server delivers it only once both succeeded. A refusal raised here drops it.
            nonlocal stored
            created, limited = await checks
            stored = created is True
            if isinstance(limited, BaseException):
                # Over the limit: the invite written meanwhile is taken back.
                if stored:
                    stored = not await self._invites.delete_pending(invite.id)
                raise limited
            if isinstance(created, BaseException):
                raise created
            if not created:
                bound = await self._bindings.get("email", address)
                in_use = MatrixError(400, "M_THREEPID_IN_USE", "This address is already bound")
                if bound is not None:  # else unbound again since; still refused
                    in_use.extra["mxid"] = bound.mxid
                raise in_use
            return True

        try:
            message = self._invite_email(invite)
        except BaseException:
            created, _ = await checks
            if created is True:  # nothing half-written: the invite without its mail goes
                await self._invites.delete_pending(invite.id)
            raise

        try:
            await self._email.send_email(message, check_and_store())
        except NotificationError as e:
            if not stored or await self._invites.delete_pending(invite.id):  # nothing half-written
                raise MatrixError(
                    400, "M_EMAIL_SEND_ERROR", f"Failed to send the invitation email: {e}"
                ) from e
            # The address was bound while the mail was being sent: the invite is on its way to
            # the invitee's homeserver already, so the invitation stands without the email.
            log.warning("invite %s: email failed, but the address was bound meanwhile", invite.id)
        log.info("stored invite %s to room %s by %s", invite.id, invite.room_id, invite.sender)
        self._metrics.store_invites.inc()
        base = f"{self._public_base_url}/_matrix/identity/v2/pubkey"
        return {
            "token": invite.token,
            "public_keys": [
                {"public_key": server_key.public_key, "key_validity_url": f"{base}/isvalid"},
                {
                    "public_key": invite.ephemeral_public_key,
                    "key_validity_url": f"{base}/ephemeral/isvalid",
                },
            ],
            "public_key": server_key.public_key,
            "display_name": invite.display_name,
        }

    def _invite_email(self, invite: Invite) -> Any:
        details = {name: invite.details.get(name, "") for name in DETAIL_FIELDS}
        private_key = invite.ephemeral_private_key or ""
        # What the invitee's client POSTs {mxid} to (with the token and the key in the query,
        # as sydent's signurl): it signs the invite with the ephemeral key, the third-party
        # invite flow of the client-server API.
        sign_url = f"{self._public_base_url}{self._sign_ed25519_path}?" + urlencode(
            {"token": invite.token, "private_key": private_key}
        )
        values = {
            **details,
            "room_id": invite.room_id,
            "sender": invite.sender,
            "email": invite.address,
            "token": invite.token,
            "private_key": private_key,
            "sign_url": sign_url,
        }
        join_url = self._config.join_url
        for name, value in values.items():
            join_url = join_url.replace(f"{{{name}}}", quote(value, safe=""))
        return self._generator.invite_email(
            invite.address,
            sender=invite.sender,
            room_id=invite.room_id,
            token=invite.token,
            join_url=join_url,
            ephemeral_private_key=private_key,
            sign_url=sign_url,
            **details,
        )

    async def sign_ed25519(self, mxid: str, token: str, private_key: str) -> dict[str, Any]:
        """Sign ``{mxid, sender, token}`` with an invite's ephemeral private key."""
        if user_id_server(mxid) is None:
            # What is signed is put in the invitee's membership event as the user's ID.
            raise invalid_param("mxid must be a Matrix user ID")
        # Our tokens are opaque IDs; anything else is unknown without asking the database
        # (PostgreSQL refuses a NUL in a query).
        invite = await self._invites.by_token(token) if is_opaque_id(token) else None
        if invite is None:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unknown invite token")
        seed = normalise_public_key(private_key)  # same encoding rules: 32 bytes of base64
        if seed is None:
            raise invalid_param("private_key must be an unpadded base64 ed25519 seed")
        key = signedjson.key.decode_signing_key_base64("ed25519", "0", seed)
        signed: dict[str, Any] = signedjson.sign.sign_json(
            {"mxid": mxid, "sender": invite.sender, "token": token}, self._server_name, key
        )
        return signed

    async def ephemeral_key_valid(self, public_key: str) -> bool:
        """Whether ``public_key`` is the ephemeral key of a pending invite, or of a resolved one
        whose onbind the homeserver is accepting now.

        The onbind's ``signed`` block is signed with the ephemeral key only, so this answer
        decides whether the homeserver accepts it. After resolution the key is valid only while
        the onbind is in flight (claimed or tried, not yet delivered) and only for
        ``delivery.acceptance_window`` after the first check then: a repeat of the onbind later
        (an instance died before it saw the answer) is refused instead of inviting the user
        again, who may have joined meanwhile.
        """
        normalised = normalise_public_key(public_key)
        if normalised is None:
            return False
        if await self._invites.has_pending_key(normalised):
            return True
        # An imported key of the other server's (sydent keeps them apart from its invites).
        if await self._invites.has_imported_key(normalised):
            return True
        now = self._clock.now_ms()
        first_check = await self._invites.check_resolved_key(normalised, now)
        window_ms = int(float(self._config.delivery.acceptance_window) * 1000)
        return first_check is not None and now < first_check + window_ms

    def _onbind_body(
        self, invite: Invite, mxid: str, ephemeral_private_key: str | None
    ) -> dict[str, Any]:
        token_mxid = {"mxid": mxid, "token": invite.token}
        if ephemeral_private_key is not None:
            # Signed with the invite's ephemeral key only (the way sign-ed25519 signs), not with
            # the always-valid long-term key: the homeserver then accepts it only while
            # pubkey/ephemeral/isvalid says so, which is once (see ephemeral_key_valid).
            key = signedjson.key.decode_signing_key_base64("ed25519", "0", ephemeral_private_key)
            signed: dict[str, Any] = signedjson.sign.sign_json(token_mxid, self._server_name, key)
        else:
            # An invite stored before its ephemeral private key was kept: signed with the key the
            # invite was stored under (the room's invite event lists it), as before.
            signed = self._keyring.sign(token_mxid, self._server_name, invite.signing_key_id)
        body = {
            "medium": invite.medium,
            "address": invite.address,
            "mxid": mxid,
            "invites": [
                {
                    "medium": invite.medium,
                    "address": invite.address,
                    "mxid": mxid,
                    "room_id": invite.room_id,
                    "sender": invite.sender,
                    "signed": signed,
                }
            ],
        }
        # The identity service API: the request "MUST be signed with a long-term private key".
        # Homeservers read only `invites`; the signature covers the whole body.
        return self._keyring.sign(body, self._server_name, invite.signing_key_id)

    async def _resolve(self, invite: Invite, state: str, mxid: str) -> bool:
        """Resolve a pending invite and queue its onbind, atomically; False if already resolved.

        Runs inside the caller's transaction when there is one (a bind), else in its own.
        """
        destination = user_id_server(mxid)
        if destination is None:
            raise ValueError(f"cannot deliver to {mxid!r}")
        now = self._clock.now_ms()
        async with self._db.transaction():
            # Read before the resolution clears it.
            private_key = await self._invites.ephemeral_private_key(invite.id)
            if not await self._invites.resolve(invite.id, state, mxid, now):
                return False
            await self._outbox.enqueue(
                secrets.token_urlsafe(12),
                invite.id,
                destination,
                json.dumps(self._onbind_body(invite, mxid, private_key)),
                now,
            )
        log.info("invite %s resolved (%s); onbind queued for %s", invite.id, state, destination)
        return True

    async def on_bound(self, binding: Binding) -> int:
        """A 3PID was bound: resolve its pending invites to the new owner (bind's transaction)."""
        resolved = 0
        for invite in await self._invites.pending_for(binding.medium, binding.address):
            if await self._resolve(invite, BOUND, binding.mxid):
                resolved += 1
        return resolved

    def notify_queued(self) -> None:
        """Wake the delivery worker (after the transaction that queued something committed)."""
        self.on_queued()

    async def expire_due(self) -> int:
        """Resolve every pending invite older than ``invites.expiration.after``."""
        if not self._config.expiration.enabled:
            return 0
        cutoff = self._clock.now_ms() - int(self._config.expiration.after * 1000)
        expired = 0
        while True:
            batch = await self._invites.pending_created_before(cutoff, _BATCH)
            for invite in batch:
                if await self._resolve(invite, EXPIRED, self._expired_user_id):
                    expired += 1
            if len(batch) < _BATCH:
                break
        if expired:
            self.notify_queued()
        return expired

    async def expire(self, invite_id: str) -> bool:
        """Withdraw one pending invite now (admin command)."""
        invite = await self._invites.by_id(invite_id)
        if invite is None or invite.state != PENDING:
            return False
        done = await self._resolve(invite, EXPIRED, self._expired_user_id)
        if done:
            self.notify_queued()
        return done

    async def withdraw(self, invite_id: str, by: str) -> bool:
        """Withdraw one pending invite for a room member (the bot's ``withdraw``): exactly like
        an expiry, and ``by`` is noted in the same transaction for the rejection reason."""
        invite = await self._invites.by_id(invite_id)
        if invite is None or invite.state != PENDING:
            return False
        async with self._db.transaction():
            done = await self._resolve(invite, EXPIRED, self._expired_user_id)
            if done:
                await self._invites.set_withdrawn_by(invite.id, by)
        if done:
            self.notify_queued()
        return done

    async def resolve_bound(self) -> int:
        """Resolve pending invites whose 3PID is bound by now (however it got bound), or known
        to an identity store: bindings first, then the stores in their configured order."""
        resolved = 0
        while True:
            batch = await self._invites.pending_with_binding(_BATCH)
            progress = 0
            for invite, mxid in batch:
                if await self._resolve(invite, BOUND, mxid):
                    progress += 1
            resolved += progress
            if len(batch) < _BATCH or progress == 0:
                break
        if self._stores.listable:
            resolved += await self._resolve_from_copies()
        if self._stores.live:
            resolved += await self._resolve_from_live_stores()
        if resolved:
            self.notify_queued()
        return resolved

    async def _resolve_from_copies(self) -> int:
        resolved = 0
        while True:
            rows = await self._invites.pending_with_store_entry(_BATCH)
            invites = {invite.id: invite for invite, _, _ in rows}
            best = self._stores.first_by_order(
                (invite.id, store, mxid) for invite, store, mxid in rows
            )
            progress = 0
            for invite_id, mxid in best.items():
                invite = invites[invite_id]
                if user_id_server(mxid) is not None and await self._resolve(invite, BOUND, mxid):
                    progress += 1
            resolved += progress
            if len(rows) < _BATCH or progress == 0:
                return resolved

    async def _resolve_from_live_stores(self) -> int:
        resolved = 0
        after: tuple[int, str] | None = None
        while True:
            page = await self._invites.pending_page(after, _BATCH)
            if not page:
                return resolved
            found = await self._stores.find_live([(i.medium, i.address) for i in page])
            for invite in page:
                mxid = found.get((invite.medium, invite.address))
                if mxid is not None and user_id_server(mxid) is not None:
                    resolved += await self._resolve(invite, BOUND, mxid)
            if len(page) < _BATCH:
                return resolved
            after = (page[-1].created_ts, page[-1].id)

    async def retry(self, invite_id: str) -> int:
        """Make an invite's undelivered notifications due again (admin command)."""
        count = await self._outbox.requeue(invite_id, self._clock.now_ms())
        if count:
            # The operator's decision: its key may be accepted once more (a notification refused
            # after its first check, e.g. the homeserver failed after checking the key).
            await self._invites.reopen_acceptance(invite_id)
            self.notify_queued()
        return count
