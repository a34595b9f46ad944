"""Validate an email with our server, bind and unbind it through a real Synapse."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest

from appservice.crypto.hashing import lookup_hash
from tests.e2e.conftest import RunningIdentityServer
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e
V2 = "/_matrix/identity/v2"


async def _is_token(
    synapse: SynapseServer, ids: RunningIdentityServer, localpart: str
) -> tuple[str, str, str]:
    user_id, hs_token = await synapse.register_user(localpart, "a long test password")
    credentials = await synapse.request_openid_token(user_id, hs_token)
    status, body = await ids.request("POST", f"{V2}/account/register", json=credentials)
    assert status == 200, body
    return user_id, hs_token, body["token"]


async def _lookup(ids: RunningIdentityServer, token: str, address: str) -> str | None:
    _, details = await ids.request("GET", f"{V2}/hash_details", token=token)
    h = lookup_hash(address, "email", details["lookup_pepper"])
    status, body = await ids.request(
        "POST",
        f"{V2}/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": details["lookup_pepper"], "addresses": [h]},
    )
    assert status == 200, body
    mxid: str | None = body["mappings"].get(h)
    return mxid


async def test_bind_and_unbind_through_synapse(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    user_id, hs_token, is_token = await _is_token(synapse, ids, "carol")
    address = "carol@example.org"

    status, body = await ids.request(
        "POST",
        f"{V2}/validate/email/requestToken",
        token=is_token,
        json={"client_secret": "carols-secret", "email": address, "send_attempt": 1},
    )
    assert status == 200, body
    sid = body["sid"]
    mails = await ids.smtp.wait_for(1)
    text = mails[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = re.search(r"https://\S+/validate/email/submitToken\?\S+", text)
    assert link, text
    token = parse_qs(urlsplit(link.group(0)).query)["token"][0]
    status, body = await ids.request(
        "POST",
        f"{V2}/validate/email/submitToken",
        token=is_token,
        json={"sid": sid, "client_secret": "carols-secret", "token": token},
    )
    assert (status, body) == (200, {"success": True})

    # Synapse proxies the bind to our /v2/3pid/bind with the user's identity-server token.
    status, body = await synapse.client_request(
        "POST",
        "/_matrix/client/v3/account/3pid/bind",
        hs_token,
        json={
            "client_secret": "carols-secret",
            "id_server": ids.name,
            "id_access_token": is_token,
            "sid": sid,
        },
    )
    assert status == 200, body
    assert await _lookup(ids, is_token, address) == user_id

    # Synapse signs the unbind with its server key (X-Matrix, destination_is = our name).
    status, body = await synapse.client_request(
        "POST",
        "/_matrix/client/v3/account/3pid/unbind",
        hs_token,
        json={"medium": "email", "address": address, "id_server": ids.name},
    )
    assert status == 200, body
    assert body.get("id_server_unbind_result") == "success", body
    assert await _lookup(ids, is_token, address) is None
