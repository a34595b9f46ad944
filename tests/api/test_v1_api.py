"""The general v1 API (``api.v1_enabled``): validation, bind, store-invite and sign-ed25519
without an account, on the v2 services; and everything of it unknown while v1 is off."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import nacl.signing
import pytest
import signedjson.key
import signedjson.sign
from unpaddedbase64 import decode_base64, encode_base64

from appservice.api.http import redact_query
from appservice.db.invites import InviteStore
from tests.api.test_validation import link_from_mail
from tests.support.api_server import Api

V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
V1_ON = "api: {v1_enabled: true}"
ROOM = "!garden:hs.test"

# Every path of the general v1 API that this module serves (the msisdn delegate's three are
# api/msisdn_delegate.py's, the keys and unbind are always served).
V1_PATHS = [
    ("GET", V1),
    ("GET", f"{V1}/lookup?medium=email&address=a@b.c"),
    ("POST", f"{V1}/bulk_lookup"),
    ("POST", f"{V1}/validate/email/requestToken"),
    ("POST", f"{V1}/validate/email/submitToken"),
    ("GET", f"{V1}/validate/email/submitToken?sid=1&client_secret=s&token=t"),
    ("GET", f"{V1}/validate/msisdn/submitToken?sid=1&client_secret=s&token=t"),
    ("POST", f"{V1}/3pid/bind"),
    ("POST", f"{V1}/store-invite"),
    ("POST", f"{V1}/sign-ed25519"),
]


@pytest.mark.parametrize(("method", "path"), V1_PATHS)
async def test_v1_paths_are_unrecognized_while_v1_is_off(api: Api, method: str, path: str) -> None:
    body = {
        "client_secret": "s3cret",
        "email": "alice@example.com",
        "send_attempt": 1,
        "sid": "1",
        "token": "t",
        "mxid": "@alice:hs.test",
        "medium": "email",
        "address": "bob@example.com",
        "room_id": ROOM,
        "sender": "@alice:hs.test",
        "private_key": "k",
    }
    status, answer = await api.request(method, path, json=body if method == "POST" else None)
    # The msisdn delegate (on by default) serves POST on that path: GET is then 405.
    expected = 405 if path.startswith(f"{V1}/validate/msisdn/") else 404
    assert (status, answer["errcode"]) == (expected, "M_UNRECOGNIZED")
    assert api.smtp.mails == []


async def request_v1_email(
    api: Api, address: str = "alice@example.com", secret: str = "s3cret", **kwargs: Any
) -> str:
    """POST v1 requestToken (JSON unless ``data``/``headers`` say otherwise); returns the sid."""
    before = len(api.smtp.mails)
    if not kwargs:
        kwargs["json"] = {"client_secret": secret, "email": address, "send_attempt": 1}
    status, body = await api.request("POST", f"{V1}/validate/email/requestToken", **kwargs)
    assert status == 200, body
    assert set(body) == {"sid"}
    await api.smtp.wait_for(before + 1)
    return str(body["sid"])


async def validated_v1_session(
    api: Api, address: str = "alice@example.com", secret: str = "s3cret"
) -> str:
    sid = await request_v1_email(api, address, secret)
    link = link_from_mail(api)
    status, body = await api.request("POST", f"{V1}/validate/email/submitToken", json=link)
    assert (status, body) == (200, {"success": True})
    return sid


def verify_server_signature(api: Api, signed: dict[str, Any]) -> None:
    key = signedjson.key.decode_verify_key_base64(
        "ed25519", "0", api.server.keyring.current.public_key
    )
    signedjson.sign.verify_signed_json(signed, "id.test", key)


def invite_mail_text(api: Api, index: int = -1) -> str:
    text: str = api.smtp.mails[index].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    return text


class TestV1Validation:
    @pytest.fixture
    def config_yaml(self) -> str:
        return V1_ON

    async def test_validate_bind_and_look_up_without_an_account(self, api: Api) -> None:
        """matrix-is-tester's v1 test_bind_and_lookup: the association that bind answers is
        the one the v1 lookup finds."""
        sid = await validated_v1_session(api, "Fake3@Nowhere.test")
        status, validated = await api.request(
            "GET", f"{V1}/3pid/getValidated3pid?sid={sid}&client_secret=s3cret"
        )
        assert status == 200, validated
        assert (validated["medium"], validated["address"]) == ("email", "fake3@nowhere.test")

        status, bound = await api.request(
            "POST",
            f"{V1}/3pid/bind",
            json={"sid": sid, "client_secret": "s3cret", "mxid": "@some_mxid:fake.test"},
        )
        assert status == 200, bound
        assert (bound["medium"], bound["address"], bound["mxid"]) == (
            "email",
            "fake3@nowhere.test",
            "@some_mxid:fake.test",
        )
        verify_server_signature(api, bound)
        status, found = await api.request(
            "GET", f"{V1}/lookup?medium=email&address=fake3@nowhere.test"
        )
        assert status == 200
        for name in ("mxid", "ts", "not_before", "not_after"):
            assert found[name] == bound[name], name
        # The v2 index has it too (a v1 bind is a binding like any other).
        h = api.server.lookup.hash_of("email", "fake3@nowhere.test")
        assert await api.server.bindings.mxids_by_hash([h]) == {h: "@some_mxid:fake.test"}

    async def test_the_email_link_validates_on_the_v1_path_too(self, api: Api) -> None:
        sid = await request_v1_email(api, "steve@nowhere.test", "verysekrit")
        link = link_from_mail(api)
        status, page = await api.request(
            "GET", f"{V1}/validate/email/submitToken?{urlencode(link)}"
        )
        assert status == 200 and "<html" in page.lower()
        status, validated = await api.request(
            "GET", f"{V1}/3pid/getValidated3pid?sid={sid}&client_secret=verysekrit"
        )
        assert (status, validated["address"]) == (200, "steve@nowhere.test")
        # A wrong token on the link is a failure page, not an error body and never a 500.
        status, page = await api.request(
            "GET", f"{V1}/validate/email/submitToken?sid={sid}&client_secret=x&token=nope"
        )
        assert 400 <= status < 500 and "<html" in page.lower()

    async def test_request_token_takes_a_form_body(self, api: Api) -> None:
        form = urlencode(
            {"client_secret": "s3cret", "email": "form@example.com", "send_attempt": 1}
        )
        sid = await request_v1_email(api, data=form.encode(), headers=FORM)
        link = link_from_mail(api)
        assert link["sid"] == sid
        status, body = await api.request(
            "POST", f"{V1}/validate/email/submitToken", data=urlencode(link).encode(), headers=FORM
        )
        assert (status, body) == (200, {"success": True})

    async def test_a_repeated_send_attempt_sends_nothing(self, api: Api) -> None:
        sid = await request_v1_email(api)
        status, body = await api.request(
            "POST",
            f"{V1}/validate/email/requestToken",
            json={"client_secret": "s3cret", "email": "alice@example.com", "send_attempt": 1},
        )
        assert (status, body) == (200, {"sid": sid})
        assert len(api.smtp.mails) == 1

    @pytest.mark.parametrize(
        ("kwargs", "errcode"),
        [
            ({"json": {"email": "a@example.com", "send_attempt": 1}}, "M_MISSING_PARAMS"),
            ({"json": {}}, "M_MISSING_PARAMS"),
            ({"data": b"", "headers": FORM}, "M_MISSING_PARAMS"),
            (
                {"json": {"client_secret": "s", "email": "a@b@c", "send_attempt": 1}},
                "M_INVALID_EMAIL",
            ),
            (
                {"json": {"client_secret": "s", "email": "a@example.com", "send_attempt": "x"}},
                "M_BAD_JSON",
            ),
            (
                {"json": {"client_secret": "s", "email": "a@example.com", "send_attempt": 2**70}},
                "M_INVALID_PARAM",
            ),
            (
                {"json": {"client_secret": "s p", "email": "a@example.com", "send_attempt": 1}},
                "M_INVALID_PARAM",
            ),
            (
                {"json": {"client_secret": 7, "email": "a@example.com", "send_attempt": 1}},
                "M_BAD_JSON",
            ),
            ({"json": [1, 2]}, "M_BAD_JSON"),
            (
                {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
                "M_NOT_JSON",
            ),
            (
                {"data": b"client_secret=a&client_secret=b&email=a@b.c&send_attempt=1"}
                | {"headers": FORM},
                "M_INVALID_PARAM",
            ),
            (
                {"data": b"client_secret=%ff&email=a@b.c&send_attempt=1", "headers": FORM},
                "M_INVALID_PARAM",
            ),
            (
                {"data": b"client_secret=s&email=a@b.c&send_attempt=9" + b"9" * 40}
                | {"headers": FORM},
                "M_BAD_JSON",
            ),
            ({"data": "&".join(["x=1"] * 200).encode(), "headers": FORM}, "M_INVALID_PARAM"),
        ],
    )
    async def test_request_token_refuses_bad_requests_with_matrix_errors(
        self, api: Api, kwargs: dict[str, Any], errcode: str
    ) -> None:
        status, body = await api.request("POST", f"{V1}/validate/email/requestToken", **kwargs)
        assert (status, body["errcode"]) == (400, errcode), body
        assert api.smtp.mails == []

    async def test_submit_token_refuses_a_wrong_token_and_missing_fields(self, api: Api) -> None:
        sid = await request_v1_email(api)
        path = f"{V1}/validate/email/submitToken"
        status, body = await api.request(
            "POST", path, json={"sid": sid, "client_secret": "s3cret", "token": "wrong"}
        )
        assert (status, body["errcode"]) == (400, "M_TOKEN_INCORRECT")
        status, body = await api.request("POST", path, json={"sid": sid})
        assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
        status, body = await api.request(
            "POST", path, json={"sid": "nope", "client_secret": "s3cret", "token": "t"}
        )
        assert status in (400, 404) and body["errcode"].startswith("M_")

    async def test_bind_needs_a_validated_session(self, api: Api) -> None:
        sid = await request_v1_email(api, "fakeemail5@nowhere.test")
        status, body = await api.request(
            "POST",
            f"{V1}/3pid/bind",
            json={"sid": sid, "client_secret": "s3cret", "mxid": "@commonapitests:fake.test"},
        )
        assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")

    @pytest.mark.parametrize(
        ("body", "errcode"),
        [
            ({"client_secret": "s3cret", "mxid": "@a:hs.test"}, "M_MISSING_PARAMS"),
            ({"sid": "1", "client_secret": "s3cret", "mxid": "alice"}, "M_INVALID_PARAM"),
            ({"sid": "1", "client_secret": "s3cret", "mxid": "@a:"}, "M_INVALID_PARAM"),
            ({"sid": 1, "client_secret": "s3cret", "mxid": "@a:hs.test"}, "M_BAD_JSON"),
        ],
    )
    async def test_bind_refuses_bad_requests(
        self, api: Api, body: dict[str, Any], errcode: str
    ) -> None:
        status, answer = await api.request("POST", f"{V1}/3pid/bind", json=body)
        assert (status, answer["errcode"]) == (400, errcode)

    async def test_bind_takes_a_form_body(self, api: Api) -> None:
        sid = await validated_v1_session(api, "formbind@example.com")
        form = urlencode({"sid": sid, "client_secret": "s3cret", "mxid": "@formbind:hs.test"})
        status, bound = await api.request(
            "POST", f"{V1}/3pid/bind", data=form.encode(), headers=FORM
        )
        assert (status, bound["mxid"]) == (200, "@formbind:hs.test")

    async def test_bulk_lookup_after_v1_binds(self, api: Api) -> None:
        """matrix-is-tester's v1 test_bulk_lookup."""
        for n in (1, 2):
            sid = await validated_v1_session(api, f"thing{n}@nowhere.test", f"secret{n}")
            status, _ = await api.request(
                "POST",
                f"{V1}/3pid/bind",
                json={"sid": sid, "client_secret": f"secret{n}", "mxid": f"@thing{n}:fake.test"},
            )
            assert status == 200
        asked = [["email", f"thing{n}@nowhere.test"] for n in (1, 2, 3)]
        status, body = await api.request("POST", f"{V1}/bulk_lookup", json={"threepids": asked})
        assert status == 200
        assert sorted(body["threepids"]) == [
            ["email", "thing1@nowhere.test", "@thing1:fake.test"],
            ["email", "thing2@nowhere.test", "@thing2:fake.test"],
        ]


class TestV1AllowedHomeservers:
    @pytest.fixture
    def config_yaml(self) -> str:
        return V1_ON + "\naccounts: {allowed_homeservers: [hs.test]}"

    async def test_bind_and_store_invite_only_for_allowed_homeservers(self, api: Api) -> None:
        sid = await validated_v1_session(api)
        status, body = await api.request(
            "POST",
            f"{V1}/3pid/bind",
            json={"sid": sid, "client_secret": "s3cret", "mxid": "@alice:other.test"},
        )
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        status, body = await api.request(
            "POST",
            f"{V1}/store-invite",
            json={
                "medium": "email",
                "address": "bob@example.com",
                "room_id": ROOM,
                "sender": "@alice:other.test",
            },
        )
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        assert len(api.smtp.mails) == 1  # the validation mail only
        status, body = await api.request(
            "POST",
            f"{V1}/3pid/bind",
            json={"sid": sid, "client_secret": "s3cret", "mxid": "@alice:hs.test"},
        )
        assert status == 200, body


JOIN_URL = (
    "https://app.example/#/room/{room_id}?email={email}&signurl={sign_url}"
    "&inviter_name={sender_display_name}"
)
# An operator template that shows every variable of the invite email, as matrix-is-tester's
# does (a JSON object).
ALL_FIELDS_TEMPLATE = (
    "{{ {'to': to, 'sender': sender, 'sender_display_name': sender_display_name,"
    " 'sender_avatar_url': sender_avatar_url, 'room_id': room_id, 'room_name': room_name,"
    " 'room_alias': room_alias, 'room_avatar_url': room_avatar_url, 'room_type': room_type,"
    " 'room_join_rules': room_join_rules, 'token': token, 'join_url': join_url,"
    " 'ephemeral_private_key': ephemeral_private_key, 'sign_url': sign_url} | tojson }}\n"
)
FULL_INVITE = {
    "medium": "email",
    "address": "ian@fake.test",
    "room_id": ROOM,
    "sender": "@sender:hs.test",
    "room_alias": "#alias:fake.test",
    "room_avatar_url": "mxc://fake.test/roomavatar",
    "room_name": "my excellent room",
    "room_type": "m.space",
    "room_join_rules": "invite",
    "sender_display_name": "Ian Sender",
    "sender_avatar_url": "mxc://fake.test/iansavatar",
}


def sign_url_from_mail(api: Api) -> str:
    """The signurl of the join link (JOIN_URL) in the last invite email."""
    text = invite_mail_text(api)
    match = re.search(r"https://app\.example/#/room/\S+", text)
    assert match, text
    fragment_query = urlsplit(urlsplit(match.group(0)).fragment).query
    return parse_qs(fragment_query)["signurl"][0]


def ephemeral_verify_key(public_key: str) -> Any:
    return signedjson.key.decode_verify_key_bytes("ed25519:0", decode_base64(public_key))


class TestV1Invites:
    @pytest.fixture
    def config_yaml(self) -> str:
        return V1_ON + f"\ninvites: {{join_url: '{JOIN_URL}'}}"

    async def test_store_invite_answers_keys_that_are_valid_and_mails_the_invitee(
        self, api: Api
    ) -> None:
        """matrix-is-tester's test_store_invite, without an account."""
        status, body = await api.request("POST", f"{V1}/store-invite", json=FULL_INVITE)
        assert status == 200, body
        assert len(body["token"]) > 0
        assert "ian@fake.test" not in body["display_name"]
        assert body["public_key"] == api.server.keyring.current.public_key
        assert len(body["public_keys"]) == 2
        for key in body["public_keys"]:
            path = urlsplit(key["key_validity_url"]).path
            status, valid = await api.request(
                "GET", f"{path}?{urlencode({'public_key': key['public_key']})}"
            )
            assert (status, valid) == (200, {"valid": True})
        [mail] = await api.smtp.wait_for(1)
        assert mail.rcpt_tos == ("ian@fake.test",)
        assert "Ian Sender" in invite_mail_text(api)

    async def test_store_invite_takes_a_form_body_as_old_homeservers_sent_it(
        self, api: Api
    ) -> None:
        form = urlencode(FULL_INVITE).encode()
        status, body = await api.request("POST", f"{V1}/store-invite", data=form, headers=FORM)
        assert status == 200, body
        stored = await InviteStore(api.server.db).by_token(body["token"])
        assert stored is not None
        assert stored.sender == "@sender:hs.test"
        assert stored.details["sender_avatar_url"] == "mxc://fake.test/iansavatar"

    async def test_store_invite_for_a_bound_address_is_threepid_in_use(self, api: Api) -> None:
        await api.add_binding("email", "already_here@fake.test", "@some_mxid:fake.test")
        status, body = await api.request(
            "POST",
            f"{V1}/store-invite",
            json={
                "medium": "email",
                "address": "already_here@fake.test",
                "room_id": ROOM,
                "sender": "@sender:hs.test",
            },
        )
        assert (status, body["errcode"], body["mxid"]) == (
            400,
            "M_THREEPID_IN_USE",
            "@some_mxid:fake.test",
        )

    @pytest.mark.parametrize(
        ("change", "errcode"),
        [
            ({"sender": None}, "M_MISSING_PARAMS"),
            ({"room_id": None}, "M_MISSING_PARAMS"),
            ({"medium": "msisdn"}, "M_UNRECOGNIZED"),
            ({"address": "not an address"}, "M_INVALID_EMAIL"),
            ({"sender": "sender"}, "M_INVALID_PARAM"),
            ({"room_id": "$aroom:fake.test"}, "M_INVALID_PARAM"),
            ({"room_name": 5}, "M_BAD_JSON"),
            ({"address": ["x"]}, "M_BAD_JSON"),
        ],
    )
    async def test_store_invite_refuses_bad_requests(
        self, api: Api, change: dict[str, Any], errcode: str
    ) -> None:
        body = {k: v for k, v in (FULL_INVITE | change).items() if v is not None}
        status, answer = await api.request("POST", f"{V1}/store-invite", json=body)
        assert (status, answer["errcode"]) == (400, errcode), answer
        assert api.smtp.mails == []

    async def test_the_invite_link_signs_for_the_invitee_with_the_ephemeral_key(
        self, api: Api
    ) -> None:
        """The third-party invite flow: the email's signurl, posted {mxid} without an account
        (as Element does), signs with the invite's ephemeral key, which store-invite answered
        (and the room's m.room.third_party_invite carries)."""
        status, stored = await api.request("POST", f"{V1}/store-invite", json=FULL_INVITE)
        assert status == 200
        await api.smtp.wait_for(1)
        sign_url = sign_url_from_mail(api)
        parts = urlsplit(sign_url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"https://id.test{V1}/sign-ed25519"
        assert parse_qs(parts.query)["token"] == [stored["token"]]
        ephemeral = ephemeral_verify_key(stored["public_keys"][1]["public_key"])

        target = f"{parts.path}?{parts.query}"
        status, signed = await api.request("POST", target, json={"mxid": "@ian:hs.test"})
        assert status == 200, signed
        assert {k: v for k, v in signed.items() if k != "signatures"} == {
            "mxid": "@ian:hs.test",
            "sender": "@sender:hs.test",
            "token": stored["token"],
        }
        signedjson.sign.verify_signed_json(signed, "id.test", ephemeral)

        # Older Element: everything in the query, a JSON null body.
        status, again = await api.request(
            "POST",
            f"{target}&mxid=%40ian%3Ahs.test",
            data=b"null",
            headers={"Content-Type": "application/json"},
        )
        assert status == 200, again
        signedjson.sign.verify_signed_json(again, "id.test", ephemeral)

    @pytest.mark.parametrize(
        ("change", "status", "errcode"),
        [
            ({"token": "no-such-token"}, 404, "M_UNRECOGNIZED"),
            ({"private_key": "not base64!"}, 400, "M_INVALID_PARAM"),
            ({"mxid": "ian"}, 400, "M_INVALID_PARAM"),
            ({"mxid": None}, 400, "M_MISSING_PARAMS"),
            ({"token": 5}, 400, "M_BAD_JSON"),
        ],
    )
    async def test_sign_ed25519_refuses_bad_requests(
        self, api: Api, change: dict[str, Any], status: int, errcode: str
    ) -> None:
        _, stored = await api.request("POST", f"{V1}/store-invite", json=FULL_INVITE)
        key = nacl.signing.SigningKey.generate()
        base = {
            "mxid": "@ian:hs.test",
            "token": stored["token"],
            "private_key": encode_base64(bytes(key)),
        }
        body = {k: v for k, v in (base | change).items() if v is not None}
        answer_status, answer = await api.request("POST", f"{V1}/sign-ed25519", json=body)
        assert (answer_status, answer["errcode"]) == (status, errcode)


class TestV1StoreInviteLimits:
    @pytest.fixture
    def config_yaml(self) -> str:
        return V1_ON + "\nratelimits: {store_invite_per_ip: {limit: 2, period: 1h}}"

    async def test_store_invite_is_limited_per_ip(self, api: Api) -> None:
        for n in range(2):
            body = FULL_INVITE | {"address": f"u{n}@example.com"}
            status, answer = await api.request("POST", f"{V1}/store-invite", json=body)
            assert status == 200, answer
        body = FULL_INVITE | {"address": "u9@example.com"}
        status, answer = await api.request("POST", f"{V1}/store-invite", json=body)
        assert (status, answer["errcode"]) == (429, "M_LIMIT_EXCEEDED")


class TestInviteEmailFields:
    """Every store-invite detail reaches the invite email's templates (v2 here)."""

    @pytest.fixture
    def config_yaml(self, tmp_path: Path) -> str:
        templates = tmp_path / "templates"
        templates.mkdir()
        (templates / "invite_email.txt").write_text(ALL_FIELDS_TEMPLATE)
        return (
            f"notifications: {{templates_dir: '{templates}'}}\ninvites: {{join_url: '{JOIN_URL}'}}"
        )

    async def test_a_template_gets_every_field_and_the_ephemeral_key(
        self, api: Api, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        sender, token = await api.register("sender")
        invite = FULL_INVITE | {"sender": sender}
        status, stored = await api.request("POST", f"{V2}/store-invite", token=token, json=invite)
        assert status == 200, stored
        await api.smtp.wait_for(1)
        fields = json.loads(invite_mail_text(api))
        for name in (
            "sender",
            "sender_display_name",
            "sender_avatar_url",
            "room_id",
            "room_name",
            "room_alias",
            "room_avatar_url",
            "room_type",
            "room_join_rules",
        ):
            assert fields[name] == invite[name], name
        assert fields["to"] == "ian@fake.test"
        assert fields["token"] == stored["token"]

        # The key in the mail is the invite's ephemeral key, kept with the invite.
        seed = decode_base64(fields["ephemeral_private_key"])
        public = nacl.signing.SigningKey(seed).verify_key
        assert bytes(public) == decode_base64(stored["public_keys"][1]["public_key"])
        row = await InviteStore(api.server.db).by_token(stored["token"])
        assert row is not None
        private_key = await InviteStore(api.server.db).ephemeral_private_key(row.id)
        assert private_key == fields["ephemeral_private_key"]
        # ... never in the invite's repr (logs) nor in what the store reads back or lists
        # (what `invites list` and `invites show` print).
        assert private_key is not None and private_key not in repr(row)
        assert row.ephemeral_private_key is None
        [listed] = await InviteStore(api.server.db).list(None, 10)
        assert listed.ephemeral_private_key is None

        # v1 is off: the sign URL is v2's, which takes the rest from its query with a token.
        parts = urlsplit(fields["sign_url"])
        assert parts.path == f"{V2}/sign-ed25519"
        assert parse_qs(parts.query) == {
            "token": [stored["token"]],
            "private_key": [fields["ephemeral_private_key"]],
        }
        assert fields["join_url"].startswith("https://app.example/#/room/%21garden%3Ahs.test?")
        _, invitee_token = await api.register("ian")
        status, signed = await api.request(
            "POST",
            f"{parts.path}?{parts.query}",
            token=invitee_token,
            json={"mxid": "@ian:hs.test"},
        )
        assert status == 200, signed
        public_key = stored["public_keys"][1]["public_key"]
        signedjson.sign.verify_signed_json(signed, "id.test", ephemeral_verify_key(public_key))
        # The same with every field in the body (the spec's form).
        status, signed = await api.request(
            "POST",
            f"{V2}/sign-ed25519",
            token=invitee_token,
            json={
                "mxid": "@ian:hs.test",
                "token": stored["token"],
                "private_key": fields["ephemeral_private_key"],
            },
        )
        assert status == 200, signed
        signedjson.sign.verify_signed_json(signed, "id.test", ephemeral_verify_key(public_key))
        # The key is in no log line at INFO (the test server's plain aiohttp access log aside:
        # the server's own access log redacts private_* query parameters).
        secret = fields["ephemeral_private_key"]
        logged = [r.getMessage() for r in caplog.records if r.name != "aiohttp.access"]
        assert logged and not [line for line in logged if secret in line]
        assert redact_query(f"/x?token=t&private_key={secret}") == (
            "/x?token=<redacted>&private_key=<redacted>"
        )
        # Without a token, v2 still refuses.
        status, answer = await api.request(
            "POST", f"{parts.path}?{parts.query}", json={"mxid": "@ian:hs.test"}
        )
        assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")

    async def test_the_ephemeral_private_key_goes_when_the_invite_is_resolved(
        self, api: Api
    ) -> None:
        sender, token = await api.register("sender")
        store = InviteStore(api.server.db)
        ids = []
        for address in ("bound@example.com", "expired@example.com"):
            invite = FULL_INVITE | {"sender": sender, "address": address}
            status, stored = await api.request(
                "POST", f"{V2}/store-invite", token=token, json=invite
            )
            assert status == 200, stored
            row = await store.by_token(stored["token"])
            assert row is not None
            assert await store.ephemeral_private_key(row.id) is not None
            ids.append(row.id)
        await api.add_binding("email", "bound@example.com", "@bound:hs.test")
        assert await api.server.invites.resolve_bound() == 1
        assert await api.server.invites.expire(ids[1]) is True
        for invite_id in ids:
            assert await store.ephemeral_private_key(invite_id) is None
            row = await store.by_id(invite_id)
            assert row is not None and row.state != "pending"
