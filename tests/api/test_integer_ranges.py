"""Integers out of range are 400 M_INVALID_PARAM, never an OverflowError 500 (issue 14, item 6):
every integer field is checked against Matrix's canonical JSON range, on both databases."""

from __future__ import annotations

import pytest

from tests.api.test_validation import EMAIL_REQUEST, MSISDN_REQUEST, request_email
from tests.support.api_server import Api


@pytest.mark.parametrize("attempt", [2**63, 2**64 - 1, 2**53, -(2**53), -(2**63)])
@pytest.mark.parametrize("path", [EMAIL_REQUEST, MSISDN_REQUEST])
async def test_send_attempt_out_of_range_is_400_invalid_param(
    api: Api, path: str, attempt: int
) -> None:
    _, token = await api.register()
    body = {"client_secret": "big", "send_attempt": attempt}
    body |= (
        {"email": "alice@example.com"}
        if path == EMAIL_REQUEST
        else {"country": "GB", "phone_number": "020 7946 0018"}
    )
    status, answer = await api.request("POST", path, token=token, json=body)
    assert (status, answer["errcode"]) == (400, "M_INVALID_PARAM")
    assert api.smtp.mails == [] and api.twilio.messages == []
    count = await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions")
    assert count == 0


async def test_send_attempt_at_the_edges_of_the_range_is_accepted(api: Api) -> None:
    _, token = await api.register()
    for attempt in (-(2**53 - 1), 2**53 - 1):
        status, body = await request_email(api, token, attempt=attempt)
        assert status == 200, body
    await api.smtp.wait_for(2)


async def test_integer_beyond_64_bits_is_a_clear_400(api: Api) -> None:
    _, token = await api.register()
    raw = b'{"client_secret": "big", "email": "a@example.com", "send_attempt": ' + b"9" * 30 + b"}"
    status, body = await api.request(
        "POST", EMAIL_REQUEST, token=token, data=raw, headers={"Content-Type": "application/json"}
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize("expires_in", [2**63, -(2**63), 10**40])
async def test_register_expires_in_out_of_range_is_400_invalid_param(
    api: Api, expires_in: int
) -> None:
    body = {
        "access_token": "whatever",
        "token_type": "Bearer",
        "matrix_server_name": "hs.test",
        "expires_in": expires_in,
    }
    status, answer = await api.request("POST", "/_matrix/identity/v2/account/register", json=body)
    assert (status, answer["errcode"]) == (400, "M_INVALID_PARAM")
