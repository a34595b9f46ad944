"""The ``rest`` store: a custom directory backend reached over HTTP(S) with a small JSON contract.

The contract
============
Every request goes to a path under ``stores.rest.base_url`` (``{base_url}/lookup`` etc.), sends
``Accept: application/json`` and, when ``stores.rest.token`` is set,
``Authorization: Bearer <token>``. Request bodies are JSON objects (``Content-Type:
application/json``, UTF-8). Redirects are not followed.

Mediums are ``email`` and ``msisdn``. Addresses are sent in canonical form: email addresses
case-folded (``alice@example.org``), phone numbers as E.164 digits without ``+``
(``4915112345678``). Matrix IDs are full user IDs (``@alice:example.org``).

``POST {base_url}/lookup`` (one 3PID)
    Body ``{"medium": "email", "address": "alice@example.org"}``. Answer 200 with
    ``{"mxid": "@alice:example.org"}`` when the address is known, and 200 with ``{}`` (or
    ``{"mxid": null}``, or a 404) when it is not.

``POST {base_url}/bulk_lookup`` (two or more 3PIDs, at most 1000 per request)
    Body ``{"threepids": [{"medium": "email", "address": "alice@example.org"}, ...]}``.
    Answer 200 with ``{"threepids": [{"medium": "email", "address": "alice@example.org",
    "mxid": "@alice:example.org"}, ...]}`` listing only the 3PIDs that are known (an empty list
    when none is). 404 is an error here.

``GET {base_url}/threepids?limit=N[&since=CURSOR]`` (only with ``listable: true``)
    Every 3PID the backend knows, a page at a time, for mirroring (hashed lookups find mirrored
    entries). Answer 200 with ``{"threepids": [{"medium", "address", "mxid"}, ...], "next":
    CURSOR}`` holding at most ``limit`` entries; ``next`` is an opaque string passed back as
    ``since`` for the following page, or ``null`` on the last page. The first request has no
    ``since``. A cursor must never come back twice, and a listing may have at most 10,000 pages.

``POST {base_url}/roles`` (only with ``roles: true``)
    Body ``{"mxid": "@alice:example.org"}``. Answer 200 with ``{"roles": ["inviters"]}``
    (``{"roles": []}`` for a user without roles or one the backend does not know; 404 is an
    error here). Roles are non-empty strings used by the invite policy.

In answers, keys other than the documented ones are ignored, entries with a medium other than
``email`` or ``msisdn`` are skipped, addresses are re-canonicalised (``Alice@Example.org``
matches ``alice@example.org``), and 3PIDs that were not asked are ignored. Anything else is an
error: a status other than 2xx (other than 404 on ``/lookup``), a body that is not JSON or
larger than 4 MiB, a wrong shape, an address that is not a valid email or phone number, a
``mxid`` that is not a Matrix user ID, two different Matrix IDs for one 3PID, no answer within
``stores.rest.timeout``. An error makes the request fail with ``StoreError`` (the lookup then
goes on with the next store, see ``IdentityStores.find_live``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from appservice.config.model import RestStoreConfig
from appservice.identity_stores.base import StoreEntry, StoreError, Threepid
from appservice.threepid import MEDIUMS, canonical_address, user_id_server

log = logging.getLogger(__name__)

# At most this many 3PIDs per bulk_lookup request.
BULK_CHUNK = 1000
# The limit asked for per page of GET /threepids.
PAGE_LIMIT = 1000
# A listing longer than this many pages is taken for a backend that never ends.
MAX_PAGES = 10_000
# Answers are refused beyond this size (a page or chunk of 1000 entries is well below).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_READ_CHUNK = 64 * 1024


class RestStore:
    """Asks a backend speaking the contract above (``stores.rest``)."""

    name = "rest"

    def __init__(self, config: RestStoreConfig) -> None:
        """Keep the settings; ``start()`` opens the HTTP session."""
        self._config = config
        self._base_url = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def listable(self) -> bool:
        """Whether the backend answers ``GET /threepids`` (``stores.rest.listable``)."""
        return self._config.listable

    async def start(self) -> None:
        """Open the HTTP session (the backend is not contacted: it may come up later)."""
        if self._session is not None:
            return
        headers = {"Accept": "application/json"}
        if self._config.token:
            headers["Authorization"] = f"Bearer {self._config.token}"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=float(self._config.timeout)),
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def find(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """The Matrix ID of each asked 3PID the backend knows: ``/lookup`` for one 3PID,
        ``/bulk_lookup`` in chunks of ``BULK_CHUNK`` for more."""
        asked = [t for t in dict.fromkeys(threepids) if t[0] in MEDIUMS]
        if not asked:
            return {}
        if len(asked) == 1:
            return await self._lookup_one(asked[0])
        found: dict[Threepid, str] = {}
        for start in range(0, len(asked), BULK_CHUNK):
            found.update(await self._lookup_many(asked[start : start + BULK_CHUNK]))
        log.debug("rest store: %d of %d 3PIDs found", len(found), len(asked))
        return found

    async def _lookup_one(self, threepid: Threepid) -> dict[Threepid, str]:
        endpoint = "POST /lookup"
        medium, address = threepid
        status, answer = await self._request(
            "POST", "/lookup", body={"medium": medium, "address": address}, missing_ok=True
        )
        if status == 404:
            return {}
        obj = _object(answer, endpoint, "the answer")
        mxid = obj.get("mxid")
        if mxid is None:
            return {}
        return {threepid: _mxid(mxid, endpoint, "mxid")}

    async def _lookup_many(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        endpoint = "POST /bulk_lookup"
        body = {"threepids": [{"medium": m, "address": a} for m, a in threepids]}
        _, answer = await self._request("POST", "/bulk_lookup", body=body)
        entries = _entry_list(answer, endpoint)
        asked = set(threepids)
        found: dict[Threepid, str] = {}
        for entry in entries:
            key = (entry.medium, entry.address)
            if key not in asked:
                continue
            if found.setdefault(key, entry.mxid) != entry.mxid:
                raise StoreError(
                    f"rest store: {endpoint}: two different Matrix IDs for one {entry.medium}"
                )
        return found

    async def entries(self) -> AsyncIterator[StoreEntry]:
        """Every 3PID the backend lists, page by page through ``GET /threepids``."""
        if not self._config.listable:
            raise StoreError("rest store: not listable (stores.rest.listable is false)")
        endpoint = "GET /threepids"
        seen: set[str] = set()
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            query = {"limit": str(PAGE_LIMIT)}
            if cursor is not None:
                query["since"] = cursor
            _, answer = await self._request("GET", "/threepids", query=query)
            page = _entry_list(answer, endpoint)
            if len(page) > PAGE_LIMIT:
                raise StoreError(
                    f"rest store: {endpoint}: {len(page)} entries in a page, limit was {PAGE_LIMIT}"
                )
            nxt = _object(answer, endpoint, "the answer").get("next")
            if nxt is not None and not isinstance(nxt, str):
                raise StoreError(f"rest store: {endpoint}: next is not a string or null")
            for entry in page:
                yield entry
            if nxt is None:
                log.debug("rest store: listing done after %d pages", len(seen) + 1)
                return
            if nxt in seen:
                raise StoreError(f"rest store: {endpoint}: the next cursor repeats")
            seen.add(nxt)
            cursor = nxt
        raise StoreError(f"rest store: {endpoint}: more than {MAX_PAGES} pages")

    async def roles(self, mxid: str) -> frozenset[str]:
        """The roles the backend gives ``mxid`` (``POST /roles``); none when roles are off."""
        if not self._config.roles:
            return frozenset()
        endpoint = "POST /roles"
        _, answer = await self._request("POST", "/roles", body={"mxid": mxid})
        roles = _object(answer, endpoint, "the answer").get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            raise StoreError(f"rest store: {endpoint}: roles is not a list of non-empty strings")
        return frozenset(roles)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> tuple[int, Any]:
        """Send one request; return the status and the parsed JSON answer (``None`` on a 404
        when ``missing_ok``). Every failure is a ``StoreError`` naming the endpoint only: the
        base URL may hold credentials and the token must stay out of logs."""
        endpoint = f"{method} {path}"
        if self._session is None:
            raise StoreError("rest store: not started")
        data = None
        headers: dict[str, str] = {}
        if body is not None:
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method,
                self._base_url + path,
                params=query,
                data=data,
                headers=headers,
                allow_redirects=False,
            ) as response:
                status = response.status
                if missing_ok and status == 404:
                    return status, None
                if not 200 <= status < 300:
                    raise StoreError(f"rest store: {endpoint}: HTTP {status}")
                raw = await _read_capped(response, endpoint)
        except TimeoutError:
            raise StoreError(
                f"rest store: {endpoint}: no answer within {float(self._config.timeout):g}s"
            ) from None
        except aiohttp.ClientError as e:
            raise StoreError(
                f"rest store: {endpoint}: cannot reach the backend ({type(e).__name__})"
            ) from None
        try:
            return status, json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"rest store: {endpoint}: the answer is not JSON") from None


async def _read_capped(response: aiohttp.ClientResponse, endpoint: str) -> bytes:
    too_big = StoreError(
        f"rest store: {endpoint}: the answer is larger than {MAX_ANSWER_BYTES // 1024 // 1024} MiB"
    )
    if response.content_length is not None and response.content_length > MAX_ANSWER_BYTES:
        raise too_big
    raw = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        raw += chunk
        if len(raw) > MAX_ANSWER_BYTES:
            raise too_big
    return bytes(raw)


def _object(value: Any, endpoint: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StoreError(f"rest store: {endpoint}: {what} is not a JSON object")
    return value


def _mxid(value: Any, endpoint: str, what: str) -> str:
    if not isinstance(value, str) or user_id_server(value) is None:
        raise StoreError(f"rest store: {endpoint}: {what} is not a Matrix user ID")
    return value


def _entry_list(answer: Any, endpoint: str) -> list[StoreEntry]:
    """The entries of a ``{"threepids": [...]}`` answer, canonical, unknown mediums skipped."""
    items = _object(answer, endpoint, "the answer").get("threepids")
    if not isinstance(items, list):
        raise StoreError(f"rest store: {endpoint}: threepids is not a list")
    entries: list[StoreEntry] = []
    for i, item in enumerate(items):
        what = f"threepids[{i}]"
        obj = _object(item, endpoint, what)
        medium, address = obj.get("medium"), obj.get("address")
        if not isinstance(medium, str) or not isinstance(address, str):
            raise StoreError(f"rest store: {endpoint}: {what} lacks a medium or an address")
        mxid = _mxid(obj.get("mxid"), endpoint, f"{what}.mxid")
        if medium not in MEDIUMS:
            continue
        canonical = canonical_address(medium, address)
        if canonical is None:
            # The address itself stays out of the message (logs carry no full addresses).
            raise StoreError(f"rest store: {endpoint}: {what}.address is not a valid {medium}")
        entries.append(StoreEntry(medium, canonical, mxid))
    return entries
