"""Messages to users, as rendered by the generator and handed to a connector."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmailMessage:
    """An email to one recipient, with a plain-text and an HTML body."""

    # The recipient's address (``user@example.org``).
    to: str
    subject: str
    text: str
    html: str
    # The template it was rendered from (``invite_email``), for metrics and logs.
    template: str = ""


@dataclass(frozen=True)
class SmsMessage:
    """An SMS to one phone number."""

    # The recipient in E.164 digits without the leading ``+`` (``447700900123``), as Matrix
    # writes MSISDNs; the connector adds the ``+``.
    to: str
    text: str
    # The template it was rendered from (``validation_sms``), for metrics and logs.
    template: str = ""


class NotificationError(Exception):
    """A message could not be rendered or sent.

    ``str()`` is safe to log and to show to an operator: it never contains a credential, a
    validation token or a message body, and it names no full recipient address.

    ``code`` is the provider's code when there is one: Twilio's error code (``21211`` invalid
    number, ``21408`` region not permitted, ``21612`` cannot route, ``20003`` authentication
    failed) or the SMTP reply code (``550``...). ``status`` is Twilio's HTTP status.
    ``destination_rejected`` is true when the provider refused this destination for good (a
    region or number it will not send to): the API maps that to ``M_DESTINATION_REJECTED``.
    ``transient`` is true when trying again later may work (the server was unreachable, timed
    out, or answered with a temporary failure).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        status: int | None = None,
        destination_rejected: bool = False,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.destination_rejected = destination_rejected
        self.transient = transient
