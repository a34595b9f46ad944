"""Email and phone validation: requestToken, submitToken (JSON and link), getValidated3pid."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from appservice.clock import FakeClock
from appservice.db.ratelimits import RateLimitStore
from tests.support.api_server import Api

V2 = "/_matrix/identity/v2"
EMAIL_REQUEST = f"{V2}/validate/email/requestToken"
EMAIL_SUBMIT = f"{V2}/validate/email/submitToken"
MSISDN_REQUEST = f"{V2}/validate/msisdn/requestToken"
MSISDN_SUBMIT = f"{V2}/validate/msisdn/submitToken"
GET_VALIDATED = f"{V2}/3pid/getValidated3pid"


def link_from_mail(api: Api, index: int = -1) -> dict[str, str]:
    """sid, client_secret and token from the link in a received validation email."""
    message = api.smtp.mails[index].message
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    match = re.search(r"https://id\.test/_matrix/identity/v2/validate/email/submitToken\?\S+", text)
    assert match, text
    query = parse_qs(urlsplit(match.group(0)).query)
    return {key: values[0] for key, values in query.items()}


async def request_email(
    api: Api, token: str, email: str = "alice@example.com", secret: str = "s3cret", attempt: int = 1
) -> tuple[int, dict[str, str]]:
    return await api.request(
        "POST",
        EMAIL_REQUEST,
        token=token,
        json={"client_secret": secret, "email": email, "send_attempt": attempt},
    )


async def test_email_validation_round_trip(api: Api) -> None:
    _, token = await api.register()
    status, body = await request_email(api, token, email="Alice@Example.com")
    assert status == 200
    sid = body["sid"]
    mails = await api.smtp.wait_for(1)
    assert mails[0].rcpt_tos == ("alice@example.com",)
    link = link_from_mail(api)
    assert link["sid"] == sid and link["client_secret"] == "s3cret"
    assert len(link["token"]) >= 22  # at least 128 bits, URL-safe

    status, body = await api.request(
        "GET", f"{GET_VALIDATED}?sid={sid}&client_secret=s3cret", token=token
    )
    assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")

    assert await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": sid, "client_secret": "s3cret", "token": link["token"]},
    ) == (200, {"success": True})
    status, body = await api.request(
        "GET", f"{GET_VALIDATED}?sid={sid}&client_secret=s3cret", token=token
    )
    assert status == 200
    assert body["medium"] == "email"
    assert body["address"] == "alice@example.com"
    assert body["validated_at"] == api.server.clock.now_ms()


async def test_repeated_send_attempt_returns_same_sid_and_sends_nothing(api: Api) -> None:
    _, token = await api.register()
    _, first = await request_email(api, token, attempt=1)
    _, again = await request_email(api, token, attempt=1)
    _, lower = await request_email(api, token, attempt=0)
    assert first["sid"] == again["sid"] == lower["sid"]
    await api.smtp.wait_for(1)
    assert len(api.smtp.mails) == 1

    _, higher = await request_email(api, token, attempt=2)
    assert higher["sid"] == first["sid"]
    await api.smtp.wait_for(2)
    # The newest mail's token is the one that validates.
    newest = link_from_mail(api, -1)
    oldest = link_from_mail(api, 0)
    assert newest["token"] != oldest["token"]
    status, _body = await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": first["sid"], "client_secret": "s3cret", "token": newest["token"]},
    )
    assert status == 200


async def test_identical_requests_at_once_make_one_session_and_one_mail(api: Api) -> None:
    _, token = await api.register()
    answers = await asyncio.gather(*(request_email(api, token, secret="twins") for _ in range(4)))
    assert {status for status, _ in answers} == {200}
    assert len({body["sid"] for _, body in answers}) == 1
    await api.smtp.wait_for(1)
    await asyncio.sleep(0.3)  # a second mail would have arrived by now
    assert len(api.smtp.mails) == 1
    # The mailed token belongs to the session everyone was told about.
    link = link_from_mail(api)
    assert link["sid"] == answers[0][1]["sid"]
    status, _body = await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": link["sid"], "client_secret": "twins", "token": link["token"]},
    )
    assert status == 200


async def test_different_client_secret_is_a_different_session(api: Api) -> None:
    _, token = await api.register()
    _, a = await request_email(api, token, secret="one")
    _, b = await request_email(api, token, secret="two")
    assert a["sid"] != b["sid"]


@pytest.mark.parametrize(
    "email", ["not-an-email", "a@b@c", "Alice <alice@example.com>", "mailto:a@b.c", "a b@c.d", ""]
)
async def test_invalid_email_is_400_invalid_email(api: Api, email: str) -> None:
    _, token = await api.register()
    status, body = await request_email(api, token, email=email)
    assert (status, body["errcode"]) == (400, "M_INVALID_EMAIL")
    assert api.smtp.mails == []


@pytest.mark.parametrize(
    "secret", ["has space", "", "x" * 256, "ünïcode", "a/b", "s3cret\n", "a\x00b"]
)
async def test_bad_client_secret_is_400_invalid_param(api: Api, secret: str) -> None:
    _, token = await api.register()
    status, body = await request_email(api, token, secret=secret)
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


async def test_request_token_checks_fields(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request("POST", EMAIL_REQUEST, token=token, json={"email": "a@b.c"})
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
    status, body = await api.request(
        "POST",
        EMAIL_REQUEST,
        token=token,
        json={"email": "a@b.c", "client_secret": "x", "send_attempt": "1"},
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")


async def test_request_token_needs_auth(api: Api) -> None:
    status, body = await api.request(
        "POST", EMAIL_REQUEST, json={"client_secret": "x", "email": "a@b.c", "send_attempt": 1}
    )
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_wrong_token_counts_attempts_until_session_dies(api: Api) -> None:
    _, token = await api.register()
    _, body = await request_email(api, token)
    sid = body["sid"]
    await api.smtp.wait_for(1)
    good = link_from_mail(api)["token"]
    for left in (4, 3, 2, 1, 0):
        status, body = await api.request(
            "POST",
            EMAIL_SUBMIT,
            token=token,
            json={"sid": sid, "client_secret": "s3cret", "token": "wrong"},
        )
        assert (status, body["errcode"]) == (400, "M_TOKEN_INCORRECT")
        assert f"({left} attempt" in body["error"]
    status, body = await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": sid, "client_secret": "s3cret", "token": good},
    )
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")


async def test_unknown_session_or_wrong_secret_is_404_no_valid_session(api: Api) -> None:
    _, token = await api.register()
    _, body = await request_email(api, token)
    for sid, secret in [("nope", "s3cret"), (body["sid"], "other")]:
        status, err = await api.request(
            "POST",
            EMAIL_SUBMIT,
            token=token,
            json={"sid": sid, "client_secret": secret, "token": "t"},
        )
        assert (status, err["errcode"]) == (404, "M_NO_VALID_SESSION")
        status, err = await api.request(
            "GET", f"{GET_VALIDATED}?sid={sid}&client_secret={secret}", token=token
        )
        assert (status, err["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_session_expires_after_its_lifetime(api: Api, clock: FakeClock) -> None:
    _, token = await api.register()
    _, body = await request_email(api, token)
    await api.smtp.wait_for(1)
    clock.advance(24 * 3600 + 1)
    status, err = await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": body["sid"], "client_secret": "s3cret", "token": link_from_mail(api)["token"]},
    )
    assert (status, err["errcode"]) == (400, "M_SESSION_EXPIRED")


@pytest.mark.parametrize("attempt", [1, 2])
async def test_request_token_for_an_expired_session_starts_a_new_one(
    api: Api, clock: FakeClock, attempt: int
) -> None:
    _, token = await api.register()
    _, first = await request_email(api, token)
    await api.smtp.wait_for(1)
    clock.advance(24 * 3600 + 1)
    # The same or a higher send_attempt: either way the dead session is not resumed.
    status, second = await request_email(api, token, attempt=attempt)
    assert status == 200
    assert second["sid"] != first["sid"]
    await api.smtp.wait_for(2)
    link = link_from_mail(api)
    assert link["sid"] == second["sid"]
    assert await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": second["sid"], "client_secret": "s3cret", "token": link["token"]},
    ) == (200, {"success": True})
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 1


async def test_validation_extends_the_session_and_expired_ones_are_purged(
    api: Api, clock: FakeClock
) -> None:
    _, token = await api.register()
    _, body = await request_email(api, token)
    await api.smtp.wait_for(1)
    clock.advance(23 * 3600)
    await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": body["sid"], "client_secret": "s3cret", "token": link_from_mail(api)["token"]},
    )
    clock.advance(23 * 3600)  # 46 h after creation, 23 h after validation: still usable
    status, _ = await api.request(
        "GET", f"{GET_VALIDATED}?sid={body['sid']}&client_secret=s3cret", token=token
    )
    assert status == 200
    await api.server.purge_job.run_once()
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 1
    clock.advance(2 * 3600)
    await api.server.purge_job.run_once()
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0
    status, err = await api.request(
        "GET", f"{GET_VALIDATED}?sid={body['sid']}&client_secret=s3cret", token=token
    )
    assert (status, err["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_link_in_email_shows_success_page_without_auth(api: Api) -> None:
    _, token = await api.register()
    await request_email(api, token)
    await api.smtp.wait_for(1)
    link = link_from_mail(api)
    async with api.client.get(EMAIL_SUBMIT, params=link, allow_redirects=False) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert "<html" in page and "verified" in page.lower()


async def test_bad_link_shows_failure_page(api: Api) -> None:
    _, token = await api.register()
    _, body = await request_email(api, token)
    params = {"sid": body["sid"], "client_secret": "s3cret", "token": "wrong"}
    async with api.client.get(EMAIL_SUBMIT, params=params, allow_redirects=False) as resp:
        assert resp.status == 400
        assert resp.content_type == "text/html"
        assert "incorrect" in (await resp.text()).lower()
    async with api.client.get(EMAIL_SUBMIT, params={"sid": "x"}, allow_redirects=False) as resp:
        assert resp.status == 400
        assert resp.content_type == "text/html"


async def test_phone_validation_round_trip_through_twilio(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request(
        "POST",
        MSISDN_REQUEST,
        token=token,
        json={
            "client_secret": "s3cret",
            "country": "GB",
            "phone_number": "020 7946 0018",
            "send_attempt": 1,
        },
    )
    assert status == 200, body
    assert len(api.twilio.messages) == 1
    sms = api.twilio.messages[0]
    assert sms.to == "+442079460018"
    code = re.search(r"\b(\d{6})\b", sms.body)
    assert code, sms.body
    assert await api.request(
        "POST",
        MSISDN_SUBMIT,
        token=token,
        json={"sid": body["sid"], "client_secret": "s3cret", "token": code.group(1)},
    ) == (200, {"success": True})
    status, validated = await api.request(
        "GET", f"{GET_VALIDATED}?sid={body['sid']}&client_secret=s3cret", token=token
    )
    assert (validated["medium"], validated["address"]) == ("msisdn", "442079460018")


@pytest.mark.parametrize(("country", "number"), [("GB", "12"), ("XX", "02079460018"), ("gb", "x")])
async def test_invalid_phone_number_is_400_invalid_address(
    api: Api, country: str, number: str
) -> None:
    _, token = await api.register()
    status, body = await api.request(
        "POST",
        MSISDN_REQUEST,
        token=token,
        json={"client_secret": "s", "country": country, "phone_number": number, "send_attempt": 1},
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_ADDRESS")


async def test_sms_to_blocked_region_is_destination_rejected(api: Api) -> None:
    _, token = await api.register()
    api.twilio.blocked_prefixes.add("+44")
    status, body = await api.request(
        "POST",
        MSISDN_REQUEST,
        token=token,
        json={
            "client_secret": "s",
            "country": "GB",
            "phone_number": "020 7946 0018",
            "send_attempt": 1,
        },
    )
    assert (status, body["errcode"]) == (400, "M_DESTINATION_REJECTED")
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0


async def test_email_send_failure_is_reported_and_stores_nothing(api: Api) -> None:
    _, token = await api.register()
    api.smtp.rcpt_reply = "550 5.1.1 mailbox unavailable"
    status, body = await request_email(api, token)
    assert (status, body["errcode"]) == (400, "M_EMAIL_SEND_ERROR")
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0


async def test_email_that_cannot_be_rendered_stores_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, token = await api.register()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("template broken")

    monkeypatch.setattr(api.server.generator, "validation_email", broken)
    status, body = await request_email(api, token)
    assert (status, body["errcode"]) == (500, "M_UNKNOWN")
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0
    assert api.smtp.mails == []


async def test_failing_rate_limit_count_stores_nothing_and_sends_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, token = await api.register()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database gone")

    monkeypatch.setattr(RateLimitStore, "hit", broken)
    status, body = await request_email(api, token)
    assert (status, body["errcode"]) == (500, "M_UNKNOWN")
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0
    await asyncio.sleep(0.2)  # a mail that was wrongly delivered would have arrived by now
    assert api.smtp.mails == []


async def test_failed_resend_keeps_the_old_token_valid(api: Api) -> None:
    _, token = await api.register()
    _, body = await request_email(api, token, attempt=1)
    await api.smtp.wait_for(1)
    first = link_from_mail(api)
    api.smtp.rcpt_reply = "451 4.3.0 try later"
    status, err = await request_email(api, token, attempt=2)
    assert (status, err["errcode"]) == (400, "M_EMAIL_SEND_ERROR")
    assert await api.request(
        "POST",
        EMAIL_SUBMIT,
        token=token,
        json={"sid": body["sid"], "client_secret": "s3cret", "token": first["token"]},
    ) == (200, {"success": True})


class TestRateLimits:
    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "ratelimits: {request_token_per_address: {limit: 2, period: 1h},"
            " request_token_per_ip: {limit: 3, period: 1h}}"
        )

    async def test_per_address_limit(self, api: Api, clock: FakeClock) -> None:
        _, token = await api.register()
        for secret in ("a", "b"):
            assert (await request_email(api, token, secret=secret))[0] == 200
        status, body = await request_email(api, token, secret="c")
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert 0 < int(body["retry_after_ms"]) <= 3_600_000
        # The session written while the limit was counted was taken back.
        assert (
            await api.server.db.fetchval(
                "SELECT COUNT(*) FROM validation_sessions WHERE client_secret = 'c'"
            )
            == 0
        )
        # Known to be over the limit now: refused without counting and without any SMTP.
        connections = api.smtp.connections
        status, body = await request_email(api, token, secret="e")
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert api.smtp.connections == connections
        # A retry of a session made before the limit still gets its sid back, without mail.
        _, first = await request_email(api, token, secret="a")
        retry_status, retried = await request_email(api, token, secret="a")
        assert (retry_status, retried["sid"]) == (200, first["sid"])
        assert api.smtp.connections == connections
        # The per-address bucket counted a, b and c only; the refused mail never arrived.
        assert await api.server.db.fetchval("SELECT MAX(hits) FROM rate_limits") == 3
        clock.advance(3600)
        assert (await request_email(api, token, secret="d"))[0] == 200
        mails = await api.smtp.wait_for(3)
        assert len(mails) == 3

    async def test_per_ip_limit(self, api: Api) -> None:
        _, token = await api.register()
        for i in range(3):
            assert (await request_email(api, token, email=f"u{i}@example.com"))[0] == 200
        async with api.client.post(
            EMAIL_REQUEST,
            headers={"Authorization": f"Bearer {token}"},
            json={"client_secret": "s", "email": "u9@example.com", "send_attempt": 1},
        ) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) > 0

    async def test_retries_of_the_same_attempt_are_not_counted(self, api: Api) -> None:
        _, token = await api.register()
        for _ in range(5):
            assert (await request_email(api, token, secret="same"))[0] == 200


class TestValidationDisabled:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "session: {policy: {validation: {enabled: false}}}"

    async def test_request_token_is_403_forbidden(self, api: Api) -> None:
        _, token = await api.register()
        status, body = await request_email(api, token)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        assert "disabled" in body["error"]


def _twilio_says_invalid_number(api: Api) -> None:
    api.twilio.invalid_numbers.add("+442079460018")  # 400, error 21211


def _twilio_refuses_our_credentials(api: Api) -> None:
    api.twilio.auth_token = "rotated-elsewhere"  # 401, error 20003


def _twilio_is_down(api: Api) -> None:
    api.twilio.outage_status = 503  # not JSON, transient


@pytest.mark.parametrize(
    "break_twilio",
    [_twilio_says_invalid_number, _twilio_refuses_our_credentials, _twilio_is_down],
)
async def test_sms_send_failure_is_send_error_and_stores_nothing(
    api: Api, break_twilio: Any
) -> None:
    """Twilio refusing for any reason but the destination is ``M_SEND_ERROR``, not
    ``M_DESTINATION_REJECTED``; no session is left behind, so the same attempt can be retried."""
    _, token = await api.register()
    twilio_sid, twilio_token = api.twilio.account_sid, api.twilio.auth_token
    break_twilio(api)
    request = {
        "client_secret": "s",
        "country": "GB",
        "phone_number": "020 7946 0018",
        "send_attempt": 1,
    }
    status, body = await api.request("POST", MSISDN_REQUEST, token=token, json=request)
    assert (status, body["errcode"]) == (400, "M_SEND_ERROR"), body
    assert "2079460018" not in body["error"]  # the number is not echoed back
    assert len(api.twilio.requests) == 1  # Twilio was asked, and refused
    assert api.twilio.messages == []
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0

    # Once Twilio works again, the very same request (same send_attempt) sends an SMS: a failed
    # send left no session that would answer the retry with a sid and send nothing.
    api.twilio.invalid_numbers.clear()
    api.twilio.outage_status = None
    api.twilio.account_sid, api.twilio.auth_token = twilio_sid, twilio_token
    status, body = await api.request("POST", MSISDN_REQUEST, token=token, json=request)
    assert status == 200, body
    assert [sms.to for sms in api.twilio.messages] == ["+442079460018"]
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 1
