"""``/v2/3pid/bind`` and ``/v2/3pid/unbind`` (session or homeserver signature)."""

from __future__ import annotations

import logging

import pytest
import signedjson.key
import signedjson.sign

from appservice.crypto.hashing import lookup_hash
from tests.api.test_validation import EMAIL_SUBMIT, link_from_mail, request_email
from tests.support.api_server import Api

V2 = "/_matrix/identity/v2"
BIND = f"{V2}/3pid/bind"
UNBIND = f"{V2}/3pid/unbind"


async def validated_session(
    api: Api, token: str, email: str = "alice@example.com", secret: str = "s3cret"
) -> str:
    """Validate ``email`` through a real mail; returns the sid."""
    before = len(api.smtp.mails)
    _, body = await request_email(api, token, email=email, secret=secret)
    await api.smtp.wait_for(before + 1)
    link = link_from_mail(api)
    status, _ = await api.request("POST", EMAIL_SUBMIT, token=token, json=link)
    assert status == 200
    return body["sid"]


async def lookup(api: Api, token: str, address: str, medium: str = "email") -> str | None:
    _, details = await api.request("GET", f"{V2}/hash_details", token=token)
    pepper = details["lookup_pepper"]
    h = lookup_hash(address, medium, pepper)
    _, body = await api.request(
        "POST",
        f"{V2}/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": [h]},
    )
    return body["mappings"].get(h)


async def test_bind_returns_signed_association_and_lookup_finds_it(api: Api) -> None:
    user_id, token = await api.register("alice")
    sid = await validated_session(api, token)
    status, body = await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": "s3cret", "mxid": user_id}
    )
    assert status == 200
    assert body["address"] == "alice@example.com"
    assert body["medium"] == "email"
    assert body["mxid"] == user_id
    assert body["not_before"] <= body["ts"] < body["not_after"]
    verify_key = signedjson.key.decode_verify_key_base64(
        "ed25519", "0", api.server.keyring.current.public_key
    )
    signedjson.sign.verify_signed_json(body, "id.test", verify_key)
    assert await lookup(api, token, "alice@example.com") == user_id


async def test_bind_to_someone_else_is_403(api: Api) -> None:
    _, token = await api.register("alice")
    sid = await validated_session(api, token)
    status, body = await api.request(
        "POST",
        BIND,
        token=token,
        json={"sid": sid, "client_secret": "s3cret", "mxid": "@mallory:hs.test"},
    )
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert await lookup(api, token, "alice@example.com") is None


async def test_bind_needs_a_validated_session(api: Api) -> None:
    user_id, token = await api.register("alice")
    _, body = await request_email(api, token)
    status, err = await api.request(
        "POST",
        BIND,
        token=token,
        json={"sid": body["sid"], "client_secret": "s3cret", "mxid": user_id},
    )
    assert (status, err["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")
    status, err = await api.request(
        "POST", BIND, token=token, json={"sid": body["sid"], "client_secret": "x", "mxid": user_id}
    )
    assert (status, err["errcode"]) == (404, "M_NO_VALID_SESSION")
    status, err = await api.request("POST", BIND, token=token, json={"sid": body["sid"]})
    assert (status, err["errcode"]) == (400, "M_MISSING_PARAMS")


async def test_bind_needs_auth(api: Api) -> None:
    status, err = await api.request(
        "POST", BIND, json={"sid": "x", "client_secret": "y", "mxid": "@a:hs.test"}
    )
    assert (status, err["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_newest_binding_of_an_address_wins(api: Api) -> None:
    alice, alice_token = await api.register("alice")
    bob, bob_token = await api.register("bob")
    sid = await validated_session(api, alice_token, "shared@example.com")
    await api.request(
        "POST", BIND, token=alice_token, json={"sid": sid, "client_secret": "s3cret", "mxid": alice}
    )
    sid = await validated_session(api, bob_token, "shared@example.com", secret="bobs")
    await api.request(
        "POST", BIND, token=bob_token, json={"sid": sid, "client_secret": "bobs", "mxid": bob}
    )
    assert await lookup(api, alice_token, "shared@example.com") == bob


async def test_unbind_with_validated_session(api: Api) -> None:
    user_id, token = await api.register("alice")
    sid = await validated_session(api, token)
    await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": "s3cret", "mxid": user_id}
    )
    status, body = await api.request(
        "POST",
        UNBIND,
        json={
            "sid": sid,
            "client_secret": "s3cret",
            "mxid": user_id,
            "threepid": {"medium": "email", "address": "alice@example.com"},
        },
    )
    assert (status, body) == (200, {})
    assert await lookup(api, token, "alice@example.com") is None


async def test_unbind_with_session_of_another_address_is_403(api: Api) -> None:
    _user_id, token = await api.register("alice")
    await api.add_binding("email", "victim@example.com", "@victim:hs.test")
    sid = await validated_session(api, token, "alice@example.com")
    status, body = await api.request(
        "POST",
        UNBIND,
        json={
            "sid": sid,
            "client_secret": "s3cret",
            "mxid": "@victim:hs.test",
            "threepid": {"medium": "email", "address": "victim@example.com"},
        },
    )
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert await lookup(api, token, "victim@example.com") == "@victim:hs.test"


async def test_unbind_without_credentials_is_403(api: Api) -> None:
    status, body = await api.request(
        "POST",
        UNBIND,
        json={"mxid": "@a:hs.test", "threepid": {"medium": "email", "address": "a@example.com"}},
    )
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")


async def test_unbind_checks_its_body(api: Api) -> None:
    status, body = await api.request("POST", UNBIND, json={"mxid": "@a:hs.test"})
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
    status, body = await api.request("POST", UNBIND, json={"mxid": "@a:hs.test", "threepid": "x"})
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")


def _unbind_body(mxid: str, address: str = "bob@example.com") -> dict[str, object]:
    return {"mxid": mxid, "threepid": {"medium": "email", "address": address}}


@pytest.mark.parametrize("path", [UNBIND, "/_matrix/identity/api/v1/3pid/unbind"])
async def test_unbind_signed_by_the_users_homeserver(api: Api, path: str) -> None:
    hs = api.signing_homeserver
    _, token = await api.register()
    await api.add_binding("email", "bob@example.com", "@bob:signing.test")
    body = _unbind_body("@bob:signing.test")
    auth = hs.sign_request("POST", path, "id.test", body)
    status, answer = await api.request("POST", path, json=body, headers={"Authorization": auth})
    assert (status, answer) == (200, {})
    assert await lookup(api, token, "bob@example.com") is None


async def test_signed_unbind_for_a_user_of_another_server_is_403(api: Api) -> None:
    hs = api.signing_homeserver
    _, token = await api.register()
    await api.add_binding("email", "bob@example.com", "@bob:hs.test")
    body = _unbind_body("@bob:hs.test")
    auth = hs.sign_request("POST", UNBIND, "id.test", body)
    status, answer = await api.request("POST", UNBIND, json=body, headers={"Authorization": auth})
    assert (status, answer["errcode"]) == (403, "M_FORBIDDEN")
    assert await lookup(api, token, "bob@example.com") == "@bob:hs.test"


async def test_tampered_signed_unbind_is_403(api: Api) -> None:
    hs = api.signing_homeserver
    _, token = await api.register()
    await api.add_binding("email", "bob@example.com", "@bob:signing.test")
    auth = hs.sign_request("POST", UNBIND, "id.test", _unbind_body("@bob:signing.test", "x@y.z"))
    status, answer = await api.request(
        "POST", UNBIND, json=_unbind_body("@bob:signing.test"), headers={"Authorization": auth}
    )
    assert (status, answer["errcode"]) == (403, "M_FORBIDDEN")
    assert await lookup(api, token, "bob@example.com") == "@bob:signing.test"


async def test_signed_for_another_identity_server_is_403(api: Api) -> None:
    hs = api.signing_homeserver
    body = _unbind_body("@bob:signing.test")
    auth = hs.sign_request("POST", UNBIND, "other-id.example", body)
    status, answer = await api.request("POST", UNBIND, json=body, headers={"Authorization": auth})
    assert (status, answer["errcode"]) == (403, "M_FORBIDDEN")


async def test_signed_unbind_does_not_tell_why_the_origin_keys_could_not_be_fetched(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    # The origin is the caller's choice: the answer must not say what listens where.
    hs = api.signing_homeserver
    body = _unbind_body("@bob:127.0.0.1:1")
    auth = hs.sign_request("POST", UNBIND, "id.test", body, origin="127.0.0.1:1")
    status, answer = await api.request("POST", UNBIND, json=body, headers={"Authorization": auth})
    assert (status, answer["errcode"]) == (403, "M_FORBIDDEN")
    assert answer["error"] == (
        "Invalid homeserver signature: could not verify the X-Matrix signature: "
        f"no usable key {hs.key_id} of 127.0.0.1:1"
    )
    [record] = [r for r in caplog.records if r.name == "appservice.services.bindings"]
    assert record.levelno == logging.WARNING
    assert "could not connect to 127.0.0.1:1" in record.getMessage()


class TestUnbindNotification:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "session: {policy: {unbind: {notify: true}}}"

    async def test_unbound_address_is_told(self, api: Api) -> None:
        hs = api.signing_homeserver
        await api.add_binding("email", "bob@example.com", "@bob:signing.test")
        body = _unbind_body("@bob:signing.test")
        auth = hs.sign_request("POST", UNBIND, "id.test", body)
        assert (await api.request("POST", UNBIND, json=body, headers={"Authorization": auth}))[
            0
        ] == 200
        mails = await api.smtp.wait_for(1)
        assert mails[0].rcpt_tos == ("bob@example.com",)
        text = mails[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "@bob:signing.test" in text
