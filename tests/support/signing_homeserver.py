"""A loopback homeserver with an ed25519 server key, for X-Matrix signed requests.

It serves ``GET /_matrix/key/v2/server`` (self-signed, as a homeserver does) and signs requests
the way Synapse signs ``POST /_matrix/identity/v2/3pid/unbind``. A
:class:`~appservice.federation.FederationClient` reaches it through an override::

    hs = SigningHomeserver("hs.test")
    await hs.start()
    client = FederationClient(
        overrides={hs.server_name: hs.base_url}, allowed_networks=["127.0.0.0/8"]
    )
    header = hs.sign_request("POST", "/_matrix/identity/v2/3pid/unbind", "id.test", body)

Knobs for failure tests: :meth:`rotate_key`, ``bad_self_signature``, ``valid_for_s`` (negative
serves keys that have already expired), ``served_server_name`` and ``key_status``.
``key_requests`` counts the requests to the key endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import signedjson.key
import signedjson.sign
from aiohttp import web
from signedjson.types import SigningKey

KEY_PATH = "/_matrix/key/v2/server"


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class SigningHomeserver:
    """A fake homeserver on 127.0.0.1 that publishes its signing key and signs requests.

    ``server_name`` defaults to ``localhost:<port>`` (known after :meth:`start`). ``clock``
    (seconds since the epoch) is used for ``valid_until_ts`` and ``expired_ts``; pass the same
    fake clock as the key fetcher's.
    """

    def __init__(
        self,
        server_name: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        key_version: str = "a_1",
    ) -> None:
        self._server_name = server_name
        self.clock = clock
        self.signing_key: SigningKey = signedjson.key.generate_signing_key(key_version)
        # key id -> (signing key, expired_ts in ms) of keys replaced by rotate_key().
        self.old_keys: dict[str, tuple[SigningKey, int]] = {}
        self._rotations = 0
        # How long the served keys are valid from now; negative: already expired.
        self.valid_for_s: float = 86400.0
        # Sign the key response with a different key under the advertised key id.
        self.bad_self_signature = False
        # Answer with this server_name in the key response instead of the real one.
        self.served_server_name: str | None = None
        # Answer the key endpoint with this HTTP status and an error body.
        self.key_status: int | None = None
        self.key_requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def server_name(self) -> str:
        """The homeserver's name (``localhost:<port>`` unless one was given)."""
        if self._server_name is not None:
            return self._server_name
        if not self.port:
            raise RuntimeError("start() the homeserver first, or give it a server_name")
        return f"localhost:{self.port}"

    @property
    def base_url(self) -> str:
        """Where it listens (for ``FederationClient(overrides=...)``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def key_id(self) -> str:
        """The id of the current key, ``ed25519:<version>``."""
        return f"{self.signing_key.alg}:{self.signing_key.version}"

    def rotate_key(self, version: str | None = None) -> str:
        """Replace the current key by a new one (the old one moves to ``old_verify_keys``).

        Returns the new key id.
        """
        self.old_keys[self.key_id] = (self.signing_key, int(self.clock() * 1000))
        self._rotations += 1
        self.signing_key = signedjson.key.generate_signing_key(
            version or f"{self.signing_key.version}_r{self._rotations}"
        )
        return self.key_id

    def key_response(self) -> dict[str, Any]:
        """The body of ``GET /_matrix/key/v2/server`` as currently configured."""
        name = self.served_server_name or self.server_name
        body: dict[str, Any] = {
            "server_name": name,
            "verify_keys": {
                self.key_id: {
                    "key": signedjson.key.encode_verify_key_base64(
                        signedjson.key.get_verify_key(self.signing_key)
                    )
                }
            },
            "old_verify_keys": {
                key_id: {
                    "key": signedjson.key.encode_verify_key_base64(
                        signedjson.key.get_verify_key(key)
                    ),
                    "expired_ts": expired_ts,
                }
                for key_id, (key, expired_ts) in self.old_keys.items()
            },
            "valid_until_ts": int((self.clock() + self.valid_for_s) * 1000),
        }
        signer = self.signing_key
        if self.bad_self_signature:
            signer = signedjson.key.generate_signing_key(self.signing_key.version)
        signed: dict[str, Any] = signedjson.sign.sign_json(body, name, signer)
        return signed

    def sign_request(
        self,
        method: str,
        uri: str,
        destination: str,
        content: Any | None = None,
        *,
        destination_field: str = "destination_is",
        signing_key: SigningKey | None = None,
        origin: str | None = None,
        header_destination: str | None = None,
        include_destination: bool = True,
    ) -> str:
        """The ``Authorization`` header value Synapse would send for this request.

        ``uri`` is the path and query starting at ``/_matrix``; ``content`` the JSON body (not
        signed when ``None``). ``destination_field`` is ``destination_is`` (Synapse to an
        identity server) or ``destination`` (server to server). ``signing_key`` signs with another
        key (for example one the server does not publish); ``origin`` claims another origin.
        ``header_destination`` puts a different ``destination=`` in the header than the signed
        one; ``include_destination=False`` leaves ``destination=`` out of the header.
        """
        key = signing_key or self.signing_key
        origin = origin or self.server_name
        signed: dict[str, Any] = {
            "method": method,
            "uri": uri,
            "origin": origin,
            destination_field: destination,
        }
        if content is not None:
            signed["content"] = content
        signedjson.sign.sign_json(signed, origin, key)
        key_id = f"{key.alg}:{key.version}"
        sig: str = signed["signatures"][origin][key_id]
        params = [f"origin={_quote(origin)}"]
        if include_destination:
            params.append(f"destination={_quote(header_destination or destination)}")
        params += [f"key={_quote(key_id)}", f"sig={_quote(sig)}"]
        return "X-Matrix " + ",".join(params)

    async def _keys(self, request: web.Request) -> web.Response:
        self.key_requests += 1
        if self.key_status is not None:
            return web.json_response(
                {"errcode": "M_UNKNOWN", "error": "broken"}, status=self.key_status
            )
        return web.json_response(self.key_response())

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_get(KEY_PATH, self._keys)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SigningHomeserver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
