"""3PID invites: ``/store-invite``, ``/sign-ed25519``, and their resolution on bind (onbind)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import nacl.signing
import pytest
import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64

from appservice.clock import FakeClock
from appservice.crypto.signing import PublicKey
from appservice.db.invites import BOUND, PENDING, Invite, InviteStore
from appservice.db.outbox import DELIVERED, OutboxEntry, OutboxStore
from appservice.db.signing_keys import SigningKeyStore
from tests.api.test_bind import BIND, lookup, validated_session
from tests.support.api_server import Api

V2 = "/_matrix/identity/v2"
STORE_INVITE = f"{V2}/store-invite"
SIGN_ED25519 = f"{V2}/sign-ed25519"
ISVALID = f"{V2}/pubkey/isvalid"
EPHEMERAL_ISVALID = f"{V2}/pubkey/ephemeral/isvalid"
TOKEN_GRAMMAR = re.compile(r"^[0-9a-zA-Z.=_-]{1,255}$")
ROOM = "!garden:hs.test"


# Helpers, also used by the job tests (tests/jobs).


async def stop_background_jobs(api: Api) -> None:
    """Stop the server's periodic jobs, so that a test runs them itself (``run_once``)."""
    for job in api.server.jobs:
        await job.stop()


async def store_invite(
    api: Api,
    token: str,
    sender: str,
    address: str = "bob@example.com",
    room_id: str = ROOM,
    **extra: Any,
) -> tuple[int, Any]:
    """POST /store-invite; returns (status, body)."""
    body = {"medium": "email", "address": address, "room_id": room_id, "sender": sender, **extra}
    return await api.request("POST", STORE_INVITE, token=token, json=body)


async def invite(api: Api, address: str = "bob@example.com", room_id: str = ROOM) -> Invite:
    """A new pending invite of ``address`` by a fresh user of the fake homeserver."""
    sender, token = await api.register()
    status, body = await store_invite(api, token, sender, address, room_id)
    assert status == 200, body
    stored = await InviteStore(api.server.db).by_token(body["token"])
    assert stored is not None
    return stored


async def bind(api: Api, address: str, localpart: str | None = None) -> str:
    """A new user validates ``address`` by mail and binds it through the API; returns the mxid."""
    mxid, token = await api.register(localpart)
    secret = f"secret-{mxid[1:].split(':')[0]}"
    sid = await validated_session(api, token, address, secret=secret)
    status, body = await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": secret, "mxid": mxid}
    )
    assert status == 200, body
    return mxid


async def invite_state(api: Api, invite_id: str) -> Invite:
    """The invite as stored now."""
    stored = await InviteStore(api.server.db).by_id(invite_id)
    assert stored is not None
    return stored


async def outbox_of(api: Api, invite_id: str) -> list[OutboxEntry]:
    """The onbind notifications queued for an invite."""
    return await OutboxStore(api.server.db).for_invite(invite_id)


def verify_ephemeral_signature(api: Api, signed: dict[str, Any], ephemeral_key: str) -> None:
    """Check an onbind's ``signed`` block carries a valid signature of the invite's ephemeral key
    (``ed25519:0`` of the server name, as sign-ed25519 signs), and no other: not the long-term
    key, which is always valid, so the homeserver accepts it only while the ephemeral key is."""
    verify_server_signature(api, signed, PublicKey("ed25519:0", ephemeral_key))


def verify_server_signature(api: Api, signed: dict[str, Any], key: PublicKey | None = None) -> None:
    """Check ``signed`` carries a valid signature of the server's long-term ``key`` (by default
    the current one), and no other."""
    key = key or api.server.keyring.current
    algorithm, version = key.key_id.split(":")
    verify_key = signedjson.key.decode_verify_key_base64(algorithm, version, key.public_key)
    server_name = api.server.config.server.name
    assert set(signed["signatures"]) == {server_name}
    assert set(signed["signatures"][server_name]) == {key.key_id}
    signedjson.sign.verify_signed_json(signed, server_name, verify_key)


async def key_is_valid(api: Api, validity_url: str, public_key: str) -> bool:
    """Ask a ``key_validity_url`` (answered by the server under test) about ``public_key``."""
    path = urlsplit(validity_url).path
    status, body = await api.request("GET", f"{path}?public_key={quote(public_key, safe='')}")
    assert status == 200, body
    valid = body["valid"]
    assert isinstance(valid, bool)
    return valid


@pytest.fixture
def running_jobs() -> None:
    """Asked for by tests that keep the server's background jobs running."""


@pytest.fixture(autouse=True)
async def _quiet_jobs(api: Api, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    if "running_jobs" not in request.fixturenames:
        await stop_background_jobs(api)
    yield


# store-invite


async def test_store_invite_answers_token_both_keys_and_a_redacted_display_name(api: Api) -> None:
    sender, token = await api.register("alice")
    status, body = await store_invite(api, token, sender, "Bob.Smith@Example.com")
    assert status == 200, body
    assert set(body) == {"token", "public_keys", "public_key", "display_name"}

    assert TOKEN_GRAMMAR.match(body["token"])
    assert len(body["token"]) >= 22  # at least 128 bits of base64

    server_key = api.server.keyring.current.public_key
    assert body["public_key"] == server_key
    long_term, ephemeral = body["public_keys"]
    assert long_term == {"public_key": server_key, "key_validity_url": f"https://id.test{ISVALID}"}
    assert ephemeral["key_validity_url"] == f"https://id.test{EPHEMERAL_ISVALID}"
    assert ephemeral["public_key"] != server_key
    assert await key_is_valid(api, long_term["key_validity_url"], long_term["public_key"])
    assert await key_is_valid(api, ephemeral["key_validity_url"], ephemeral["public_key"])
    # Keys are not interchangeable between the two URLs.
    assert not await key_is_valid(api, long_term["key_validity_url"], ephemeral["public_key"])
    assert not await key_is_valid(api, ephemeral["key_validity_url"], long_term["public_key"])

    assert body["display_name"] == "b…@e…"
    for part in ("bob.smith@example.com", "bob", "smith", "example"):
        assert part not in body["display_name"].lower()


async def test_ephemeral_key_is_valid_in_the_url_safe_alphabet_too(api: Api) -> None:
    sender, token = await api.register()
    keys: set[str] = set()
    # A key with "+" or "/" in standard base64 shows the alphabet difference; try a few invites.
    for n in range(20):
        _, body = await store_invite(api, token, sender, f"someone{n}@example.com")
        keys.add(body["public_keys"][1]["public_key"])
        if any(c in k for k in keys for c in "+/"):
            break
    key = next(k for k in keys if any(c in k for c in "+/"))
    url_safe = key.replace("+", "-").replace("/", "_")
    assert await key_is_valid(api, f"https://id.test{EPHEMERAL_ISVALID}", url_safe)


async def test_store_invite_mails_the_invitee_with_room_and_sender(api: Api) -> None:
    sender, token = await api.register("alice")
    status, _ = await store_invite(
        api,
        token,
        sender,
        "bob@example.com",
        room_name="The Secret Garden",
        room_alias="#garden:hs.test",
        sender_display_name="Alice Liddell",
        room_type="m.space",
    )
    assert status == 200
    [mail] = await api.smtp.wait_for(1)
    assert mail.rcpt_tos == ("bob@example.com",)
    subject = str(mail.message["Subject"])
    text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Alice Liddell" in subject
    assert "The Secret Garden" in subject + text
    assert "Alice Liddell" in text and sender in text
    assert "space" in text


async def test_store_invite_email_escapes_room_fields_in_html(api: Api) -> None:
    sender, token = await api.register("alice")
    status, _ = await store_invite(
        api, token, sender, room_name="<b>Party</b>", sender_display_name="<script>x</script>"
    )
    assert status == 200
    [mail] = await api.smtp.wait_for(1)
    html = mail.message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<script>" not in html and "<b>Party</b>" not in html
    assert "&lt;b&gt;Party&lt;/b&gt;" in html


class TestJoinUrl:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "invites: {join_url: 'https://app.example/#/room/{room_id}'}"

    async def test_invite_email_links_to_the_room(self, api: Api) -> None:
        sender, token = await api.register("alice")
        assert (await store_invite(api, token, sender))[0] == 200
        [mail] = await api.smtp.wait_for(1)
        text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "https://app.example/#/room/%21garden%3Ahs.test" in text


async def test_store_invite_accepts_synapse_style_empty_optional_fields(api: Api) -> None:
    sender, token = await api.register("alice")
    # What Synapse sends for a room without name, alias, avatar or join rules.
    status, body = await store_invite(
        api,
        token,
        sender,
        room_alias="",
        room_avatar_url="",
        room_join_rules="",
        room_name="",
        sender_display_name=sender,
        sender_avatar_url="",
        **{"org.matrix.web_client_location": "https://app.element.io"},
    )
    assert status == 200, body
    [mail] = await api.smtp.wait_for(1)
    assert mail.rcpt_tos == ("bob@example.com",)


async def test_store_invite_for_a_bound_address_is_threepid_in_use(api: Api) -> None:
    sender, token = await api.register("alice")
    await api.add_binding("email", "bob@example.com", "@bob:hs.test")
    status, body = await store_invite(api, token, sender, "Bob@Example.com")
    assert (status, body["errcode"], body["mxid"]) == (400, "M_THREEPID_IN_USE", "@bob:hs.test")
    assert api.smtp.mails == []


async def test_create_unless_bound_writes_only_for_an_unbound_address(api: Api) -> None:
    store = InviteStore(api.server.db)
    await api.add_binding("email", "bob@example.com", "@bob:hs.test")

    def invite(invite_id: str, address: str) -> Invite:
        return Invite(
            id=invite_id,
            token=f"tok-{invite_id}",
            medium="email",
            address=address,
            room_id=ROOM,
            sender="@alice:hs.test",
            display_name="b...@e...",
            ephemeral_public_key="key",
            details={"room_name": "Room"},
            created_ts=1,
            state=PENDING,
            resolved_mxid=None,
            resolved_ts=None,
        )

    assert await store.create_unless_bound(invite("i1", "bob@example.com")) is False
    assert await store.create_unless_bound(invite("i2", "carol@example.com")) is True
    assert await store.by_id("i1") is None
    assert await store.by_id("i2") == invite("i2", "carol@example.com")


async def test_store_invite_whose_email_cannot_be_rendered_stores_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender, token = await api.register("alice")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("template broken")

    monkeypatch.setattr(api.server.invites, "_invite_email", broken)
    status, body = await store_invite(api, token, sender)
    assert (status, body["errcode"]) == (500, "M_UNKNOWN")
    assert await InviteStore(api.server.db).list(None, 10) == []
    assert api.smtp.mails == []


async def test_store_invite_with_unsupported_medium_is_unrecognized(api: Api) -> None:
    sender, token = await api.register("alice")
    status, body = await api.request(
        "POST",
        STORE_INVITE,
        token=token,
        json={"medium": "msisdn", "address": "15555550123", "room_id": ROOM, "sender": sender},
    )
    assert (status, body["errcode"]) == (400, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    ("field", "value", "errcode"),
    [
        ("address", "not-an-address", "M_INVALID_EMAIL"),
        ("address", "two@at@example.com", "M_INVALID_EMAIL"),
        ("room_id", "#garden:hs.test", "M_INVALID_PARAM"),
        ("room_id", "!", "M_INVALID_PARAM"),
        ("room_id", "!garden:hs.test\r\nX-Injected: 1", "M_INVALID_PARAM"),
        ("room_id", "!garden\x00:hs.test", "M_INVALID_PARAM"),
        ("room_id", "!garden room:hs.test", "M_INVALID_PARAM"),
        ("room_id", "!" + "a" * 100_000, "M_INVALID_PARAM"),
        ("room_id", "!" + "a" * 255, "M_INVALID_PARAM"),
        ("sender", "alice", "M_INVALID_PARAM"),
        ("medium", 3, "M_BAD_JSON"),
        ("room_name", 3, "M_BAD_JSON"),
    ],
)
async def test_store_invite_rejects_invalid_fields(
    api: Api, field: str, value: Any, errcode: str
) -> None:
    sender, token = await api.register("alice")
    body = {"medium": "email", "address": "bob@example.com", "room_id": ROOM, "sender": sender}
    body[field] = value
    status, err = await api.request("POST", STORE_INVITE, token=token, json=body)
    assert (status, err["errcode"]) == (400, errcode)
    assert api.smtp.mails == []
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM invites") == 0


@pytest.mark.parametrize(
    "room_id",
    ["!" + "a" * 254, "!AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdefg", "!r:hs.test:8448"],
)
async def test_store_invite_accepts_room_ids_up_to_255_characters(api: Api, room_id: str) -> None:
    sender, token = await api.register("alice")
    body = {"medium": "email", "address": "bob@example.com", "room_id": room_id, "sender": sender}
    status, answer = await api.request("POST", STORE_INVITE, token=token, json=body)
    assert status == 200, answer


async def test_store_invite_as_someone_else_is_forbidden(api: Api) -> None:
    _, token = await api.register("alice")
    status, body = await store_invite(api, token, "@mallory:hs.test")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert api.smtp.mails == []


async def test_store_invite_with_missing_fields_is_missing_params(api: Api) -> None:
    sender, token = await api.register("alice")
    full = {"medium": "email", "address": "bob@example.com", "room_id": ROOM, "sender": sender}
    for name in full:
        body = {k: v for k, v in full.items() if k != name}
        status, err = await api.request("POST", STORE_INVITE, token=token, json=body)
        assert (status, err["errcode"]) == (400, "M_MISSING_PARAMS"), name
        assert name in err["error"]


async def test_store_invite_needs_auth(api: Api) -> None:
    body = {"medium": "email", "address": "b@example.com", "room_id": ROOM, "sender": "@a:hs.test"}
    status, err = await api.request("POST", STORE_INVITE, json=body)
    assert (status, err["errcode"]) == (401, "M_UNAUTHORIZED")
    status, err = await api.request("POST", STORE_INVITE, token="nope", json=body)
    assert (status, err["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_store_invite_mail_failure_is_email_send_error_and_stores_nothing(api: Api) -> None:
    sender, token = await api.register("alice")
    api.smtp.rcpt_reply = "550 5.1.1 No such user"
    status, body = await store_invite(api, token, sender)
    assert (status, body["errcode"]) == (400, "M_EMAIL_SEND_ERROR")
    assert await InviteStore(api.server.db).list(None, 10) == []


async def test_same_address_invited_to_two_rooms_gets_two_invites(api: Api) -> None:
    sender, token = await api.register("alice")
    _, first = await store_invite(api, token, sender, room_id="!one:hs.test")
    _, second = await store_invite(api, token, sender, room_id="!two:hs.test")
    assert first["token"] != second["token"]
    assert first["public_keys"][1] != second["public_keys"][1]
    await api.smtp.wait_for(2)
    stored = await InviteStore(api.server.db).list(PENDING, 10)
    assert sorted(i.room_id for i in stored) == ["!one:hs.test", "!two:hs.test"]


class TestSenderRateLimit:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "ratelimits: {store_invite_per_sender: {limit: 2, period: 1h}}"

    async def test_store_invite_is_rate_limited_per_sender(
        self, api: Api, clock: FakeClock
    ) -> None:
        alice, alice_token = await api.register("alice")
        carol, carol_token = await api.register("carol")
        for n in range(2):
            status, _ = await store_invite(api, alice_token, alice, f"b{n}@example.com")
            assert status == 200
        status, body = await store_invite(api, alice_token, alice, "b2@example.com")
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert len(await InviteStore(api.server.db).list(None, 10)) == 2
        await api.smtp.wait_for(2)
        # Known to be over the limit now: refused without counting and without any SMTP.
        connections = api.smtp.connections
        status, body = await store_invite(api, alice_token, alice, "b9@example.com")
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert 0 < int(body["retry_after_ms"]) <= 3_600_000
        assert api.smtp.connections == connections
        assert await api.server.db.fetchval("SELECT MAX(hits) FROM rate_limits") == 3
        # Another sender is not affected, and the window ends.
        assert (await store_invite(api, carol_token, carol, "b2@example.com"))[0] == 200
        mails = await api.smtp.wait_for(3)
        # The refused invites' mails never arrived (the first was dropped before its end).
        assert [m.rcpt_tos for m in mails] == [
            ("b0@example.com",),
            ("b1@example.com",),
            ("b2@example.com",),
        ]
        clock.advance(3600)
        assert (await store_invite(api, alice_token, alice, "b3@example.com"))[0] == 200


async def test_the_eleventh_invite_to_one_address_in_a_day_is_refused_and_not_mailed(
    api: Api, clock: FakeClock
) -> None:
    senders = [await api.register(f"sender{n}") for n in range(4)]
    for n in range(10):
        sender, token = senders[n % 4]
        status, body = await store_invite(
            api, token, sender, "victim@example.com", f"!r{n}:hs.test"
        )
        assert status == 200, body
    await api.smtp.wait_for(10)
    # Whoever sends it and however the address is spelt, the address has had its 10 today.
    sender, token = senders[0]
    for spelling in ("victim@example.com", "Victim@EXAMPLE.com"):
        async with api.client.post(
            STORE_INVITE,
            headers={"Authorization": f"Bearer {token}"},
            json={"medium": "email", "address": spelling, "room_id": ROOM, "sender": sender},
        ) as resp:
            assert resp.status == 429
            body = await resp.json()
            assert body["errcode"] == "M_LIMIT_EXCEEDED"
            assert 0 < body["retry_after_ms"] <= 86_400_000
            assert int(resp.headers["Retry-After"]) > 0
    assert len(await InviteStore(api.server.db).list(None, 100)) == 10
    # Other addresses are not affected.
    assert (await store_invite(api, token, sender, "someone@example.com"))[0] == 200
    mails = await api.smtp.wait_for(11)
    assert len(mails) == 11
    assert [m.rcpt_tos for m in mails].count(("victim@example.com",)) == 10
    clock.advance(86_400)
    assert (await store_invite(api, token, sender, "victim@example.com"))[0] == 200


class TestInviteAddressLimitUnderConcurrency:
    @pytest.fixture
    def config_yaml(self) -> str:
        # One sender makes all the calls here; only the per-address limit is in play.
        return "ratelimits: {store_invite_per_sender: {limit: 10000, period: 1h}}"

    async def test_parallel_invites_to_one_address_store_and_mail_exactly_the_limit(
        self, api: Api
    ) -> None:
        sender, token = await api.register("alice")
        results = await asyncio.gather(
            *(
                store_invite(api, token, sender, "victim@example.com", f"!r{n}:hs.test")
                for n in range(200)
            )
        )
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 190
        stored = await InviteStore(api.server.db).list(None, 1000)
        tokens = {body["token"] for status, body in results if status == 200}
        assert {invite.token for invite in stored} == tokens
        await api.smtp.wait_for(10)
        await asyncio.sleep(0.2)  # a mail that was wrongly delivered would have arrived by now
        assert len(api.smtp.mails) == 10


class TestInviteIpLimit:
    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "ratelimits: {store_invite_per_ip: {limit: 3, period: 1h}}\n"
            "listen: {trusted_proxies: [127.0.0.1/32]}"
        )

    async def test_store_invite_is_limited_per_requesting_ip(
        self, api: Api, clock: FakeClock
    ) -> None:
        users = [await api.register(f"user{n}") for n in range(5)]

        async def invite_from(ip: str, n: int) -> tuple[int, Any]:
            sender, token = users[n]
            body = {"medium": "email", "address": f"b{n}@example.com", "room_id": ROOM}
            return await api.request(
                "POST",
                STORE_INVITE,
                token=token,
                json={**body, "sender": sender},
                headers={"X-Forwarded-For": ip},
            )

        # One homeserver (IP), different users and addresses.
        for n in range(3):
            assert (await invite_from("198.51.100.7", n))[0] == 200
        status, body = await invite_from("198.51.100.7", 3)
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert 0 < body["retry_after_ms"] <= 3_600_000
        # Another homeserver has its own budget.
        assert (await invite_from("198.51.100.8", 4))[0] == 200
        mails = await api.smtp.wait_for(4)
        assert sorted(m.rcpt_tos[0] for m in mails) == [
            "b0@example.com",
            "b1@example.com",
            "b2@example.com",
            "b4@example.com",
        ]
        assert len(await InviteStore(api.server.db).list(None, 10)) == 4
        clock.advance(3600)
        assert (await invite_from("198.51.100.7", 3))[0] == 200


class TestTermsNotAccepted:
    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "terms: {policies: {terms_of_service: {version: '1',"
            " languages: {en: {name: Terms, url: 'https://id.test/terms.html'}}}}}"
        )

    async def test_store_invite_and_sign_need_accepted_terms(self, api: Api) -> None:
        sender, token = await api.register("alice")
        status, body = await store_invite(api, token, sender)
        assert (status, body["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
        status, body = await api.request(
            "POST",
            SIGN_ED25519,
            token=token,
            json={"mxid": "@bob:hs.test", "token": "t", "private_key": "k"},
        )
        assert (status, body["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
        assert api.smtp.mails == []


# sign-ed25519


async def test_sign_ed25519_signs_mxid_sender_and_token_with_the_given_key(api: Api) -> None:
    sender, token = await api.register("alice")
    _, stored = await store_invite(api, token, sender)
    key = nacl.signing.SigningKey.generate()
    status, body = await api.request(
        "POST",
        SIGN_ED25519,
        token=token,
        json={
            "mxid": "@bob:hs.test",
            "token": stored["token"],
            "private_key": encode_base64(bytes(key)),
        },
    )
    assert status == 200, body
    assert {k: v for k, v in body.items() if k != "signatures"} == {
        "mxid": "@bob:hs.test",
        "sender": sender,
        "token": stored["token"],
    }
    assert list(body["signatures"]) == ["id.test"]
    assert list(body["signatures"]["id.test"]) == ["ed25519:0"]
    verify_key = signedjson.key.decode_verify_key_bytes("ed25519:0", bytes(key.verify_key))
    signedjson.sign.verify_signed_json(body, "id.test", verify_key)


async def test_sign_ed25519_accepts_a_url_safe_key(api: Api) -> None:
    sender, token = await api.register("alice")
    _, stored = await store_invite(api, token, sender)
    while True:  # a seed whose base64 shows the alphabet difference
        key = nacl.signing.SigningKey.generate()
        encoded = encode_base64(bytes(key))
        if "+" in encoded or "/" in encoded:
            break
    url_safe = encoded.replace("+", "-").replace("/", "_")
    status, body = await api.request(
        "POST",
        SIGN_ED25519,
        token=token,
        json={"mxid": "@bob:hs.test", "token": stored["token"], "private_key": url_safe},
    )
    assert status == 200, body
    verify_key = signedjson.key.decode_verify_key_bytes("ed25519:0", bytes(key.verify_key))
    signedjson.sign.verify_signed_json(body, "id.test", verify_key)


@pytest.mark.parametrize("invite_token", ["no-such-token", "a\x00b", "x" * 3000])
async def test_sign_ed25519_with_unknown_token_is_404_unrecognized(
    api: Api, invite_token: str
) -> None:
    _, token = await api.register("alice")
    key = encode_base64(bytes(nacl.signing.SigningKey.generate()))
    status, body = await api.request(
        "POST",
        SIGN_ED25519,
        token=token,
        json={"mxid": "@bob:hs.test", "token": invite_token, "private_key": key},
    )
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")


@pytest.mark.parametrize("private_key", ["", "not base64!", encode_base64(b"short"), "A" * 100])
async def test_sign_ed25519_with_a_bad_key_is_400(api: Api, private_key: str) -> None:
    sender, token = await api.register("alice")
    _, stored = await store_invite(api, token, sender)
    status, body = await api.request(
        "POST",
        SIGN_ED25519,
        token=token,
        json={"mxid": "@bob:hs.test", "token": stored["token"], "private_key": private_key},
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize("mxid", ["bob", "@bob", "#room:hs.test", "@:hs.test", "@bob:"])
async def test_sign_ed25519_with_a_bad_mxid_is_400(api: Api, mxid: str) -> None:
    sender, token = await api.register("alice")
    _, stored = await store_invite(api, token, sender)
    key = encode_base64(bytes(nacl.signing.SigningKey.generate()))
    status, body = await api.request(
        "POST",
        SIGN_ED25519,
        token=token,
        json={"mxid": mxid, "token": stored["token"], "private_key": key},
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


async def test_sign_ed25519_needs_auth_and_all_fields(api: Api) -> None:
    _, token = await api.register("alice")
    full = {"mxid": "@bob:hs.test", "token": "t", "private_key": "k"}
    status, err = await api.request("POST", SIGN_ED25519, json=full)
    assert (status, err["errcode"]) == (401, "M_UNAUTHORIZED")
    for name in full:
        body = {k: v for k, v in full.items() if k != name}
        status, err = await api.request("POST", SIGN_ED25519, token=token, json=body)
        assert (status, err["errcode"]) == (400, "M_MISSING_PARAMS"), name


# Binding the invited address delivers the invite (onbind)


async def test_binding_the_invited_address_delivers_a_signed_onbind(api: Api) -> None:
    alice, alice_token = await api.register("alice")
    _, stored = await store_invite(api, alice_token, alice, "bob@example.com")
    ephemeral_key = stored["public_keys"][1]["public_key"]
    pending = await InviteStore(api.server.db).by_token(stored["token"])
    assert pending is not None and pending.state == PENDING

    bob = await bind(api, "Bob@Example.com", "bob")

    # Queued with the bind, not yet sent (the delivery worker is stopped).
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.destination, entry.attempts) == ("pending", "hs.test", 0)
    assert api.homeserver.onbind_bodies == []
    resolved = await invite_state(api, pending.id)
    assert (resolved.state, resolved.resolved_mxid) == (BOUND, bob)

    assert await api.server.delivery_job.run_once() == 1
    [body] = api.homeserver.onbind_accepted
    [sent] = body["invites"]
    verify_server_signature(api, body)  # the request itself is signed too
    assert body == {
        "signatures": body["signatures"],
        "medium": "email",
        "address": "bob@example.com",
        "mxid": bob,
        "invites": [
            {
                "medium": "email",
                "address": "bob@example.com",
                "mxid": bob,
                "room_id": ROOM,
                "sender": alice,
                "signed": {
                    "mxid": bob,
                    "token": stored["token"],
                    "signatures": sent["signed"]["signatures"],
                },
            }
        ],
    }
    verify_ephemeral_signature(api, sent["signed"], ephemeral_key)
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (DELIVERED, 1)

    # The ephemeral key is revoked once delivered (a repeat of the onbind would be refused);
    # the long-term key stays valid.
    assert not await key_is_valid(api, f"https://id.test{EPHEMERAL_ISVALID}", ephemeral_key)
    assert await key_is_valid(
        api, f"https://id.test{ISVALID}", api.server.keyring.current.public_key
    )
    # Nothing more to send.
    assert await api.server.delivery_job.run_once() == 0
    assert len(api.homeserver.onbind_bodies) == 1


async def test_an_invite_stored_before_a_key_rotation_is_signed_with_its_own_key(
    api: Api,
) -> None:
    alice, alice_token = await api.register("alice")
    _, before = await store_invite(api, alice_token, alice, "bob@example.com")
    old_key = api.server.keyring.current
    assert before["public_key"] == old_key.public_key
    # `keys rotate` (the key file and the database), as the CLI does it.
    new_key = api.server.keyring.rotate()
    await SigningKeyStore(api.server.db).register(new_key.key_id, new_key.public_key, 0)
    _, after = await store_invite(
        api, alice_token, alice, "bob@example.com", room_id="!two:hs.test"
    )
    assert after["public_key"] == new_key.public_key

    await bind(api, "bob@example.com", "bob")
    assert await api.server.delivery_job.run_once() == 2
    bodies = {b["invites"][0]["signed"]["token"]: b for b in api.homeserver.onbind_accepted}
    # Each onbind request is signed with the long-term key its invite was stored under, which
    # stays valid; its `signed` block with the ephemeral key its room's invite event lists.
    for stored, key in ((before, old_key), (after, new_key)):
        body = bodies[stored["token"]]
        verify_server_signature(api, body, key)
        ephemeral = stored["public_keys"][1]["public_key"]
        verify_ephemeral_signature(api, body["invites"][0]["signed"], ephemeral)
    for key in (old_key, new_key):
        assert await key_is_valid(api, f"https://id.test{ISVALID}", key.public_key)


async def test_every_pending_invite_of_the_address_gets_its_own_onbind(api: Api) -> None:
    first = await invite(api, "bob@example.com", "!one:hs.test")
    second = await invite(api, "bob@example.com", "!two:hs.test")
    bob = await bind(api, "bob@example.com", "bob")
    assert await api.server.delivery_job.run_once() == 2
    delivered = {b["invites"][0]["signed"]["token"]: b for b in api.homeserver.onbind_accepted}
    assert set(delivered) == {first.token, second.token}
    assert delivered[first.token]["invites"][0]["room_id"] == "!one:hs.test"
    assert delivered[second.token]["invites"][0]["sender"] == second.sender
    assert all(b["mxid"] == bob for b in delivered.values())


async def test_bind_and_its_onbind_commit_together(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = await invite(api, "bob@example.com")

    async def broken_enqueue(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("outbox unavailable")

    monkeypatch.setattr(OutboxStore, "enqueue", broken_enqueue)
    bob, token = await api.register("bob")
    sid = await validated_session(api, token, "bob@example.com")
    status, body = await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": "s3cret", "mxid": bob}
    )
    assert (status, body["errcode"]) == (500, "M_UNKNOWN")
    # Neither the binding nor the resolution was kept.
    assert await lookup(api, token, "bob@example.com") is None
    assert (await invite_state(api, pending.id)).state == PENDING
    assert await outbox_of(api, pending.id) == []

    monkeypatch.undo()
    status, _ = await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": "s3cret", "mxid": bob}
    )
    assert status == 200
    assert len(await outbox_of(api, pending.id)) == 1


class TestDeliveryWorker:
    @pytest.fixture
    def config_yaml(self) -> str:
        # A poll interval no test waits for: only the wake-up after the bind can deliver.
        return "invites: {delivery: {poll_interval: 1h}}"

    async def test_bind_wakes_the_delivery_worker(self, api: Api, running_jobs: None) -> None:
        pending = await invite(api, "bob@example.com")
        bob = await bind(api, "bob@example.com", "bob")
        [body] = await api.homeserver.wait_for_onbind(1, within=5.0)
        assert body["mxid"] == bob
        assert body["invites"][0]["signed"]["token"] == pending.token


# The resolution timer


async def test_resolution_job_resolves_invites_of_addresses_bound_another_way(api: Api) -> None:
    pending = await invite(api, "bob@example.com")
    other = await invite(api, "carol@example.com")
    await api.add_binding("email", "bob@example.com", "@bob:hs.test")
    assert await outbox_of(api, pending.id) == []

    assert await api.server.resolution_job.run_once() == 1
    resolved = await invite_state(api, pending.id)
    assert (resolved.state, resolved.resolved_mxid) == (BOUND, "@bob:hs.test")
    assert (await invite_state(api, other.id)).state == PENDING
    assert await api.server.delivery_job.run_once() == 1
    [body] = api.homeserver.onbind_accepted
    assert body["mxid"] == body["invites"][0]["mxid"] == "@bob:hs.test"
    assert body["invites"][0]["signed"]["token"] == pending.token
    verify_ephemeral_signature(api, body["invites"][0]["signed"], pending.ephemeral_public_key)
    # Once only.
    assert await api.server.resolution_job.run_once() == 0
    assert len(await outbox_of(api, pending.id)) == 1
