"""Load YAML over the defaults into the typed model, naming the key path of any mistake."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, urlsplit

import yaml

from appservice.config.model import Config, Duration, RateLimit
from appservice.threepid import is_localpart

log = logging.getLogger(__name__)

ENV_PREFIX = "APPSERVICE_"
# Variables with the prefix that are not options (read elsewhere, or by the test suite).
OTHER_ENV_NAMES = frozenset({"APPSERVICE_MIGRATIONS_DIR", "APPSERVICE_TEST_POSTGRES"})
# The shortest pause of a background loop (a zero interval would poll without pause).
MIN_INTERVAL_S = 0.1

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}

T = TypeVar("T")


# Tokens of the committed example registration.yaml; a server must never run with them.
PLACEHOLDER_TOKENS = frozenset({"CHANGE_ME_as_token", "CHANGE_ME_hs_token"})


class ConfigError(Exception):
    """A configuration mistake; ``str()`` is one line naming the key path."""


def parse_duration(value: Any, path: str) -> Duration:
    """Parse ``30s``/``10m``/``7d``/``500ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: {value!r} is not a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value!r} is not a duration")
        if value < 0:
            raise ConfigError(f"{path}: {value!r} is negative")
        return Duration(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return Duration(float(match.group(1)) * _UNITS[match.group(2)])
    raise ConfigError(f'{path}: "{value}" is not a duration (use e.g. 30s, 10m, 12h, 7d)')


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        return _convert(non_none[0], value, path)
    if tp is Duration:
        return parse_duration(value, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, path)
    if origin is tuple:
        (item_type, _ellipsis) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return tuple(_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _key_type, item_type = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(item_type, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{path}: unsupported option type {_type_name(tp)}")  # pragma: no cover


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return repr(value)


def _build(cls: type[T], data: Any, path: str) -> T:
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown option")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{prefix}{name}")
        elif (
            fields[name].default is dataclasses.MISSING
            and fields[name].default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{prefix}{name}: missing required option")
    return cls(**kwargs)


def _env_overrides(
    cls: type, environ: Mapping[str, str], path: tuple[str, ...], known: set[str] | None = None
) -> dict[str, Any]:
    """Collect ``APPSERVICE_SECTION_KEY`` variables for scalar options as a nested mapping;
    ``known`` collects the name of every option's variable."""
    result: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key_path = (*path, f.name)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            nested = _env_overrides(tp, environ, key_path, known)
            if nested:
                result[f.name] = nested
            continue
        env_name = ENV_PREFIX + "_".join(key_path).upper()
        if known is not None:
            known.add(env_name)
        if env_name in environ:
            raw = environ[env_name]
            # Scalars arrive as strings; let YAML type them (numbers, booleans) as in the file.
            result[f.name] = yaml.safe_load(raw) if raw.strip() else raw
            if _is_str_type(tp) and not isinstance(result[f.name], str):
                result[f.name] = raw
    return result


def _warn_unknown_env(environ: Mapping[str, str], known: set[str]) -> None:
    """A misspelt variable would be ignored silently: name it, and the option it likely meant."""
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_ENV_NAMES:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("environment variable %s is not a configuration option, ignored%s", name, hint)


def _is_str_type(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return str in get_args(tp)
    return False


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _resolve_paths(obj: Any, base_dir: Path) -> Any:
    """Make path options (and a relative SQLite URL) absolute against ``base_dir``."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("path") and isinstance(value, str) and value:
            changes[f.name] = str((base_dir / value).resolve())
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _resolve_paths(value, base_dir)
    url = getattr(obj, "url", None)
    if isinstance(url, str) and url.startswith("sqlite:"):
        db_path = url.removeprefix("sqlite:").removeprefix("//")
        if db_path and db_path != ":memory:" and not db_path.startswith("/"):
            changes["url"] = "sqlite:" + str((base_dir / db_path).resolve())
    return dataclasses.replace(obj, **changes) if changes else obj


def load_config_text(text: str, base_dir: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Load a configuration from YAML text; relative paths are resolved against ``base_dir``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: not valid YAML{where}") from e
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("config: the top level must be a mapping")
    environ = os.environ if environ is None else environ
    known: set[str] = set()
    env = _env_overrides(Config, environ, (), known)
    _warn_unknown_env(environ, known)
    config = _build(Config, _merge(dict(data), env), "")
    _validate(config)
    resolved: Config = _resolve_paths(config, base_dir)
    return resolved


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from e
    return load_config_text(text, path.parent.resolve(), environ)


def _is_database_url(url: str) -> bool:
    return url.startswith(("sqlite:", "postgres://", "postgresql://"))


def _names_postgres_database(url: str) -> bool:
    """Whether a postgres:// URL names its database (in the path, or ?dbname=/?database=);
    without one the driver would pick the user's name, often the ``postgres`` database."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return bool(parts.path.strip("/") or query.get("dbname") or query.get("database"))


def _check_postgres_database(key: str, url: str) -> None:
    if url.startswith(("postgres://", "postgresql://")) and not _names_postgres_database(url):
        # The URL itself is not shown: it may hold a password.
        raise ConfigError(
            f"{key}: the postgres:// URL names no database; add it after the host, "
            "e.g. postgres://user@host:5432/identity"
        )


_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(?:\.{_LABEL})*")


def _validate_next_link_rules(config: Config) -> None:
    for i, host in enumerate(config.session.next_link_hosts):
        if not _HOST_PATTERN.fullmatch(host):
            raise ConfigError(
                f'session.next_link_hosts[{i}]: "{host}" is not a lower-case host name'
                ' or "*.domain"'
            )
    for i, prefix in enumerate(config.session.next_link_allowlist):
        scheme, sep, rest = prefix.partition("://")
        # Without a "/" after the host, "http://localhost:3000" would also let through
        # "http://localhost:3000.evil.example/".
        if not scheme or not sep or "/" not in rest or rest.startswith("/"):
            raise ConfigError(
                f'session.next_link_allowlist[{i}]: "{prefix}" must be scheme://host/…'
                ' (ending the host with "/")'
            )


def _validate_listeners(config: Config) -> None:
    """Addresses the listeners bind: a port outside 1-65535 would fail with a traceback, and an
    empty host would silently listen on every interface."""
    for key, host, port in (
        ("listen", config.listen.host, config.listen.port),
        ("appservice.listen", config.appservice.listen.host, config.appservice.listen.port),
    ):
        if not host.strip():
            raise ConfigError(f"{key}.host: must not be empty (0.0.0.0 or :: for every interface)")
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}.port: {port} is not a TCP port")


def _validate(config: Config) -> None:
    """Checks that span more than one value's type."""
    url = config.database.url
    if not _is_database_url(url):
        raise ConfigError(f'database.url: "{url}" is not a sqlite: or postgres:// URL')
    _check_postgres_database("database.url", url)
    for key, name in (
        ("server.name", config.server.name),
        *(
            (f"server.alternative_names[{i}]", alternative)
            for i, alternative in enumerate(config.server.alternative_names)
        ),
    ):
        if not name.strip():
            raise ConfigError(f"{key}: must not be empty (the host[:port] clients use)")
        if any(c.isspace() or not c.isprintable() for c in name):
            raise ConfigError(f'{key}: "{name.strip()}" must not contain spaces')
    for i, algorithm in enumerate(config.lookup.algorithms):
        if algorithm not in ("sha256", "none"):
            raise ConfigError(f'lookup.algorithms[{i}]: "{algorithm}" is not sha256 or none')
    if "sha256" not in config.lookup.algorithms:
        raise ConfigError("lookup.algorithms: must contain sha256 (the spec requires it)")
    rotation = config.lookup.pepper_rotation
    if rotation is not None and rotation <= config.lookup.pepper_grace:
        raise ConfigError(
            "lookup.pepper_rotation: must be longer than lookup.pepper_grace "
            f"({config.lookup.pepper_grace:g}s), or null for no scheduled rotation"
        )
    _validate_listeners(config)
    database = config.database
    if database.max_connections < 1:
        raise ConfigError("database.max_connections: must be at least 1")
    if not 0 <= database.min_connections <= database.max_connections:
        raise ConfigError(
            "database.min_connections: must be between 0 and max_connections "
            f"({database.max_connections})"
        )
    _validate_next_link_rules(config)
    if (config.listen.tls_cert is None) != (config.listen.tls_key is None):
        raise ConfigError("listen.tls_cert: tls_cert and tls_key must be set together")
    _validate_logging(config)
    choices = {
        "notifications.email.connector": (config.notifications.email.connector, ("smtp", "log")),
        "notifications.sms.connector": (config.notifications.sms.connector, ("twilio", "log")),
        "notifications.email.smtp.security": (
            config.notifications.email.smtp.security,
            ("none", "starttls", "tls"),
        ),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f'{key}: "{value}" is not one of {", ".join(allowed)}')
    twilio = config.notifications.sms.twilio
    if config.notifications.sms.connector == "twilio" and not (
        twilio.account_sid
        and twilio.auth_token
        and (twilio.from_number or twilio.messaging_service_sid)
    ):
        raise ConfigError(
            "notifications.sms.twilio: account_sid, auth_token and from_number or "
            "messaging_service_sid are required with the twilio connector"
        )
    if not config.server.public_base_url.startswith(("https://", "http://")):
        raise ConfigError(
            f'server.public_base_url: "{config.server.public_base_url}" is not an http(s) URL'
        )
    for name in (f.name for f in dataclasses.fields(config.ratelimits)):
        limit: RateLimit = getattr(config.ratelimits, name)
        if limit.limit < 1 or limit.period <= 0:
            raise ConfigError(f"ratelimits.{name}: limit and period must be positive")
    resolve_to = config.invites.expiration.resolve_to
    if resolve_to and not (resolve_to.startswith("@") and ":" in resolve_to):
        raise ConfigError(f'invites.expiration.resolve_to: "{resolve_to}" is not a Matrix user ID')
    appservice = config.appservice
    for key in ("as_token", "hs_token"):
        token = getattr(appservice, key)
        if token in PLACEHOLDER_TOKENS:
            raise ConfigError(
                f"appservice.{key}: still the example placeholder; run generate-registration"
            )
    if appservice.enabled and resolve_to and resolve_to != appservice.expired_user_id:
        raise ConfigError(
            "invites.expiration.resolve_to: with the appservice enabled, expired invites must go "
            f"to its own user {appservice.expired_user_id} (leave resolve_to empty)"
        )
    if bool(appservice.as_token) != bool(appservice.hs_token):
        raise ConfigError("appservice.as_token: as_token and hs_token must be set together")
    for key in ("bot_localpart", "expired_user_localpart"):
        if not is_localpart(getattr(appservice, key)):
            raise ConfigError(f"appservice.{key}: not a valid Matrix localpart")
    if appservice.bot_localpart == appservice.expired_user_localpart:
        raise ConfigError("appservice.expired_user_localpart: must differ from bot_localpart")
    prefix = appservice.bot_command_prefix
    if not prefix or prefix.split() != [prefix]:
        raise ConfigError("appservice.bot_command_prefix: must be one word, without spaces")
    for key in ("homeserver_url", "url"):
        if not getattr(appservice, key).startswith(("http://", "https://")):
            raise ConfigError(f"appservice.{key}: not an http(s) URL")
    _validate_durations(config)
    if config.invites.delivery.concurrency < 1:
        raise ConfigError("invites.delivery.concurrency: must be at least 1")
    if config.session.max_attempts < 1:
        raise ConfigError("session.max_attempts: must be at least 1")
    networks = {
        "listen.trusted_proxies": config.listen.trusted_proxies,
        "api.msisdn_delegate.allowed_networks": config.api.msisdn_delegate.allowed_networks,
    }
    for key, values in networks.items():
        for i, network in enumerate(values):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f'{key}[{i}]: "{network}" is not a network') from None
    _validate_stores(config)
    _validate_invite_policy(config)
    for policy_id, policy in config.terms.policies.items():
        if not policy.languages:
            raise ConfigError(f"terms.policies.{policy_id}.languages: at least one language")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _validate_logging(config: Config) -> None:
    logging_config = config.logging
    if logging_config.level.upper() not in LOG_LEVELS:
        raise ConfigError(f'logging.level: "{logging_config.level}" is not a log level')
    if logging_config.format not in ("text", "json"):
        raise ConfigError(f'logging.format: "{logging_config.format}" is not text or json')
    for name, level in logging_config.levels.items():
        if not name.strip():
            raise ConfigError("logging.levels: a logger name must not be empty")
        if level.upper() not in LOG_LEVELS:
            raise ConfigError(
                f'logging.levels.{name}: "{level}" is not one of {", ".join(LOG_LEVELS)}'
            )
    if logging_config.config is not None and not logging_config.config.strip():
        raise ConfigError("logging.config: must not be empty (leave it out for the built-in setup)")


def _validate_durations(config: Config) -> None:
    """Intervals of background loops and retries (zero would run them without pause), and
    durations where zero makes no sense (for aiohttp a zero timeout even means none)."""
    invites = config.invites
    delivery = invites.delivery
    intervals = {
        "invites.delivery.poll_interval": delivery.poll_interval,
        "invites.delivery.retry_initial": delivery.retry_initial,
        "invites.delivery.homeserver_retry_initial": delivery.homeserver_retry_initial,
        "invites.delivery.lease": delivery.lease,
        "invites.delivery.acceptance_window": delivery.acceptance_window,
        "invites.expiration.check_interval": invites.expiration.check_interval,
        "invites.resolution_interval": invites.resolution_interval,
    }
    for key, interval in intervals.items():
        if interval < MIN_INTERVAL_S:
            raise ConfigError(f"{key}: must be at least 100ms")
    if delivery.retry_max < delivery.retry_initial:
        raise ConfigError("invites.delivery.retry_max: must be at least retry_initial")
    if delivery.homeserver_retry_max < delivery.homeserver_retry_initial:
        raise ConfigError(
            "invites.delivery.homeserver_retry_max: must be at least homeserver_retry_initial"
        )
    positive = {
        "invites.delivery.give_up_after": delivery.give_up_after,
        "invites.expiration.after": invites.expiration.after,
        "session.lifetime": config.session.lifetime,
        "federation.timeout": config.federation.timeout,
        "notifications.email.smtp.timeout": config.notifications.email.smtp.timeout,
        "notifications.sms.twilio.timeout": config.notifications.sms.twilio.timeout,
    }
    for key, duration in positive.items():
        if duration <= 0:
            raise ConfigError(f"{key}: must be more than 0s")


STORE_NAMES = ("synapse", "ldap", "rest", "static")


def _validate_stores(config: Config) -> None:
    stores = config.stores
    for i, name in enumerate(stores.order):
        if name not in STORE_NAMES:
            raise ConfigError(f'stores.order[{i}]: "{name}" is not one of {", ".join(STORE_NAMES)}')
        if name in stores.order[:i]:
            raise ConfigError(f'stores.order[{i}]: "{name}" is listed twice')
    if stores.sync_interval < 1:
        raise ConfigError("stores.sync_interval: must be at least 1s")
    if "synapse" in stores.order:
        synapse = stores.synapse
        url = synapse.database_url
        if not _is_database_url(url):
            raise ConfigError(
                f'stores.synapse.database_url: "{url}" is not a sqlite: or postgres:// URL'
            )
        _check_postgres_database("stores.synapse.database_url", url)
        if url.startswith("sqlite:") and not url.removeprefix("sqlite:").startswith("/"):
            raise ConfigError(
                f'stores.synapse.database_url: "{url}" needs an absolute path (sqlite:/path)'
            )
        if synapse.threepids not in ("all", "bound"):
            raise ConfigError(
                f'stores.synapse.threepids: "{synapse.threepids}" is not all or bound'
            )
        if synapse.id_server and synapse.threepids != "bound":
            raise ConfigError("stores.synapse.id_server: only used with threepids: bound")
    if "ldap" in stores.order:
        ldap = stores.ldap
        if not ldap.uri.startswith(("ldap://", "ldaps://")):
            raise ConfigError(f'stores.ldap.uri: "{ldap.uri}" is not an ldap:// or ldaps:// URI')
        if not ldap.base_dn:
            raise ConfigError("stores.ldap.base_dn: required with the ldap store")
        if not ldap.localpart_attributes:
            raise ConfigError("stores.ldap.localpart_attributes: at least one attribute")
        if ldap.start_tls and ldap.uri.startswith("ldaps://"):
            raise ConfigError("stores.ldap.start_tls: not with an ldaps:// URI (TLS already)")
        if ldap.bind_dn and not ldap.bind_password:
            # A simple bind with a DN and no password is an unauthenticated bind that many
            # servers accept, which would hide a missing password.
            raise ConfigError("stores.ldap.bind_password: required with bind_dn")
        from phonenumbers import SUPPORTED_REGIONS  # only needed with the ldap store

        if ldap.default_region and ldap.default_region not in SUPPORTED_REGIONS:
            raise ConfigError(
                f'stores.ldap.default_region: "{ldap.default_region}" is not a region code '
                "such as DE or US"
            )
        for key in ("user_filter", "group_filter"):
            text = getattr(ldap, key)
            if not (text.startswith("(") and text.endswith(")")):
                raise ConfigError(f'stores.ldap.{key}: "{text}" is not a parenthesised filter')
        if ldap.timeout <= 0:
            raise ConfigError("stores.ldap.timeout: must be more than 0s")
    if "rest" in stores.order:
        rest = stores.rest
        url = rest.base_url
        if not url.startswith(("http://", "https://")) or "?" in url or "#" in url:
            raise ConfigError(f'stores.rest.base_url: "{url}" is not an http(s) URL')
        if not all("!" <= c <= "~" for c in rest.token):
            raise ConfigError("stores.rest.token: only printable ASCII without spaces")
        if rest.timeout <= 0:
            raise ConfigError("stores.rest.timeout: must be more than 0s")
    for i, entry in enumerate(stores.static.threepids):
        if entry.medium not in ("email", "msisdn"):
            raise ConfigError(
                f'stores.static.threepids[{i}].medium: "{entry.medium}" is not email or msisdn'
            )
        if not (entry.mxid.startswith("@") and ":" in entry.mxid):
            raise ConfigError(
                f'stores.static.threepids[{i}].mxid: "{entry.mxid}" is not a Matrix user ID'
            )


def _validate_invite_policy(config: Config) -> None:
    policy = config.invites.policy
    for i, pattern in enumerate(policy.allowed_senders):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f'invites.policy.allowed_senders[{i}]: "{pattern}" is not a regular '
                f"expression ({e})"
            ) from None
    if policy.max_per_day < 0:
        raise ConfigError("invites.policy.max_per_day: must not be negative")
