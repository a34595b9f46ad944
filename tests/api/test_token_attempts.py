"""The wrong-token limit of validation sessions holds under concurrency, and a dead session is
never revived (issue 14, items 1 and 2), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from tests.support.api_server import Api

V2 = "/_matrix/identity/v2"
MSISDN_REQUEST = f"{V2}/validate/msisdn/requestToken"
MSISDN_SUBMIT = f"{V2}/validate/msisdn/submitToken"
GET_VALIDATED = f"{V2}/3pid/getValidated3pid"
MAX_ATTEMPTS = 5  # session.max_attempts, the default


async def request_sms(api: Api, token: str, attempt: int = 1) -> tuple[str, str]:
    """Start (or resend) a phone session; returns (sid, the code texted)."""
    before = len(api.twilio.messages)
    status, body = await api.request(
        "POST",
        MSISDN_REQUEST,
        token=token,
        json={
            "client_secret": "s3cret",
            "country": "GB",
            "phone_number": "020 7946 0018",
            "send_attempt": attempt,
        },
    )
    assert status == 200, body
    assert len(api.twilio.messages) == before + 1
    code = re.search(r"\b(\d{6})\b", api.twilio.messages[-1].body)
    assert code
    return body["sid"], code.group(1)


async def submit(api: Api, token: str, sid: str, code: str) -> tuple[int, Any]:
    return await api.request(
        "POST",
        MSISDN_SUBMIT,
        token=token,
        json={"sid": sid, "client_secret": "s3cret", "token": code},
    )


def wrong_codes(right: str, count: int) -> list[str]:
    """``count`` distinct six-digit codes, none of them ``right``."""
    return [c for c in (f"{n:06d}" for n in range(count + 1)) if c != right][:count]


def errcodes(answers: list[tuple[int, Any]]) -> list[str]:
    return [body["errcode"] if status != 200 else "OK" for status, body in answers]


async def test_concurrent_wrong_guesses_compare_at_most_max_attempts(api: Api) -> None:
    _, token = await api.register()
    sid, right = await request_sms(api, token)
    answers = await asyncio.gather(
        *(submit(api, token, sid, code) for code in wrong_codes(right, 500))
    )
    codes = errcodes(list(answers))
    # Exactly max_attempts guesses were compared (each says "incorrect"); every other one was
    # refused before any comparison.
    assert codes.count("M_TOKEN_INCORRECT") == MAX_ATTEMPTS
    assert codes.count("M_SESSION_EXPIRED") == 500 - MAX_ATTEMPTS
    assert {status for status, _ in answers} == {400}
    # The limit is used up: the right code is refused too, and nothing was validated.
    status, body = await submit(api, token, sid, right)
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")
    status, body = await api.request(
        "GET", f"{GET_VALIDATED}?sid={sid}&client_secret=s3cret", token=token
    )
    assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")


async def test_right_code_inside_a_burst_is_one_of_the_max_attempts(api: Api) -> None:
    _, token = await api.register()
    sid, right = await request_sms(api, token)
    guesses = wrong_codes(right, 500)
    guesses.insert(450, right)
    answers = await asyncio.gather(*(submit(api, token, sid, code) for code in guesses))
    codes = errcodes(list(answers))
    # Whether the right code got one of the attempts depends on arrival order; either way no
    # more than max_attempts codes were compared.
    assert codes.count("M_TOKEN_INCORRECT") + codes.count("OK") == MAX_ATTEMPTS
    assert codes.count("OK") == (1 if codes[450] == "OK" else 0)
    assert codes.count("M_SESSION_EXPIRED") == 501 - MAX_ATTEMPTS


async def test_right_code_after_wrong_ones_gives_its_attempt_back(api: Api) -> None:
    _, token = await api.register()
    sid, right = await request_sms(api, token)
    for code in wrong_codes(right, MAX_ATTEMPTS - 1):
        status, body = await submit(api, token, sid, code)
        assert (status, body["errcode"]) == (400, "M_TOKEN_INCORRECT")
    assert await submit(api, token, sid, right) == (200, {"success": True})
    # The right code did not use up the last attempt: submitting it again (a second click on
    # the link, a client retry) still works.
    assert await submit(api, token, sid, right) == (200, {"success": True})


async def test_resend_does_not_revive_a_dead_session(api: Api) -> None:
    _, token = await api.register()
    sid, right = await request_sms(api, token)
    for code in wrong_codes(right, MAX_ATTEMPTS):
        await submit(api, token, sid, code)
    status, body = await submit(api, token, sid, right)
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")

    # A higher send_attempt starts a new session (a new sid), not a fresh set of guesses on
    # the dead one.
    new_sid, new_code = await request_sms(api, token, attempt=2)
    assert new_sid != sid
    status, body = await submit(api, token, sid, new_code)
    assert (status, body["errcode"]) == (404, "M_NO_VALID_SESSION")
    assert await submit(api, token, new_sid, new_code) == (200, {"success": True})


async def test_resend_to_a_live_session_replaces_the_token_and_resets_its_attempts(
    api: Api,
) -> None:
    _, token = await api.register()
    sid, first = await request_sms(api, token)
    for code in wrong_codes(first, MAX_ATTEMPTS - 1):
        await submit(api, token, sid, code)
    same_sid, second = await request_sms(api, token, attempt=2)
    assert same_sid == sid
    codes = [c for c in wrong_codes(second, MAX_ATTEMPTS + 1) if c != first][:MAX_ATTEMPTS]
    answers = [await submit(api, token, sid, code) for code in codes]
    # The new token has its own max_attempts; then the session is dead.
    assert errcodes(answers) == ["M_TOKEN_INCORRECT"] * MAX_ATTEMPTS
    status, body = await submit(api, token, sid, second)
    assert (status, body["errcode"]) == (400, "M_SESSION_EXPIRED")
