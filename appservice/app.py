"""The composition root: builds storage, keys, services and web apps from the config."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import re
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from appservice.api import (
    account,
    bind,
    invite_proxy,
    invites,
    keys,
    lookup,
    msisdn_delegate,
    status,
    terms,
    v1,
    validation,
)
from appservice.api.context import ApiContext
from appservice.api.http import (
    SERVER_LOG,
    RedactingAccessLogger,
    RequestTracker,
    matrix_middleware,
)
from appservice.clock import Clock
from appservice.config import Config
from appservice.crypto.signing import KeyRing
from appservice.db.accounts import AccountStore
from appservice.db.appservice import AppserviceStore
from appservice.db.bindings import BindingStore
from appservice.db.database import AppDatabase
from appservice.db.destinations import DestinationStore
from appservice.db.invites import InviteStore
from appservice.db.lookup_peppers import PepperStore
from appservice.db.outbox import PENDING as OUTBOX_PENDING
from appservice.db.outbox import OutboxStore
from appservice.db.ratelimits import RateLimitStore
from appservice.db.server_state import ServerStateStore
from appservice.db.sessions import SessionStore
from appservice.db.signing_keys import SigningKeyStore
from appservice.db.store_threepids import StoreThreepidStore
from appservice.db.terms import TermsStore
from appservice.errors import StartupError
from appservice.federation.client import FederationClient
from appservice.federation.openid import fetch_openid_user
from appservice.federation.server_keys import ServerKeyFetcher
from appservice.federation.xmatrix import verify_x_matrix
from appservice.identity_stores.factory import build_identity_stores
from appservice.jobs.periodic import PeriodicJob
from appservice.jobs.purge import purge_expired
from appservice.metrics import CONTENT_TYPE_LATEST, Metrics
from appservice.notifications.connectors import (
    CountedEmailConnector,
    CountedSmsConnector,
    build_email_connector,
    build_sms_connector,
)
from appservice.notifications.generator import MessageGenerator
from appservice.services.accounts import AccountService, OpenIdVerifier
from appservice.services.bindings import BindingService
from appservice.services.database_gauges import DatabaseGauges
from appservice.services.delivery import OnbindDelivery
from appservice.services.expired_invites import ExpiredInviteService
from appservice.services.health import HealthCheck
from appservice.services.invite_policy import InvitePolicyService
from appservice.services.invites import SIGN_ED25519_V1, SIGN_ED25519_V2, InviteService
from appservice.services.keys import KeyService
from appservice.services.lookup import LookupService
from appservice.services.pepper_rotation import CHECK_INTERVAL_S, PepperRotation
from appservice.services.ratelimits import RateLimiter
from appservice.services.sessions import SessionService
from appservice.services.store_sync import StoreSyncService
from appservice.services.terms import TermsService

if TYPE_CHECKING:
    from appservice.matrix.actions import RoomActionWorker
    from appservice.matrix.appservice import IdentityAppService

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 3600.0
ACTIONS_POLL_S = 5.0
REGISTRATION_RETRY_S = 30.0
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def listen_error(setting: str, host: str, port: int, error: OSError) -> StartupError:
    """One line for a listener that cannot bind: the address, the setting, the cause."""
    if isinstance(error, socket.gaierror):
        reason = f"cannot resolve the host ({error.strerror})"
    elif error.errno == errno.EADDRINUSE:
        reason = "the address is already in use (another process listens there)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = "no network interface of this machine has that address"
    elif error.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
    else:
        reason = error.strerror or str(error)
    return StartupError(f"{setting}: cannot listen on {host}:{port}: {reason}")


def load_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The public listener's TLS context; a missing or malformed file is a :class:`StartupError`
    naming the file and its setting (never a prompt for a key's password)."""
    contents: dict[str, bytes] = {}
    for setting, path in (("listen.tls_cert", cert), ("listen.tls_key", key)):
        try:
            contents[setting] = Path(path).read_bytes()
        except OSError as e:
            raise StartupError(f"{setting}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in contents["listen.tls_cert"]:
        raise StartupError(f"listen.tls_cert: {cert} is not a PEM certificate")
    key_text = contents["listen.tls_key"]
    if not _PEM_KEY.search(key_text):
        raise StartupError(f"listen.tls_key: {key} is not a PEM private key")
    if b"ENCRYPTED" in key_text:
        raise StartupError(f"listen.tls_key: {key} is encrypted; give the key without a password")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise StartupError(
            f"listen.tls_cert: cannot use {cert} with the key {key} (listen.tls_key): {e}"
        ) from None
    return ctx


class IdentityServer:
    """One running instance: database, key ring, services and the public web app."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        verify_openid: OpenIdVerifier | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or Clock()
        # The Prometheus families of this server (a registry of its own, not the global one).
        self.metrics = Metrics()
        self.db = AppDatabase(
            config.database.url, config.database.min_connections, config.database.max_connections
        )
        # Loaded (or, on a fresh deployment, created) by open(), checked against the database.
        self.keyring = KeyRing(Path(config.keys.signing_key_path))
        fed = config.federation
        try:
            self.federation = FederationClient(
                overrides=fed.overrides,
                allowed_networks=fed.allowed_networks,
                ca_file=fed.ca_file,
                verify_tls=fed.verify_tls,
                timeout_s=float(fed.timeout),
            )
        except OSError as e:  # ssl.SSLError too: a file without a PEM certificate
            raise StartupError(
                f"federation.ca_file: cannot load {fed.ca_file}: {e.strerror or e}"
            ) from None
        self.bindings = BindingStore(self.db)
        self.stores = build_identity_stores(config)
        if self.stores.live and "none" not in config.lookup.algorithms:
            log.warning(
                "stores %s cannot be listed, so hashed lookups cannot ask them; add none to "
                "lookup.algorithms for plain v2 lookups to reach them",
                ", ".join(store.name for store in self.stores.live),
            )
        store_copies = StoreThreepidStore(self.db)
        self.ratelimiter = RateLimiter(RateLimitStore(self.db), self.clock, self.metrics)
        self.accounts = AccountService(
            AccountStore(self.db),
            verify_openid or functools.partial(fetch_openid_user, self.federation),
            self.clock,
            config.accounts.allowed_homeservers,
            ratelimiter=self.ratelimiter,
            register_limit=config.ratelimits.register_per_ip,
        )
        self.terms = TermsService(config.terms, TermsStore(self.db), self.clock)
        peppers = PepperStore(self.db)
        self.lookup = LookupService(
            self.bindings,
            ServerStateStore(self.db),
            self.keyring,
            config.server.name,
            config.lookup,
            self.clock,
            stores=self.stores,
            copies=store_copies,
            ratelimiter=self.ratelimiter,
            v1_limit=config.ratelimits.v1_lookup_per_ip,
            peppers=peppers,
            metrics=self.metrics,
        )
        self.pepper_rotation = PepperRotation(
            peppers, config.lookup, self.clock, on_switched=self.lookup.refresh_pepper
        )
        # Also resumes a rotation whose instance (or `pepper rotate`) stopped midway.
        self.pepper_rotation_job = PeriodicJob(
            "pepper-rotation", CHECK_INTERVAL_S, self.pepper_rotation.rotate_due
        )
        self.keys = KeyService(self.keyring, SigningKeyStore(self.db), self.clock)
        notifications = config.notifications
        self.generator = MessageGenerator(
            notifications.templates_dir,
            notifications.brand,
            config.server.name,
            config.server.public_base_url,
        )
        self.email = CountedEmailConnector(build_email_connector(notifications.email), self.metrics)
        self.sms = CountedSmsConnector(build_sms_connector(notifications.sms), self.metrics)
        self.sessions = SessionService(
            SessionStore(self.db),
            self.generator,
            self.email,
            self.sms,
            self.ratelimiter,
            config.session,
            config.ratelimits,
            self.clock,
            self.metrics,
        )
        invite_store = InviteStore(self.db)
        outbox = OutboxStore(self.db)
        self.invites = InviteService(
            self.db,
            invite_store,
            outbox,
            self.bindings,
            self.keyring,
            self.generator,
            self.email,
            self.ratelimiter,
            config.invites,
            config.ratelimits,
            server_name=config.server.name,
            public_base_url=config.server.public_base_url,
            expired_user_id=config.appservice.expired_user_id,
            clock=self.clock,
            stores=self.stores,
            metrics=self.metrics,
            sign_ed25519_path=SIGN_ED25519_V1 if config.api.v1_enabled else SIGN_ED25519_V2,
        )
        self.invite_policy = InvitePolicyService(
            config.invites.policy,
            self.stores,
            self.ratelimiter,
            config.appservice.homeserver_url,
        )
        delivery = config.invites.delivery
        self.delivery = OnbindDelivery(
            outbox,
            self.federation,
            delivery,
            self.clock,
            destinations=DestinationStore(self.db),
            metrics=self.metrics,
        )
        self.delivery_job = PeriodicJob(
            "onbind-delivery", float(delivery.poll_interval), self.delivery.deliver_due
        )
        self.invites.on_queued = self.delivery_job.wake
        self.expiry_job = PeriodicJob(
            "invite-expiry",
            float(config.invites.expiration.check_interval),
            self.invites.expire_due,
        )
        self.resolution_job = PeriodicJob(
            "invite-resolution",
            float(config.invites.resolution_interval),
            self.invites.resolve_bound,
        )
        self.store_sync = StoreSyncService(
            self.stores,
            store_copies,
            self.lookup.pepper_state,
            float(config.stores.sync_interval),
            self.clock,
            self.metrics,
        )
        # Checked often, so a failed or due sync is picked up soon by whichever instance is free;
        # each store is copied once per sync_interval (a lease in the database).
        self.store_sync_job = PeriodicJob(
            "store-sync", min(60.0, float(config.stores.sync_interval)), self.store_sync.sync_due
        )
        # New store entries may resolve pending invites: check at once.
        self.store_sync.on_changed = self.resolution_job.wake
        self.keys.set_ephemeral_check(self.invites.ephemeral_key_valid)
        self.appservice_store = AppserviceStore(self.db)
        self.expired_invites = ExpiredInviteService(
            self.db,
            self.appservice_store,
            invite_store,
            self.generator,
            self.clock,
            expired_user_id=self.invites.expired_user_id,
            expire_after_s=float(config.invites.expiration.after),
        )
        self.matrix: IdentityAppService | None = None
        self.action_worker: RoomActionWorker | None = None
        self.appservice_status: dict[str, Any] = {"enabled": config.appservice.enabled}
        self.health_check = HealthCheck(self.db, self.appservice_status)
        self.database_gauges = DatabaseGauges(
            self.db, invite_store, outbox, self.metrics, self.clock
        )
        self.metrics.add_scrape_hook(self.database_gauges.refresh)
        # Request ids and the requests in flight of the public listener.
        self.requests = RequestTracker()
        self.actions_job: PeriodicJob | None = None
        self.registration_job: PeriodicJob | None = None
        self.key_fetcher = ServerKeyFetcher(self.federation, self.clock.time)
        own_names = (config.server.name, *config.server.alternative_names)
        self.binding_service = BindingService(
            self.db,
            self.bindings,
            self.sessions,
            self.lookup,
            functools.partial(verify_x_matrix, self.key_fetcher, own_names=own_names),
            self.generator,
            self.email,
            self.clock,
            notify_unbind=config.session.policy.unbind.notify,
            on_bound=[self.invites.on_bound],
            after_bound=[self.invites.notify_queued],
        )
        self.purge_job = PeriodicJob(
            "purge",
            PURGE_INTERVAL_S,
            functools.partial(
                purge_expired, self.sessions, self.ratelimiter, self.expired_invites, invite_store
            ),
        )
        self.jobs: list[PeriodicJob] = [
            self.purge_job,
            self.delivery_job,
            self.expiry_job,
            self.resolution_job,
            self.store_sync_job,
            self.pepper_rotation_job,
        ]
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._tls: ssl.SSLContext | None = None
        self._db_open = False

    async def open(self) -> None:
        """Connect, migrate and load shared state, without serving or background jobs."""
        await self.db.start()
        self._db_open = True
        applied = await self.db.migrate()
        if applied:
            log.info("database migrated to version %d", applied[-1])
        if self.config.appservice.enabled:
            from mautrix.appservice.state_store.asyncpg import PgASStateStore

            await self.db.run_locked(PgASStateStore.upgrade_table.upgrade)
        await self.keys.start()
        await self.lookup.start()

    async def start(self) -> None:
        """Open, then start the background jobs (and the appservice); call before serving."""
        try:
            await self.open()
            await self.stores.start()
            if self.config.appservice.enabled:
                await self._start_appservice()
        except BaseException:
            # Close what was opened (the SQLite worker thread would keep the process alive, e.g.
            # after a migration refused a newer schema).
            await self.stop()
            raise
        for job in self.jobs:
            job.start()

    async def stop(self) -> None:
        """Stop serving and close every connection; logs what it finished and what is left."""
        summary: list[str] = []
        if self._runner is not None:
            in_flight, cancelled = self.requests.in_flight, self.requests.cancelled
            log.info("stopping: no new connections; %d request(s) in flight", in_flight)
            await self._runner.cleanup()
            self._runner = None
            cut_off = self.requests.cancelled - cancelled
            summary.append(
                f"{in_flight - cut_off} request(s) in flight finished"
                + (f", {cut_off} cut off" if cut_off else "")
            )
        # Queue workers start nothing new from here on; what they claimed and did not start is
        # given back below, so that another instance (or the next start) takes it at once.
        self.delivery.stop_claiming()
        if self.action_worker is not None:
            self.action_worker.stop_claiming()
        stopped: list[str] = []
        for job in self.jobs:
            if job.running:
                finished = await job.stop()
                stopped.append(job.name if finished else f"{job.name} (cancelled mid-run)")
        if stopped:
            summary.append(f"background jobs stopped: {', '.join(stopped)}")
        if self.matrix is not None:
            await self.matrix.stop()
            self.matrix = None
            summary.append("appservice listener stopped")
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._db_open:  # count what the next start (of any instance) will deliver
            released = await self._release_claims()
            if released:
                summary.append(released)
            summary.append(await self._onbind_left())
            self._db_open = False
        await self.email.close()
        await self.sms.close()
        await self.federation.close()
        await self.invite_policy.close()
        await self.stores.close()
        await self.db.stop()
        if summary:
            log.info("stopped: %s", "; ".join(summary))

    async def _release_claims(self) -> str:
        """Give back the rows this instance's workers claimed and did not finish."""
        try:
            onbinds = await asyncio.wait_for(self.delivery.release_claims(), 5.0)
            actions = 0
            if self.action_worker is not None:
                actions = await asyncio.wait_for(self.action_worker.release_claims(), 5.0)
        except Exception as e:  # stopping anyway: their leases run out soon
            return f"claims not released ({type(e).__name__}: {e}); their leases run out"
        if not onbinds and not actions:
            return ""
        return f"released {onbinds} claimed onbind notification(s) and {actions} room action(s)"

    async def _onbind_left(self) -> str:
        try:
            counts = await asyncio.wait_for(OutboxStore(self.db).count_by_state(), 5.0)
        except Exception as e:  # stopping anyway: say what could not be counted
            return f"onbind notifications not counted ({type(e).__name__}: {e})"
        pending = counts.get(OUTBOX_PENDING, 0)
        return f"{pending} onbind notification(s) still pending for the next start"

    async def _start_appservice(self) -> None:
        """Start the private appservice listener, its action worker and user registration."""
        # mautrix's appservice side is imported only when it is enabled (0.3 s of start-up).
        from mautrix.types import UserID

        from appservice.matrix.actions import RoomActionWorker
        from appservice.matrix.appservice import IdentityAppService
        from appservice.matrix.bot import RoomBot, bot_action_for
        from appservice.matrix.state_store import RoomStateStore
        from appservice.services.room_invites import RoomInviteCommands

        config = self.config.appservice
        matrix = IdentityAppService(
            config,
            RoomStateStore(self.db.db),
            self.expired_invites.handle_transaction,
            self.metrics,
        )
        try:
            await matrix.start(config.listen.host, config.listen.port)
        except OSError as e:
            await matrix.stop()
            raise listen_error(
                "appservice.listen", config.listen.host, config.listen.port, e
            ) from None
        self.matrix = matrix
        log.info("appservice listening on %s:%d", config.listen.host, config.listen.port)
        expiration = self.config.invites.expiration
        our_users = frozenset({matrix.bot_mxid, self.invites.expired_user_id})
        bot = RoomBot(
            RoomInviteCommands(
                InviteStore(self.db),
                self.invites,
                float(expiration.after) if expiration.enabled else None,
            ),
            self.appservice_store,
            self.db,
            self.clock,
            prefix=config.bot_command_prefix,
            our_users=our_users,
        )
        self.expired_invites.bot_user_id = matrix.bot_mxid
        self.expired_invites.bot_action_for = lambda event: bot_action_for(
            event, matrix.bot_mxid, our_users, config.bot_command_prefix
        )
        self.expired_invites.post_expiry_notice = config.bot_expiry_notice
        self.action_worker = worker = RoomActionWorker(
            self.appservice_store,
            lambda user_id: matrix.intent.user(UserID(user_id)),
            self.clock,
            post_notice=config.post_notice,
            metrics=self.metrics,
            performers=bot.performers(),
        )
        self.actions_job = PeriodicJob("appservice-actions", ACTIONS_POLL_S, worker.perform_due)
        self.expired_invites.on_recorded = self.actions_job.wake
        self.registration_job = PeriodicJob(
            "appservice-registration", REGISTRATION_RETRY_S, self._register_users
        )
        self.jobs += [self.actions_job, self.registration_job]

    async def _register_users(self) -> None:
        """Register the bot and the inviteExpired user, then ping the homeserver (retried)."""
        if self.matrix is None or self.appservice_status.get("ping") == "ok":
            return
        from mautrix.types import UserID

        matrix = self.matrix
        try:
            await matrix.intent.ensure_registered()
            await matrix.intent.user(UserID(self.invites.expired_user_id)).ensure_registered()
            duration_ms = await matrix.ping_self()
        except Exception as e:  # homeserver not up yet, or refusing: retried later
            self.appservice_status.update(ping="failed", error=f"{type(e).__name__}: {e}")
            log.warning("appservice: homeserver not reachable yet: %s", e)
            return
        self.appservice_status.update(ping="ok", duration_ms=duration_ms)
        self.appservice_status.pop("error", None)
        log.info("appservice: users registered; homeserver ping round trip %d ms", duration_ms)

    async def health(self) -> dict[str, Any]:
        """What ``/health`` and ``/health/ready`` report (see :class:`HealthCheck`)."""
        return await self.health_check.readiness()

    def public_app(self) -> web.Application:
        """The Identity Service API web application."""
        app = web.Application(
            middlewares=[
                self.requests.middleware,
                self.metrics.http_middleware("public"),
                matrix_middleware,
            ],
            client_max_size=self.config.listen.max_body_bytes,
        )
        ctx = ApiContext(
            accounts=self.accounts,
            terms=self.terms,
            lookup=self.lookup,
            keys=self.keys,
            sessions=self.sessions,
            bindings=self.binding_service,
            invites=self.invites,
            health=self.health,
            render_page=self.generator.page,
            trusted_proxies=[
                ipaddress.ip_network(n, strict=False) for n in self.config.listen.trusted_proxies
            ],
            v1_enabled=self.config.api.v1_enabled,
            msisdn_delegate_enabled=self.config.api.msisdn_delegate.enabled,
            msisdn_delegate_networks=[
                ipaddress.ip_network(n, strict=False)
                for n in self.config.api.msisdn_delegate.allowed_networks
            ],
            invite_policy=self.invite_policy,
        )
        status.add_routes(app.router, ctx)
        account.add_routes(app.router, ctx)
        terms.add_routes(app.router, ctx)
        lookup.add_routes(app.router, ctx)
        keys.add_routes(app.router, ctx, "/_matrix/identity/v2")
        validation.add_routes(app.router, ctx)
        bind.add_routes(app.router, ctx)
        invites.add_routes(app.router, ctx)
        invite_proxy.add_routes(app.router, ctx)
        v1.add_routes(app.router, ctx)  # the key paths always, the lookups if enabled
        # The v1 msisdn validation paths, for the SMS delegate or v1 (the one place for them).
        msisdn_delegate.add_routes(app.router, ctx)
        return app

    def tls_context(self) -> ssl.SSLContext | None:
        """The public listener's TLS context (loaded once), None without ``listen.tls_cert``."""
        listen = self.config.listen
        if listen.tls_cert is None or listen.tls_key is None:
            return None
        if self._tls is None:
            self._tls = load_tls_context(listen.tls_cert, listen.tls_key)
        return self._tls

    async def serve(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Start listening; returns the bound address (port 0 picks a free port)."""
        self._runner = web.AppRunner(
            self.public_app(),
            access_log_class=RedactingAccessLogger,
            logger=SERVER_LOG,
            handle_signals=False,
        )
        await self._runner.setup()
        # Given explicitly, the address comes from --listen.
        setting = "listen.host/listen.port" if host is None and port is None else "--listen"
        host = host or self.config.listen.host
        port = self.config.listen.port if port is None else port
        site = web.TCPSite(self._runner, host, port, ssl_context=self.tls_context())
        try:
            await site.start()
        except OSError as e:
            raise listen_error(setting, host, port, e) from None
        bound_host, bound_port = self._runner.addresses[-1][:2]
        scheme = "https" if self.config.listen.tls_cert else "http"
        log.info("identity server listening on %s://%s:%d", scheme, bound_host, bound_port)
        return str(bound_host), int(bound_port)

    def metrics_app(self) -> web.Application:
        """The private metrics web app: GET /metrics, the Prometheus text exposition."""

        async def scrape(request: web.Request) -> web.Response:
            body = await self.metrics.exposition()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        return app

    async def serve_metrics(self, port: int | None = None) -> tuple[str, int]:
        """Start the metrics listener (metrics.listen); returns the bound address."""
        listen = self.config.metrics.listen
        port = listen.port if port is None else port
        self._metrics_runner = web.AppRunner(self.metrics_app(), access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, listen.host, port)
        try:
            await site.start()
        except OSError as e:
            raise listen_error(
                "metrics.listen.host/metrics.listen.port", listen.host, port, e
            ) from None
        bound_host, bound_port = self._metrics_runner.addresses[-1][:2]
        log.info("metrics listening on http://%s:%d/metrics", bound_host, bound_port)
        return str(bound_host), int(bound_port)


async def run_forever(server: IdentityServer, host: str | None, port: int | None) -> None:
    """Start, serve until cancelled (SIGINT/SIGTERM), then stop cleanly."""
    server.tls_context()  # unusable TLS files stop start-up before the database is touched
    await server.start()
    try:
        await server.serve(host, port)
        if server.config.metrics.enabled:
            await server.serve_metrics()
        await asyncio.Event().wait()
    finally:
        await server.stop()
