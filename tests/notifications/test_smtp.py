"""The SMTP connector against a real SMTP server (aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appservice.config import EmailConfig, SmtpConfig
from appservice.config.model import Duration
from appservice.notifications import (
    EmailMessage,
    LogConnector,
    MessageGenerator,
    NotificationError,
    SmtpConnector,
    build_email_connector,
)
from tests.support.smtp import SmtpSink
from tests.support.tls import TestCertificates, make_test_certificates

SENDER = "Ïdentity Sérvice <noreply@id.example.org>"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_test_certificates(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
async def sink(request: pytest.FixtureRequest) -> AsyncIterator[SmtpSink]:
    """A plain sink, with and without PIPELINING: every test runs both ways."""
    async with SmtpSink(pipelining=request.param) as server:
        yield server


def smtp_config(sink: SmtpSink, **overrides: object) -> SmtpConfig:
    values: dict[str, object] = {"host": "127.0.0.1", "port": sink.port, "timeout": Duration(5)}
    values.update(overrides)
    return SmtpConfig(**values)  # type: ignore[arg-type]


async def send(config: SmtpConfig, *messages: EmailMessage) -> None:
    connector = SmtpConnector(config, SENDER)
    try:
        for msg in messages:
            await connector.send_email(msg)
    finally:
        await connector.close()


def simple(to: str = "alice@example.com", subject: str = "Hello") -> EmailMessage:
    return EmailMessage(to=to, subject=subject, text="Plain body\n", html="<p>HTML body</p>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_validation_mail_arrives_as_utf8_multipart_alternative(sink: SmtpSink) -> None:
    generator = MessageGenerator(None, "Ïdentity ✓", "id.example.org", "https://id.example.org")
    msg = generator.validation_email("alice@example.com", "tok123", "sid9", "secret8", False)
    await send(smtp_config(sink), msg)
    [mail] = await sink.wait_for(1)

    assert mail.mail_from == "noreply@id.example.org"
    assert mail.rcpt_tos == ("alice@example.com",)
    m = mail.message
    assert m["From"] == SENDER
    assert m["To"] == "alice@example.com"
    assert m["Subject"] == "Verify your email address for Ïdentity ✓"
    assert m["Auto-Submitted"] == "auto-generated"
    assert email.utils.parsedate_to_datetime(m["Date"]).tzinfo is not None
    assert m["Message-ID"].endswith("@id.example.org>")
    # Headers went over the wire encoded (RFC 2047), the body as 7-bit-safe quoted-printable.
    assert mail.raw.isascii()
    subject_line = next(line for line in mail.raw.split(b"\r\n") if line.startswith(b"Subject:"))
    assert b"=?utf-8?" in subject_line
    assert m.get_content_type() == "multipart/alternative"
    text_part = m.get_body(("plain",))
    html_part = m.get_body(("html",))
    assert text_part is not None and html_part is not None
    assert text_part.get_content_charset() == "utf-8"
    assert html_part.get_content_charset() == "utf-8"
    link = (
        "https://id.example.org/_matrix/identity/v2/validate/email/submitToken"
        "?sid=sid9&client_secret=secret8&token=tok123"
    )
    assert link in text_part.get_content()
    assert link.replace("&", "&amp;") in html_part.get_content()
    assert "Ïdentity ✓" in html_part.get_content()


async def test_lines_starting_with_a_dot_arrive_intact(sink: SmtpSink) -> None:
    text = "first\n.hidden unless stuffed\n..two dots\n.\nlast\n"
    msg = EmailMessage(to="alice@example.com", subject="Dots", text=text, html=".<p>x</p>\n")
    await send(smtp_config(sink), msg, simple("next@example.com"))
    mails = await sink.wait_for(2)
    text_part = mails[0].message.get_body(("plain",))
    html_part = mails[0].message.get_body(("html",))
    assert text_part is not None and html_part is not None
    assert text_part.get_content().replace("\r\n", "\n") == text
    assert html_part.get_content().replace("\r\n", "\n") == ".<p>x</p>\n"
    # A lone dot in the body did not end the message early: the next mail is a mail of its own.
    assert mails[1].rcpt_tos == ("next@example.com",)


async def test_html_part_keeps_room_names_escaped(sink: SmtpSink) -> None:
    generator = MessageGenerator(None, "Identity", "id.example.org", "https://id.example.org")
    msg = generator.invite_email(
        "carol@example.com",
        sender="@m:example.org",
        sender_display_name="",
        room_id="!r:example.org",
        room_name="<script>alert(1)</script>",
        room_alias="",
        room_avatar_url="",
        room_type="",
        token="t",
        join_url="https://app.example.org/join",
    )
    await send(smtp_config(sink), msg)
    [mail] = await sink.wait_for(1)
    html_part = mail.message.get_body(("html",))
    assert html_part is not None
    html = html_part.get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_starttls_with_the_test_ca_and_auth(certificates: TestCertificates) -> None:
    async with SmtpSink(
        security="starttls", certificates=certificates, credentials=("mailer", "hunter2")
    ) as sink:
        config = smtp_config(
            sink,
            host="localhost",
            security="starttls",
            ca_file=str(certificates.ca_cert),
            username="mailer",
            password="hunter2",
        )
        await send(config, simple())
        [mail] = await sink.wait_for(1)
        assert mail.authenticated_as == "mailer"


async def test_implicit_tls_with_the_test_ca(certificates: TestCertificates) -> None:
    async with SmtpSink(security="tls", certificates=certificates) as sink:
        config = smtp_config(
            sink, host="localhost", security="tls", ca_file=str(certificates.ca_cert)
        )
        await send(config, simple())
        await sink.wait_for(1)


async def test_untrusted_certificate_is_refused(certificates: TestCertificates) -> None:
    async with SmtpSink(security="starttls", certificates=certificates) as sink:
        connector = SmtpConnector(smtp_config(sink, security="starttls"), SENDER)
        try:
            with pytest.raises(NotificationError, match=r"TLS .* failed"):
                await connector.send_email(simple())
        finally:
            await connector.close()
        assert sink.mails == []


async def test_starttls_required_but_not_offered_fails(sink: SmtpSink) -> None:
    config = smtp_config(sink, security="starttls")
    with pytest.raises(NotificationError, match="STARTTLS"):
        await send(config, simple())
    assert sink.mails == []


async def test_wrong_password_is_reported_without_the_password(
    certificates: TestCertificates,
) -> None:
    async with SmtpSink(
        security="tls", certificates=certificates, credentials=("mailer", "hunter2")
    ) as sink:
        config = smtp_config(
            sink,
            host="localhost",
            security="tls",
            ca_file=str(certificates.ca_cert),
            username="mailer",
            password="wrong-secret",
        )
        with pytest.raises(NotificationError) as raised:
            await send(config, simple())
        assert raised.value.code == 535
        assert "credentials" in str(raised.value)
        assert "wrong-secret" not in str(raised.value)
        assert sink.mails == []


async def test_missing_auth_is_refused(certificates: TestCertificates) -> None:
    async with SmtpSink(
        security="tls", certificates=certificates, credentials=("mailer", "hunter2")
    ) as sink:
        config = smtp_config(
            sink, host="localhost", security="tls", ca_file=str(certificates.ca_cert)
        )
        with pytest.raises(NotificationError) as raised:
            await send(config, simple())
        assert raised.value.code == 530


async def test_sequential_mails_share_one_connection(sink: SmtpSink) -> None:
    messages = [simple(f"user{i}@example.com") for i in range(20)]
    await send(smtp_config(sink), *messages)
    mails = await sink.wait_for(20)
    assert sorted(m.rcpt_tos[0] for m in mails) == sorted(m.to for m in messages)
    assert sink.connections == 1


async def test_concurrent_mails_use_a_bounded_pool(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(
                *(connector.send_email(simple(f"user{i}@example.com")) for i in range(20))
            )
        await sink.wait_for(20)
        assert 1 <= sink.connections <= 4
        # The pool is warm: more mails open no further connections.
        before = sink.connections
        await connector.send_email(simple())
        assert sink.connections == before
    finally:
        await connector.close()


async def test_connection_closed_by_the_server_while_idle_is_replaced(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    try:
        await connector.send_email(simple("first@example.com"))
        sink.drop_connections()
        await sink.wait_until(lambda: sink.closed_connections == 1)
        await connector.send_email(simple("second@example.com"))
        mails = await sink.wait_for(2)
        assert [m.rcpt_tos[0] for m in mails] == ["first@example.com", "second@example.com"]
        assert sink.connections == 2
    finally:
        await connector.close()


async def test_kept_alive_connection_dropped_at_mail_is_retried_once(
    sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    try:
        await connector.send_email(simple("first@example.com"))
        sink.mail_replies.append(SmtpSink.DROP)
        with caplog.at_level(logging.INFO):
            await connector.send_email(simple("second@example.com"))
        mails = await sink.wait_for(2)
        assert mails[1].connection == 2
        assert "retrying once" in caplog.text
    finally:
        await connector.close()


async def test_kept_alive_connection_closing_with_421_is_retried(
    sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    try:
        await connector.send_email(simple("first@example.com"))
        sink.mail_replies.append("421 4.4.2 Idle timeout, closing")
        with caplog.at_level(logging.INFO):
            await connector.send_email(simple("second@example.com"))
        mails = await sink.wait_for(2)
        assert mails[1].connection == 2
        assert "retrying once" in caplog.text
    finally:
        await connector.close()


async def test_fresh_connection_failing_is_not_retried(sink: SmtpSink) -> None:
    sink.mail_replies.append(SmtpSink.DROP)
    with pytest.raises(NotificationError) as raised:
        await send(smtp_config(sink), simple())
    assert raised.value.transient
    assert sink.connections == 1
    assert sink.mails == []


async def test_refused_recipient_is_an_error_and_the_connection_stays_usable(
    sink: SmtpSink,
) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    try:
        sink.rcpt_reply = "550 5.1.1 <nobody@example.com>: Recipient address rejected"
        with pytest.raises(NotificationError) as raised:
            await connector.send_email(simple("nobody@example.com"))
        error = raised.value
        assert error.code == 550
        assert not error.transient
        assert "refused the recipient" in str(error)
        assert "nobody@example.com" not in str(error)
        sink.rcpt_reply = None
        await connector.send_email(simple())
        await sink.wait_for(1)
        assert sink.connections == 1
    finally:
        await connector.close()


async def test_refused_sender_is_an_error_and_the_connection_stays_usable(
    sink: SmtpSink,
) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    try:
        sink.mail_replies.append("553 5.7.1 <noreply@id.example.org>: Sender address rejected")
        with pytest.raises(NotificationError) as raised:
            await connector.send_email(simple())
        assert raised.value.code == 553
        assert "refused the sender" in str(raised.value)
        await connector.send_email(simple("second@example.com"))
        [mail] = await sink.wait_for(1)
        assert mail.rcpt_tos == ("second@example.com",)
        assert sink.connections == 1
    finally:
        await connector.close()


async def test_envelope_is_one_write_when_the_server_offers_pipelining(sink: SmtpSink) -> None:
    await send(smtp_config(sink), *(simple(f"user{i}@example.com") for i in range(3)))
    mails = await sink.wait_for(3)
    assert [m.rcpt_tos for m in mails] == [(f"user{i}@example.com",) for i in range(3)]
    assert sink.pipelined_envelopes == (3 if sink.pipelining else 0)


async def test_gated_mail_is_delivered_only_once_the_gate_says_yes(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    gate_open = asyncio.Event()

    async def gate() -> bool:
        await gate_open.wait()
        return True

    try:
        sending = asyncio.create_task(connector.send_email(simple(), gate()))
        # The envelope and message reach the server while the gate is closed, but the server
        # gets no end of data, so it has nothing to deliver.
        await asyncio.sleep(0.3)
        assert sink.connections == 1
        assert sink.mails == [] and not sending.done()
        gate_open.set()
        assert await sending is True
        [mail] = await sink.wait_for(1)
        assert mail.rcpt_tos == ("alice@example.com",)
    finally:
        gate_open.set()
        await connector.close()


async def test_declined_gate_drops_the_mail_and_the_next_one_goes_out(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)

    async def no() -> bool:
        return False

    try:
        assert await connector.send_email(simple("dropped@example.com"), no()) is False
        assert await connector.send_email(simple()) is True
        [mail] = await sink.wait_for(1)
        assert mail.rcpt_tos == ("alice@example.com",)
        await asyncio.sleep(0.2)
        assert len(sink.mails) == 1
        # The unfinished message's session was closed, never reused.
        assert sink.connections == 2
    finally:
        await connector.close()


async def test_failing_gate_raises_its_own_error_and_delivers_nothing(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)

    async def broken() -> bool:
        await asyncio.sleep(0.05)
        raise RuntimeError("database down")

    try:
        with pytest.raises(RuntimeError, match="database down"):
            await connector.send_email(simple(), broken())
        await asyncio.sleep(0.2)
        assert sink.mails == []
    finally:
        await connector.close()


async def test_gate_runs_to_its_end_when_sending_fails(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    finished: list[bool] = []

    async def slow_store() -> bool:
        await asyncio.sleep(0.2)
        finished.append(True)
        return True

    try:
        sink.rcpt_reply = "550 5.1.1 Recipient address rejected"
        with pytest.raises(NotificationError):
            await connector.send_email(simple(), slow_store())
        assert finished == [True]
        assert sink.mails == []
    finally:
        await connector.close()


async def test_temporary_refusal_of_data_is_transient(sink: SmtpSink) -> None:
    sink.data_reply = "451 4.3.0 Try again later"
    with pytest.raises(NotificationError) as raised:
        await send(smtp_config(sink), simple())
    assert raised.value.code == 451
    assert raised.value.transient
    assert sink.mails == []


async def test_a_server_that_stops_answering_times_out_and_its_session_is_dropped(
    sink: SmtpSink,
) -> None:
    connector = SmtpConnector(smtp_config(sink, timeout=Duration(0.3)), SENDER)
    try:
        sink.data_delay = 1.0
        with pytest.raises(NotificationError) as raised:
            await connector.send_email(simple("slow@example.com"))
        assert raised.value.transient
        assert "timed out" in str(raised.value)
        sink.data_delay = 0.0
        await connector.send_email(simple("next@example.com"))
        await sink.wait_until(lambda: any(m.rcpt_tos == ("next@example.com",) for m in sink.mails))
        # The late answer to the stalled message is never read as the next mail's.
        assert next(m for m in sink.mails if m.rcpt_tos == ("next@example.com",)).connection == 2
    finally:
        await connector.close()


async def test_each_reply_gets_the_whole_timeout_on_a_kept_session(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink, timeout=Duration(0.4)), SENDER)
    try:
        await connector.send_email(simple("first@example.com"))
        # The first mail's wait armed the session's timer; this reply comes after that timer's
        # first deadline but within its own timeout.
        await asyncio.sleep(0.25)
        sink.data_delay = 0.3
        await connector.send_email(simple("second@example.com"))
        sink.data_delay = 0.0
        await asyncio.sleep(0.5)  # the timer fires with nothing awaited, then stays disarmed
        await connector.send_email(simple("third@example.com"))
        await sink.wait_until(lambda: len(sink.mails) == 3)
        assert {m.connection for m in sink.mails} == {1}
    finally:
        await connector.close()


async def test_server_down_is_a_transient_error(caplog: pytest.LogCaptureFixture) -> None:
    config = SmtpConfig(host="127.0.0.1", port=free_port(), timeout=Duration(5))
    with caplog.at_level(logging.WARNING), pytest.raises(NotificationError) as raised:
        await send(config, simple("secret-user@example.com"))
    assert raised.value.transient
    assert "cannot connect" in str(raised.value)
    assert "Email not sent" in caplog.text
    assert "secret-user" not in caplog.text


async def test_bad_recipient_is_refused_before_connecting(sink: SmtpSink) -> None:
    with pytest.raises(NotificationError, match="not a single email address"):
        await send(smtp_config(sink), simple("a@example.com\r\nBcc: b@example.com"))
    assert sink.connections == 0


async def test_internationalised_domain_is_sent_in_idna_form(sink: SmtpSink) -> None:
    await send(smtp_config(sink), simple("alice@bücher.example"))
    [mail] = await sink.wait_for(1)
    assert mail.rcpt_tos == ("alice@xn--bcher-kva.example",)
    assert mail.message["To"] == "alice@xn--bcher-kva.example"


async def test_internationalised_local_part_needs_smtputf8(sink: SmtpSink) -> None:
    with pytest.raises(NotificationError, match="SMTPUTF8"):
        await send(smtp_config(sink), simple("jörg@example.com"))
    async with SmtpSink(smtputf8=True) as utf8_sink:
        await send(smtp_config(utf8_sink), simple("jörg@example.com"))
        [mail] = await utf8_sink.wait_for(1)
        assert mail.rcpt_tos == ("jörg@example.com",)
        assert mail.message["To"] == "jörg@example.com"


async def test_closed_connector_refuses_to_send(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER)
    await connector.send_email(simple())
    await connector.close()
    with pytest.raises(NotificationError, match="closed"):
        await connector.send_email(simple())


async def test_idle_connections_are_closed_after_max_idle(sink: SmtpSink) -> None:
    connector = SmtpConnector(smtp_config(sink), SENDER, max_idle=0.05)
    try:
        await connector.send_email(simple())
        await sink.wait_until(lambda: sink.closed_connections == 1)
        await connector.send_email(simple())
        assert sink.connections == 2
    finally:
        await connector.close()


async def test_log_connector_logs_the_body_with_a_marker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connector = build_email_connector(EmailConfig(connector="log"))
    assert isinstance(connector, LogConnector)
    with caplog.at_level(logging.INFO):
        await connector.send_email(simple())
    assert "[log connector, not sent]" in caplog.text
    assert "Plain body" in caplog.text
    await connector.close()


def test_factory_builds_the_smtp_connector(tmp_path: Path) -> None:
    config = EmailConfig(connector="smtp", sender="Me <me@example.org>")
    assert isinstance(build_email_connector(config), SmtpConnector)
