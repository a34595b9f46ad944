"""How messages leave the server: the connector protocols, the log connector and the factories."""

from __future__ import annotations

import logging
from typing import Protocol

from appservice.config import EmailConfig, SmsConfig
from appservice.metrics import Metrics
from appservice.notifications.message import EmailMessage, NotificationError, SmsMessage
from appservice.notifications.smtp import Gate, SmtpConnector
from appservice.notifications.twilio import TwilioConnector

log = logging.getLogger(__name__)


class EmailConnector(Protocol):
    """Delivers emails."""

    async def send_email(self, msg: EmailMessage, gate: Gate | None = None) -> bool:
        """Send ``msg``; raise ``NotificationError`` when it was not accepted.

        With ``gate`` (work that stores what the mail announces), the mail is delivered only if
        ``gate`` returns True, and False is returned otherwise; ``gate`` always runs to its end
        and its exception, if any, propagates.
        """

    async def close(self) -> None:
        """Release connections (at shutdown)."""


class SmsConnector(Protocol):
    """Delivers SMS."""

    async def send_sms(self, msg: SmsMessage) -> None:
        """Send ``msg``; raise ``NotificationError`` when it was not accepted."""

    async def close(self) -> None:
        """Release connections (at shutdown)."""


class LogConnector:
    """Development: writes each message to the log at INFO and sends nothing.

    The text body is logged so that a developer can follow a validation link. Never use it in
    production: tokens end up in the log.
    """

    MARKER = "[log connector, not sent]"

    async def send_email(self, msg: EmailMessage, gate: Gate | None = None) -> bool:
        """Log the email (once ``gate`` allowed it)."""
        if gate is not None and not await gate:
            return False
        log.info("%s email to %s, subject %r:\n%s", self.MARKER, msg.to, msg.subject, msg.text)
        return True

    async def send_sms(self, msg: SmsMessage) -> None:
        """Log the SMS."""
        log.info("%s SMS to +%s: %s", self.MARKER, msg.to, msg.text)

    async def close(self) -> None:
        """Nothing to release."""


class CountedEmailConnector:
    """An email connector whose sent and failed mails are counted by template."""

    def __init__(self, inner: EmailConnector, metrics: Metrics) -> None:
        self.inner = inner
        self._sent = metrics.mails_sent
        self._failed = metrics.mails_failed

    async def send_email(self, msg: EmailMessage, gate: Gate | None = None) -> bool:
        """Send through the wrapped connector; a mail its gate held back is not counted."""
        template = msg.template or "other"
        try:
            sent = await self.inner.send_email(msg, gate)
        except NotificationError:
            self._failed.labels(template).inc()
            raise
        if sent:
            self._sent.labels(template).inc()
        return sent

    async def close(self) -> None:
        """Close the wrapped connector."""
        await self.inner.close()


class CountedSmsConnector:
    """An SMS connector whose sent and failed messages are counted by template."""

    def __init__(self, inner: SmsConnector, metrics: Metrics) -> None:
        self.inner = inner
        self._sent = metrics.sms_sent
        self._failed = metrics.sms_failed

    async def send_sms(self, msg: SmsMessage) -> None:
        """Send through the wrapped connector."""
        template = msg.template or "other"
        try:
            await self.inner.send_sms(msg)
        except NotificationError:
            self._failed.labels(template).inc()
            raise
        self._sent.labels(template).inc()

    async def close(self) -> None:
        """Close the wrapped connector."""
        await self.inner.close()


def build_email_connector(config: EmailConfig) -> EmailConnector:
    """The email connector ``notifications.email`` asks for."""
    if config.connector == "smtp":
        return SmtpConnector(config.smtp, config.sender)
    if config.connector == "log":
        log.warning("Emails are written to the log and not sent (notifications.email: log)")
        return LogConnector()
    raise ValueError(f"unknown email connector {config.connector!r}")


def build_sms_connector(config: SmsConfig) -> SmsConnector:
    """The SMS connector ``notifications.sms`` asks for."""
    if config.connector == "twilio":
        return TwilioConnector(config.twilio)
    if config.connector == "log":
        log.warning("SMS are written to the log and not sent (notifications.sms: log)")
        return LogConnector()
    raise ValueError(f"unknown SMS connector {config.connector!r}")
