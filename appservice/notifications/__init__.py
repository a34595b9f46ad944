"""Messages to users: templates rendered by the generator, delivered by a connector."""

from appservice.notifications.connectors import (
    EmailConnector,
    LogConnector,
    SmsConnector,
    build_email_connector,
    build_sms_connector,
)
from appservice.notifications.generator import MessageGenerator
from appservice.notifications.message import EmailMessage, NotificationError, SmsMessage
from appservice.notifications.smtp import SmtpConnector
from appservice.notifications.twilio import TwilioConnector

__all__ = [
    "EmailConnector",
    "EmailMessage",
    "LogConnector",
    "MessageGenerator",
    "NotificationError",
    "SmsConnector",
    "SmsMessage",
    "SmtpConnector",
    "TwilioConnector",
    "build_email_connector",
    "build_sms_connector",
]
