"""Fetch and cache homeservers' signing keys (``GET /_matrix/key/v2/server``).

The identity server needs a homeserver's keys for one thing: verifying the ``X-Matrix`` signature
on ``POST /_matrix/identity/v2/3pid/unbind``. Keys are fetched directly from the homeserver (no
notary), and a response is accepted only when

* its ``server_name`` is the name that was asked for,
* it is signed by the server itself with at least one of its ``verify_keys``, and every such
  signature verifies,
* its ``valid_until_ts`` lies in the future.

Only ``verify_keys`` are usable for request signing; ``old_verify_keys`` are ignored. A response is
cached until the lesser of its ``valid_until_ts`` and ``max_cache_s`` (the spec's seven days).

Requests name the key they are signed with, so an attacker can name keys that do not exist. To keep
that from turning into a flood of key requests (to us, or through us to a third server), a server's
keys are fetched again for an unknown key id at most once per ``min_refetch_interval_s``, and a
failed fetch is remembered for the same time. Concurrent callers for one server share one fetch.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey

from appservice.federation.client import FederationClient
from appservice.federation.discovery import FederationError, is_valid_server_name

logger = logging.getLogger(__name__)

SERVER_KEYS_PATH = "/_matrix/key/v2/server"
ED25519 = "ed25519"
_ED25519_KEY_LENGTH = 32
_MAX_KEY_ID_LENGTH = 255
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]*={0,2}", re.ASCII)


class ServerKeyError(FederationError):
    """A homeserver's signing key could not be obtained or is not valid.

    The message names the server and the reason (unreachable, bad response, unknown key, ...);
    it never contains request bodies or tokens.
    """


@dataclass(frozen=True)
class ServerKeys:
    """The current verify keys of a server, as accepted from its key response.

    ``valid_until`` is in seconds since the epoch, already capped by the fetcher's maximum cache
    time; ``fetched_at`` is when the response was accepted (seconds since the epoch).
    """

    server_name: str
    verify_keys: Mapping[str, VerifyKey]
    valid_until: float
    fetched_at: float


@dataclass
class _ServerState:
    """What the fetcher remembers about one server."""

    keys: ServerKeys | None = None
    # When the last fetch finished (successfully or not), and why it failed if it did.
    last_fetch: float = float("-inf")
    last_error: str | None = None


def _contains_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_contains_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_float(v) for v in value)
    return False


def is_integer_json(value: Any) -> bool:
    """Whether parsed JSON ``value`` has no non-integer numbers (canonical JSON allows none).

    ``canonicaljson`` would encode floats, so signed objects are checked with this first. A value
    nested too deeply to walk counts as not acceptable.
    """
    try:
        return not _contains_float(value)
    except RecursionError:
        return False


def decode_base64_strict(value: str) -> bytes:
    """Decode (unpadded or padded, standard or URL-safe) base64, rejecting any other character.

    ``unpaddedbase64.decode_base64`` silently drops characters outside the alphabet; this raises
    :class:`ValueError` instead.
    """
    if not _BASE64_RE.fullmatch(value) or len(value.rstrip("=")) % 4 == 1:
        raise ValueError("not valid base64")
    unpadded = value.rstrip("=").replace("-", "+").replace("_", "/")
    return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)


def is_supported_key_id(key_id: str) -> bool:
    """Whether ``key_id`` is an ``ed25519:<version>`` key id this module can verify with."""
    algorithm, sep, version = key_id.partition(":")
    return (
        algorithm == ED25519
        and bool(sep)
        and bool(version)
        and len(key_id) <= _MAX_KEY_ID_LENGTH
        and version.isprintable()
        and not any(c.isspace() for c in version)
    )


def parse_key_response(
    server_name: str, body: Any, now: float, *, max_cache_s: float
) -> ServerKeys:
    """Validate a ``/_matrix/key/v2/server`` response from ``server_name`` at time ``now``.

    Checks the shape, ``server_name``, the self-signature and ``valid_until_ts`` (see the module
    docstring). Raises :class:`ServerKeyError` with the reason when the response is not
    acceptable.
    """

    def bad(reason: str) -> ServerKeyError:
        return ServerKeyError(f"key response of {server_name} rejected: {reason}")

    if not isinstance(body, dict):
        raise bad("not a JSON object")
    if not is_integer_json(body):
        raise bad("not canonical JSON (non-integer number or too deeply nested)")
    if body.get("server_name") != server_name:
        raise bad("it is for a different server_name")
    valid_until_ts = body.get("valid_until_ts")
    if not isinstance(valid_until_ts, int) or isinstance(valid_until_ts, bool):
        raise bad("valid_until_ts is missing or not an integer")
    if valid_until_ts <= now * 1000:
        raise bad("the keys have expired (valid_until_ts is in the past)")
    raw_keys = body.get("verify_keys")
    if not isinstance(raw_keys, dict):
        raise bad("verify_keys is missing or not an object")
    verify_keys: dict[str, VerifyKey] = {}
    for key_id, entry in raw_keys.items():
        if not is_supported_key_id(key_id):
            continue  # Other algorithms are skipped, as the signing spec says.
        encoded = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(encoded, str):
            raise bad(f"verify key {key_id} has no key")
        try:
            key_bytes = decode_base64_strict(encoded)
        except ValueError:
            raise bad(f"verify key {key_id} is not valid base64") from None
        if len(key_bytes) != _ED25519_KEY_LENGTH:
            raise bad(f"verify key {key_id} is not an ed25519 public key")
        verify_keys[key_id] = decode_verify_key_bytes(key_id, key_bytes)
    if not verify_keys:
        raise bad("it has no ed25519 verify_keys")
    signatures = body.get("signatures")
    own = signatures.get(server_name) if isinstance(signatures, dict) else None
    signed_with = [key_id for key_id in own or () if key_id in verify_keys]
    if not isinstance(own, dict) or not signed_with:
        raise bad("it is not signed by any of its own verify_keys")
    for key_id in signed_with:
        try:
            verify_signed_json(body, server_name, verify_keys[key_id])
        except SignatureVerifyException:
            raise bad(f"its self-signature with {key_id} does not verify") from None
        except (ValueError, TypeError, RecursionError):
            raise bad("it cannot be encoded as canonical JSON") from None
    valid_until = min(valid_until_ts / 1000, now + max_cache_s)
    return ServerKeys(server_name, verify_keys, valid_until, now)


class ServerKeyFetcher:
    """Fetches, validates and caches homeservers' signing keys.

    ``clock`` returns seconds since the epoch (``valid_until_ts`` is wall-clock time).
    ``max_cache_s`` caps how long a response is used, whatever its ``valid_until_ts`` says.
    ``min_refetch_interval_s`` is the least time between two fetches for one server caused by an
    unknown key id, and how long a failed fetch is remembered. At most ``max_servers`` servers
    are remembered (the oldest entries are dropped first).
    """

    def __init__(
        self,
        client: FederationClient,
        clock: Callable[[], float] = time.time,
        *,
        max_cache_s: float = 7 * 86400,
        min_refetch_interval_s: float = 60,
        max_servers: int = 10_000,
    ) -> None:
        if max_servers < 1:
            raise ValueError("max_servers must be at least 1")
        self._client = client
        self._clock = clock
        self._max_cache_s = max_cache_s
        self._min_refetch_interval_s = min_refetch_interval_s
        self._max_servers = max_servers
        self._servers: dict[str, _ServerState] = {}
        self._inflight: dict[str, asyncio.Task[ServerKeys]] = {}

    async def verify_key(self, server_name: str, key_id: str) -> VerifyKey:
        """The verify key ``key_id`` (``ed25519:…``) of ``server_name``, for request signatures.

        Served from the cache while the cached response is valid; otherwise (or for a key id
        the cached response does not have, rate limited) the keys are fetched again. Raises
        :class:`ServerKeyError` when the key cannot be obtained.
        """
        if not is_valid_server_name(server_name):
            raise ServerKeyError("invalid server name")
        if not is_supported_key_id(key_id):
            raise ServerKeyError(f"unsupported key id {key_id[:64]!r} (only ed25519 keys)")
        now = self._clock()
        state = self._servers.get(server_name)
        task = self._inflight.get(server_name)
        if state is not None and state.keys is not None and state.keys.valid_until > now:
            key = state.keys.verify_keys.get(key_id)
            if key is not None:
                return key
            if task is None and now - state.last_fetch < self._min_refetch_interval_s:
                raise ServerKeyError(
                    f"{server_name} has no current key {key_id} (its keys were fetched "
                    f"{now - state.last_fetch:.0f} s ago; not fetching them again yet)"
                )
        elif (
            task is None
            and state is not None
            and state.last_error is not None
            and now - state.last_fetch < self._min_refetch_interval_s
        ):
            raise ServerKeyError(
                f"could not fetch the keys of {server_name}: {state.last_error} "
                f"({now - state.last_fetch:.0f} s ago; not retrying yet)"
            )
        if task is None:
            task = self._start_fetch(server_name)
        keys = await asyncio.shield(task)
        key = keys.verify_keys.get(key_id)
        if key is None:
            raise ServerKeyError(f"{server_name} has no current key {key_id}")
        return key

    def cached_keys(self, server_name: str) -> ServerKeys | None:
        """The cached, still valid keys of ``server_name`` (no fetch), or ``None``."""
        state = self._servers.get(server_name)
        if state is None or state.keys is None or state.keys.valid_until <= self._clock():
            return None
        return state.keys

    def _start_fetch(self, server_name: str) -> asyncio.Task[ServerKeys]:
        task = asyncio.get_running_loop().create_task(
            self._fetch(server_name), name=f"server keys of {server_name}"
        )
        self._inflight[server_name] = task

        def done(finished: asyncio.Task[ServerKeys]) -> None:
            if self._inflight.get(server_name) is finished:
                del self._inflight[server_name]
            # Mark the exception as retrieved: every waiter may have been cancelled.
            if not finished.cancelled():
                finished.exception()

        task.add_done_callback(done)
        return task

    async def _fetch(self, server_name: str) -> ServerKeys:
        try:
            keys = await self._fetch_and_parse(server_name)
        except ServerKeyError as exc:
            self._remember(server_name, None, str(exc))
            logger.info("server keys of %s: %s", server_name, exc)
            raise ServerKeyError(f"could not fetch the keys of {server_name}: {exc}") from None
        self._remember(server_name, keys, None)
        logger.debug("fetched server keys of %s: %s", server_name, sorted(keys.verify_keys))
        return keys

    async def _fetch_and_parse(self, server_name: str) -> ServerKeys:
        try:
            status, body = await self._client.get_json(server_name, SERVER_KEYS_PATH)
        except FederationError as exc:
            raise ServerKeyError(str(exc)) from None
        if status != 200:
            raise ServerKeyError(f"GET {SERVER_KEYS_PATH} on {server_name}: HTTP {status}")
        return parse_key_response(server_name, body, self._clock(), max_cache_s=self._max_cache_s)

    def _remember(self, server_name: str, keys: ServerKeys | None, error: str | None) -> None:
        previous = self._servers.pop(server_name, None)
        state = previous or _ServerState()
        if keys is not None:
            state.keys = keys
        state.last_fetch = self._clock()
        state.last_error = error
        while len(self._servers) >= self._max_servers:
            del self._servers[next(iter(self._servers))]
        self._servers[server_name] = state
