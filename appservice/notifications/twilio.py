"""SMS through Twilio's Messages API (``POST /2010-04-01/Accounts/{sid}/Messages.json``)."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from appservice.config import TwilioConfig
from appservice.notifications.message import NotificationError, SmsMessage

log = logging.getLogger(__name__)

# Twilio error codes meaning "this destination will not get messages from this account":
# 21408 region not enabled, 21610 recipient unsubscribed (STOP), 21612 cannot route to the
# number, 21614 not a mobile number.
DESTINATION_REJECTED_CODES = frozenset({21408, 21610, 21612, 21614})


class TwilioConnector:
    """Sends SMS with one Twilio account (``notifications.sms.twilio``)."""

    def __init__(self, config: TwilioConfig) -> None:
        """Keep the settings; the HTTP session is opened at the first message."""
        self._config = config
        self._url = (
            f"{config.base_url.rstrip('/')}/2010-04-01/Accounts/"
            f"{quote(config.account_sid, safe='')}/Messages.json"
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            credentials = f"{self._config.account_sid}:{self._config.auth_token}".encode()
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self._config.timeout)),
                headers={
                    "Accept": "application/json",
                    "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii"),
                },
            )
        return self._session

    async def send_sms(self, msg: SmsMessage) -> None:
        """Send ``msg``; return once Twilio queued it (201), else raise ``NotificationError``."""
        if not msg.to.isdigit():
            raise NotificationError("the recipient is not an E.164 phone number")
        form = {"To": f"+{msg.to}", "Body": msg.text}
        if self._config.messaging_service_sid:
            form["MessagingServiceSid"] = self._config.messaging_service_sid
        else:
            form["From"] = self._config.from_number
        try:
            async with self._client().post(self._url, data=form) as response:
                status = response.status
                raw = await response.read()
        except TimeoutError as e:
            error = NotificationError("Twilio did not answer in time", transient=True)
            log.warning("SMS not sent: %s", error)
            raise error from e
        except aiohttp.ClientError as e:
            error = NotificationError(f"cannot reach Twilio ({type(e).__name__})", transient=True)
            log.warning("SMS not sent: %s", error)
            raise error from e
        body = _json_object(raw)
        if status in (200, 201):
            log.debug("Twilio queued SMS %s (%s)", body.get("sid"), body.get("status"))
            return
        error = _error(status, body, msg.to)
        log.warning("SMS not sent: %s", error)
        raise error

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _error(status: int, body: dict[str, Any], to: str) -> NotificationError:
    """Twilio's error (``code``, ``message``) without the destination number in it."""
    code = body.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    text = body.get("message")
    detail = ""
    if isinstance(text, str) and text:
        # Twilio quotes the number back ("The 'To' number +1... is not valid").
        text = text.replace(f"+{to}", "<recipient>")
        if len(to) >= 6:
            text = text.replace(to, "<recipient>")
        detail = ": " + " ".join(text.split())[:200]
    what = f"HTTP {status}" + (f", error {code}" if code is not None else "")
    return NotificationError(
        f"Twilio refused the SMS ({what}){detail}",
        code=code,
        status=status,
        destination_rejected=code in DESTINATION_REJECTED_CODES,
        transient=status == 429 or status >= 500,
    )
