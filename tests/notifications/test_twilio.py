"""The Twilio connector against a loopback server speaking Twilio's Messages API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from appservice.config import SmsConfig, TwilioConfig
from appservice.config.model import Duration
from appservice.notifications import (
    LogConnector,
    NotificationError,
    SmsMessage,
    TwilioConnector,
    build_sms_connector,
)
from tests.support.twilio import FakeTwilio

FROM = "+15005550006"


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio() as server:
        yield server


@pytest.fixture
async def connector(twilio: FakeTwilio) -> AsyncIterator[TwilioConnector]:
    sms = TwilioConnector(config(twilio))
    yield sms
    await sms.close()


def config(twilio: FakeTwilio, **overrides: object) -> TwilioConfig:
    values: dict[str, object] = {
        "account_sid": twilio.account_sid,
        "auth_token": twilio.auth_token,
        "from_number": FROM,
        "base_url": twilio.base_url + "/",
        "timeout": Duration(5),
    }
    values.update(overrides)
    return TwilioConfig(**values)  # type: ignore[arg-type]


async def test_sms_is_posted_form_encoded_with_basic_auth(
    twilio: FakeTwilio, connector: TwilioConnector
) -> None:
    await connector.send_sms(SmsMessage(to="447700900123", text="Identity: code 123456"))
    [sms] = twilio.messages
    assert sms.to == "+447700900123"
    assert sms.from_ == FROM
    assert sms.messaging_service_sid is None
    assert sms.body == "Identity: code 123456"
    # One session, reused: a second message needs no new set-up.
    await connector.send_sms(SmsMessage(to="447700900124", text="again"))
    assert len(twilio.messages) == 2


async def test_messaging_service_replaces_from(twilio: FakeTwilio) -> None:
    sms = TwilioConnector(config(twilio, from_number="", messaging_service_sid="MG" + "0" * 32))
    try:
        await sms.send_sms(SmsMessage(to="15005550010", text="hi"))
    finally:
        await sms.close()
    [sent] = twilio.messages
    assert sent.from_ is None
    assert sent.messaging_service_sid == "MG" + "0" * 32


async def test_invalid_number_carries_twilio_code_without_the_number(
    twilio: FakeTwilio, connector: TwilioConnector, caplog: pytest.LogCaptureFixture
) -> None:
    twilio.invalid_numbers.add("+15005550001")
    with caplog.at_level(logging.WARNING), pytest.raises(NotificationError) as raised:
        await connector.send_sms(SmsMessage(to="15005550001", text="code 999111"))
    error = raised.value
    assert error.code == 21211
    assert error.status == 400
    assert not error.destination_rejected
    assert not error.transient
    assert "21211" in str(error)
    assert "is not a valid phone number" in str(error)
    assert "15005550001" not in str(error)
    assert "999111" not in str(error)
    assert "SMS not sent" in caplog.text and "15005550001" not in caplog.text
    assert twilio.messages == []


async def test_region_not_permitted_is_a_rejected_destination(
    twilio: FakeTwilio, connector: TwilioConnector
) -> None:
    twilio.blocked_prefixes.add("+99")
    with pytest.raises(NotificationError) as raised:
        await connector.send_sms(SmsMessage(to="99123456789", text="hi"))
    assert raised.value.code == 21408
    assert raised.value.destination_rejected


async def test_bad_credentials_do_not_leak_the_token(twilio: FakeTwilio) -> None:
    sms = TwilioConnector(config(twilio, auth_token="not-the-token"))
    try:
        with pytest.raises(NotificationError) as raised:
            await sms.send_sms(SmsMessage(to="15005550006", text="hi"))
    finally:
        await sms.close()
    assert raised.value.code == 20003
    assert raised.value.status == 401
    assert "not-the-token" not in str(raised.value)
    assert twilio.requests and twilio.messages == []


async def test_outage_without_json_is_transient(
    twilio: FakeTwilio, connector: TwilioConnector
) -> None:
    twilio.outage_status = 503
    with pytest.raises(NotificationError) as raised:
        await connector.send_sms(SmsMessage(to="15005550006", text="hi"))
    assert raised.value.status == 503
    assert raised.value.code is None
    assert raised.value.transient


async def test_unreachable_twilio_is_transient() -> None:
    server = FakeTwilio()
    await server.start()
    await server.stop()  # the port is now closed
    sms = TwilioConnector(config(server))
    try:
        with pytest.raises(NotificationError, match="cannot reach Twilio") as raised:
            await sms.send_sms(SmsMessage(to="15005550006", text="hi"))
    finally:
        await sms.close()
    assert raised.value.transient


async def test_non_digit_recipient_is_refused_before_sending(
    twilio: FakeTwilio, connector: TwilioConnector
) -> None:
    with pytest.raises(NotificationError, match=r"E\.164"):
        await connector.send_sms(SmsMessage(to="+15005550006", text="hi"))
    assert twilio.requests == []


async def test_log_connector_logs_sms_with_a_marker(caplog: pytest.LogCaptureFixture) -> None:
    sms = build_sms_connector(SmsConfig(connector="log"))
    assert isinstance(sms, LogConnector)
    with caplog.at_level(logging.INFO):
        await sms.send_sms(SmsMessage(to="15005550006", text="code 123456"))
    assert "[log connector, not sent] SMS to +15005550006: code 123456" in caplog.text
    await sms.close()


def test_factory_builds_the_twilio_connector() -> None:
    config = SmsConfig(
        connector="twilio",
        twilio=TwilioConfig(account_sid="AC1", auth_token="t", from_number=FROM),
    )
    assert isinstance(build_sms_connector(config), TwilioConnector)
