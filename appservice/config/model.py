"""The configuration model. Every option here is documented in ``config.example.yaml``.

Fields marked with ``path_field()`` are file paths; relative values are resolved against the
directory of the configuration file when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def path_field(default: str | None) -> Any:
    """A file path option; relative paths are taken relative to the config file."""
    return field(default=default, metadata={"path": True})


class Duration(float):
    """A duration in seconds, written in YAML as ``30s``, ``10m``, ``12h``, ``7d`` or ``500ms``."""


@dataclass(frozen=True)
class ServerConfig:
    """Identity of this identity server."""

    # The name clients and homeservers use for this identity server (host[:port]); it signs as this
    # name and homeservers address unbind requests to it.
    name: str = "localhost:8090"
    # Other names clients use for this server (e.g. "id.example.org:443" beside "id.example.org");
    # homeservers sign unbind requests for the name their user typed.
    alternative_names: tuple[str, ...] = ()
    # The public base URL (scheme://host[:port]) of this server, used in links in messages.
    public_base_url: str = "http://localhost:8090"


@dataclass(frozen=True)
class ListenConfig:
    """The public HTTP listener (Identity Service API)."""

    host: str = "127.0.0.1"
    port: int = 8090
    tls_cert: str | None = path_field(None)
    tls_key: str | None = path_field(None)
    max_body_bytes: int = 1_048_576
    # Reverse proxies (CIDRs) whose X-Forwarded-For header tells the client's address.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the data lives."""

    url: str = "sqlite:data/identity.db"
    min_connections: int = 1
    max_connections: int = 10


@dataclass(frozen=True)
class KeysConfig:
    """The long-term ed25519 signing key."""

    signing_key_path: str = path_field("data/signing.key")


@dataclass(frozen=True)
class AccountsConfig:
    """Identity-server accounts made from OpenID tokens."""

    # Homeserver names allowed to register; empty means any homeserver.
    allowed_homeservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyDocument:
    """One language version of a policy."""

    name: str
    url: str


@dataclass(frozen=True)
class PolicyConfig:
    """A policy users must accept, in one or more languages."""

    version: str
    languages: dict[str, PolicyDocument]


@dataclass(frozen=True)
class TermsConfig:
    """Terms of service; no policies means nothing to accept."""

    policies: dict[str, PolicyConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class LookupConfig:
    """Hashed lookups."""

    algorithms: tuple[str, ...] = ("sha256",)
    max_addresses: int = 20_000
    # Rotate the pepper when it is older than this; None: only by hand (``pepper rotate``).
    pepper_rotation: Duration | None = None
    # How long lookups with the previous pepper are still answered after a rotation.
    pepper_grace: Duration = Duration(600)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class FederationConfig:
    """Outbound requests to homeservers (OpenID, keys, onbind)."""

    # Server name -> base URL, bypassing server discovery (e.g. {"example.org": "https://hs:8448"}).
    overrides: dict[str, str] = field(default_factory=dict)
    # Networks that may be reached although private or loopback (SSRF guard), e.g. ["127.0.0.0/8"].
    allowed_networks: tuple[str, ...] = ()
    ca_file: str | None = path_field(None)
    verify_tls: bool = True
    timeout: Duration = Duration(10)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class ValidationPolicyConfig:
    """Whether 3PID validation sessions are offered."""

    enabled: bool = True


@dataclass(frozen=True)
class UnbindPolicyConfig:
    """What happens when a 3PID is unbound."""

    # Email the address that it was unbound from its Matrix ID.
    notify: bool = False


@dataclass(frozen=True)
class SessionPolicyConfig:
    """Policies of validation sessions."""

    validation: ValidationPolicyConfig = field(default_factory=ValidationPolicyConfig)
    unbind: UnbindPolicyConfig = field(default_factory=UnbindPolicyConfig)


@dataclass(frozen=True)
class SessionConfig:
    """3PID validation sessions."""

    policy: SessionPolicyConfig = field(default_factory=SessionPolicyConfig)
    # A session can be validated (and used to bind) this long after its last change.
    lifetime: Duration = Duration(86400)  # noqa: RUF009 (an immutable float)
    # Wrong tokens accepted before a session is dead.
    max_attempts: int = 5
    # next_link values starting with one of these prefixes are followed even if not https://.
    next_link_allowlist: tuple[str, ...] = ()
    # Hosts an https:// next_link may lead to ("app.example.org", "*.example.org"); empty: any.
    next_link_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` events per ``period``."""

    limit: int
    period: Duration


@dataclass(frozen=True)
class RateLimitsConfig:
    """Limits kept in the database, so they hold across instances."""

    request_token_per_address: RateLimit = field(
        default_factory=lambda: RateLimit(5, Duration(3600))
    )
    request_token_per_ip: RateLimit = field(default_factory=lambda: RateLimit(30, Duration(3600)))
    store_invite_per_sender: RateLimit = field(
        default_factory=lambda: RateLimit(100, Duration(3600))
    )
    # Invites to one address (medium:address, canonical), whoever sends them.
    store_invite_per_address: RateLimit = field(
        default_factory=lambda: RateLimit(10, Duration(86400))
    )
    # store-invite is called by the homeserver: this counts a whole homeserver (its IP).
    store_invite_per_ip: RateLimit = field(default_factory=lambda: RateLimit(1000, Duration(3600)))
    # account/register (called by clients) from one IP.
    register_per_ip: RateLimit = field(default_factory=lambda: RateLimit(60, Duration(3600)))
    # Addresses looked up by the legacy v1 lookup/bulk_lookup from one IP (api.v1_enabled).
    v1_lookup_per_ip: RateLimit = field(default_factory=lambda: RateLimit(1000, Duration(3600)))
    # SMS delegate requestToken (api.msisdn_delegate) for one phone number.
    msisdn_delegate_per_number: RateLimit = field(
        default_factory=lambda: RateLimit(5, Duration(3600))
    )
    # SMS delegate requestToken from one calling address: a whole homeserver's budget.
    msisdn_delegate_per_ip: RateLimit = field(
        default_factory=lambda: RateLimit(1000, Duration(3600))
    )


@dataclass(frozen=True)
class ExpirationConfig:
    """Withdrawing 3PID invites nobody accepted."""

    enabled: bool = True
    # Pending invites older than this are resolved to resolve_to.
    after: Duration = Duration(7 * 86400)  # noqa: RUF009 (an immutable float)
    # The Matrix user expired invites are resolved to; empty: the appservice's inviteExpired user
    # (@<appservice.expired_user_localpart>:<appservice.homeserver_domain>).
    resolve_to: str = ""
    # How often to look for expired invites.
    check_interval: Duration = Duration(60)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class DeliveryConfig:
    """Durable delivery of onbind notifications to homeservers."""

    # A notification the homeserver answered with an error other than "unavailable" (e.g. 500)
    # is retried after retry_initial, doubling after each failure up to retry_max.
    retry_initial: Duration = Duration(10)  # noqa: RUF009 (an immutable float)
    retry_max: Duration = Duration(3600)  # noqa: RUF009 (an immutable float)
    # A homeserver that does not answer (network, timeout, 408/429/502/503/504) is backed off as
    # a whole and probed with one request, first after homeserver_retry_initial, doubling up to
    # homeserver_retry_max: its queue goes out at most that long after it answers again.
    homeserver_retry_initial: Duration = Duration(2)  # noqa: RUF009 (an immutable float)
    homeserver_retry_max: Duration = Duration(10)  # noqa: RUF009 (an immutable float)
    # How long a worker's claim on a notification lasts without a heartbeat (renewed every
    # third of it while the worker runs): a killed instance's notifications go out this long
    # (plus poll_interval) after it died.
    lease: Duration = Duration(10)  # noqa: RUF009 (an immutable float)
    # A notification not delivered this long after it was queued is marked failed.
    give_up_after: Duration = Duration(3 * 86400)  # noqa: RUF009 (an immutable float)
    # How often the outbox is polled (a bind on this instance wakes it at once).
    poll_interval: Duration = Duration(5)  # noqa: RUF009 (an immutable float)
    # Deliveries in flight at once per instance.
    concurrency: int = 8
    # How long an invite's ephemeral key stays valid after the homeserver first checked it during
    # the delivery of its onbind (the onbind is signed with that key only): a repeat of the onbind
    # after that (a crashed instance's notification sent again) is refused by the homeserver
    # instead of inviting the user again. Keep it well below lease.
    acceptance_window: Duration = Duration(2)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class RedactionConfig:
    """How an invited address is shown in the room (display_name): never the whole address."""

    # Characters kept from the start of the local part and of the domain (``a…@e…``).
    local_chars: int = 1
    domain_chars: int = 1


@dataclass(frozen=True)
class InvitePolicyConfig:
    """Who may invite by email, enforced by the invite proxy (see docs/invite-policy.md).

    Nothing configured here: every 3PID invite is allowed. With ``roles`` or
    ``allowed_senders`` set, a sender needs one of the roles or a matching user ID.
    """

    # Roles (from the identity stores: LDAP groups, the Synapse admin flag, static roles) of
    # which a sender needs one to invite by email.
    roles: tuple[str, ...] = ()
    # User ID patterns (Python regular expressions matching the whole ID) allowed regardless of
    # roles, e.g. "@.*:example\\.org".
    allowed_senders: tuple[str, ...] = ()
    # 3PID invites per sender per day through the proxy; 0: no limit.
    max_per_day: int = 0
    # Invitee email domains (and their subdomains) that may be invited; empty: any domain.
    allowed_domains: tuple[str, ...] = ()
    # Invitee email domains (and their subdomains) that may never be invited.
    denied_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class InvitesConfig:
    """3PID invites: store-invite, delivery on bind, expiry."""

    # Link in invite emails (template variable join_url); {room_id}, {room_alias}, every other
    # store-invite detail, {email}, {token}, {private_key} and {sign_url} are replaced
    # (URL-encoded), e.g. "https://app.element.io/#/room/{room_id}?signurl={sign_url}". Empty: no
    # link.
    join_url: str = ""
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    expiration: ExpirationConfig = field(default_factory=ExpirationConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    # How often pending invites are checked against the bindings (and identity stores), so a
    # binding that arrived another way still resolves them.
    resolution_interval: Duration = Duration(300)  # noqa: RUF009 (an immutable float)
    policy: InvitePolicyConfig = field(default_factory=InvitePolicyConfig)


@dataclass(frozen=True)
class StaticThreepid:
    """One 3PID listed in the static store."""

    medium: str
    address: str
    mxid: str


@dataclass(frozen=True)
class StaticStoreConfig:
    """The ``static`` store: mappings and roles listed here (small setups, tests)."""

    threepids: tuple[StaticThreepid, ...] = ()
    # Matrix ID -> its roles, e.g. {"@alice:example.org": ["inviters"]}.
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class SynapseStoreConfig:
    """The ``synapse`` store: 3PIDs of local users, read from Synapse's own database."""

    # Synapse's database, read only: postgresql://user@host/synapse or sqlite:/path/homeserver.db.
    database_url: str = ""
    # Which 3PIDs count: only those "bound" to an identity server (Synapse's
    # user_threepid_id_server table), or "all" the user added to their account.
    threepids: str = "bound"
    # With threepids: bound, only bindings to this identity server name; empty: to any.
    id_server: str = ""
    # The role given to Synapse server admins (for the invite policy); empty: none.
    admin_role: str = "admin"
    # The homeserver's server name (the domain of its user IDs); empty:
    # appservice.homeserver_domain.
    server_name: str = ""


@dataclass(frozen=True)
class LdapStoreConfig:
    """The ``ldap`` store: people in an LDAP directory or Active Directory (ldap3)."""

    # ldap://host:389 or ldaps://host:636 (ldaps is TLS from the start).
    uri: str = "ldap://localhost:389"
    # Upgrade an ldap:// connection with StartTLS.
    start_tls: bool = False
    # CA certificates to verify the directory's TLS certificate with; empty: the system's.
    ca_file: str | None = path_field(None)
    # Simple bind; both empty: anonymous.
    bind_dn: str = ""
    bind_password: str = ""
    # Where people are searched.
    base_dn: str = ""
    # Which entries are people (suits OpenLDAP's inetOrgPerson and Active Directory users).
    user_filter: str = "(|(objectClass=inetOrgPerson)(&(objectCategory=person)(objectClass=user)))"
    # Attributes holding the Matrix localpart; the first one an entry has is used (uid for
    # OpenLDAP, sAMAccountName for Active Directory).
    localpart_attributes: tuple[str, ...] = ("uid", "sAMAccountName")
    # Attributes holding email addresses and phone numbers.
    mail_attributes: tuple[str, ...] = ("mail",)
    phone_attributes: tuple[str, ...] = ("telephoneNumber", "mobile")
    # Phone numbers written without +country code are read in this region (e.g. "DE"); empty:
    # such numbers are skipped.
    default_region: str = ""
    # The attribute listing an entry's groups (memberOf, on AD and OpenLDAP's memberof overlay),
    # and the attribute of the group's DN whose value is the role name.
    group_attribute: str = "memberOf"
    group_role_attribute: str = "cn"
    # Also find groups by searching here for groups with a member/uniqueMember naming the person
    # (for directories without memberOf); empty: only group_attribute.
    group_base_dn: str = ""
    group_filter: str = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
    # The homeserver's server name for the user IDs; empty: appservice.homeserver_domain.
    server_name: str = ""
    # Limit for connecting and for each operation (whole seconds, rounded up).
    timeout: Duration = Duration(10)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class RestStoreConfig:
    """The ``rest`` store: a backend of your own (its JSON contract: docs/identity-stores.md)."""

    # Base URL of the backend, e.g. https://directory.example.org/matrix-identity.
    base_url: str = ""
    # Sent as "Authorization: Bearer <token>" when set.
    token: str = ""
    # The backend also answers GET <base_url>/threepids (all entries, paged), so its entries are
    # mirrored and hashed lookups find them.
    listable: bool = False
    # The backend also answers POST <base_url>/roles (for the invite policy).
    roles: bool = False
    # How long one request to the backend may take in all; a backend that does not answer in
    # time counts as failed for that lookup (the next store is asked).
    timeout: Duration = Duration(5)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class StoresConfig:
    """Identity stores: where lookups and invite resolution find people besides our bindings."""

    # The stores in use, in priority order (the first that knows a 3PID wins), from synapse,
    # ldap, rest, static. Our own bindings always come first. Empty: bindings only.
    order: tuple[str, ...] = ()
    # How often listable stores are copied (with lookup hashes) for hashed lookups.
    sync_interval: Duration = Duration(300)  # noqa: RUF009 (an immutable float)
    synapse: SynapseStoreConfig = field(default_factory=SynapseStoreConfig)
    ldap: LdapStoreConfig = field(default_factory=LdapStoreConfig)
    rest: RestStoreConfig = field(default_factory=RestStoreConfig)
    static: StaticStoreConfig = field(default_factory=StaticStoreConfig)


@dataclass(frozen=True)
class AppserviceListenConfig:
    """The private listener the homeserver sends transactions to."""

    host: str = "127.0.0.1"
    port: int = 8091


@dataclass(frozen=True)
class AppserviceConfig:
    """The application service side: the users it controls on the homeserver."""

    # Unique id of this application service on the homeserver.
    id: str = "identity-appservice"
    # Tokens shared with the homeserver (generate-registration creates them). Both empty: the
    # application service is off (invites still expire, but nobody rejects them).
    as_token: str = ""
    hs_token: str = ""
    # The homeserver's client-server API, e.g. http://127.0.0.1:8008.
    homeserver_url: str = "http://127.0.0.1:8008"
    # The homeserver's server name (the domain part of its user IDs).
    homeserver_domain: str = "localhost"
    # How the homeserver reaches listen below (the registration's url).
    url: str = "http://127.0.0.1:8091"
    listen: AppserviceListenConfig = field(default_factory=AppserviceListenConfig)
    # Localpart of the appservice's bot user (the registration's sender_localpart).
    bot_localpart: str = "_identity_bot"
    # What a room message must start with to be a command for the bot (docs/room-admins.md).
    bot_command_prefix: str = "!3pid"
    # When an invite in a room the bot is in expires: the bot also posts an m.notice saying so.
    bot_expiry_notice: bool = False
    # Localpart of the user that expired invites are resolved to; the appservice rejects them.
    expired_user_localpart: str = "_identity_invite_expired"
    # Instead of rejecting an expired invite with a reason: join, post the reason as m.notice,
    # then leave.
    post_notice: bool = False
    # Also accept hs_token as ?access_token= (Synapse's use_appservice_legacy_authorization).
    legacy_query_auth: bool = False

    @property
    def enabled(self) -> bool:
        """Whether the application service runs (tokens are configured)."""
        return bool(self.as_token and self.hs_token)

    @property
    def expired_user_id(self) -> str:
        """The inviteExpired user's Matrix ID."""
        return f"@{self.expired_user_localpart}:{self.homeserver_domain}"

    @property
    def bot_user_id(self) -> str:
        """The bot's Matrix ID."""
        return f"@{self.bot_localpart}:{self.homeserver_domain}"


@dataclass(frozen=True)
class SmtpConfig:
    """The SMTP server that sends email."""

    host: str = "localhost"
    port: int = 25
    # none (plain), starttls (upgrade after connecting) or tls (implicit TLS, usually port 465).
    security: str = "none"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = path_field(None)
    timeout: Duration = Duration(10)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class EmailConfig:
    """How email is sent."""

    # smtp, or log (development: messages are written to the log, nothing is sent).
    connector: str = "log"
    # The From: header of every message.
    sender: str = "Matrix identity server <noreply@localhost>"
    smtp: SmtpConfig = field(default_factory=SmtpConfig)


@dataclass(frozen=True)
class TwilioConfig:
    """Twilio's Messages API."""

    account_sid: str = ""
    auth_token: str = ""
    # Send from this number (E.164, e.g. +15005550006) or through a messaging service.
    from_number: str = ""
    messaging_service_sid: str = ""
    base_url: str = "https://api.twilio.com"
    timeout: Duration = Duration(10)  # noqa: RUF009 (an immutable float)


@dataclass(frozen=True)
class SmsConfig:
    """How SMS are sent."""

    # twilio, or log (development).
    connector: str = "log"
    twilio: TwilioConfig = field(default_factory=TwilioConfig)


@dataclass(frozen=True)
class NotificationsConfig:
    """Messages to users: templates and how they are delivered."""

    # A directory whose files override the built-in templates of the same name.
    templates_dir: str | None = path_field(None)
    # The service name shown in messages and pages.
    brand: str = "Matrix identity server"
    email: EmailConfig = field(default_factory=EmailConfig)
    sms: SmsConfig = field(default_factory=SmsConfig)


@dataclass(frozen=True)
class MsisdnDelegateConfig:
    """Being a homeserver's SMS delegate (Synapse's ``account_threepid_delegates.msisdn``)."""

    enabled: bool = True
    # Networks (CIDRs) of the homeservers allowed to call the delegate paths; empty: anyone.
    allowed_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ApiConfig:
    """Which API generations are served."""

    v1_enabled: bool = False
    msisdn_delegate: MsisdnDelegateConfig = field(default_factory=MsisdnDelegateConfig)


@dataclass(frozen=True)
class LoggingConfig:
    """Logging."""

    level: str = "INFO"
    # text (one readable line per event) or json (one JSON object per line).
    format: str = "text"
    # Levels of single loggers, e.g. {"appservice.federation": "DEBUG"}.
    levels: dict[str, str] = field(default_factory=dict)
    # A YAML file in Python's logging dictConfig schema that replaces the settings above.
    config: str | None = path_field(None)


@dataclass(frozen=True)
class MetricsListenConfig:
    """The private listener serving Prometheus /metrics."""

    host: str = "127.0.0.1"
    port: int = 9101


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics, on a listener of their own (never the public one)."""

    enabled: bool = False
    listen: MetricsListenConfig = field(default_factory=MetricsListenConfig)


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    terms: TermsConfig = field(default_factory=TermsConfig)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    stores: StoresConfig = field(default_factory=StoresConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    ratelimits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    invites: InvitesConfig = field(default_factory=InvitesConfig)
    appservice: AppserviceConfig = field(default_factory=AppserviceConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
