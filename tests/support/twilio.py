"""A loopback stand-in for Twilio's Messages API, speaking its wire format, for tests.

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP Basic auth (account SID,
auth token) and a form body (``To``, ``From`` or ``MessagingServiceSid``, ``Body``) answers
201 with a message resource (``sid``, ``status: "queued"``...), or Twilio's error JSON
(``code``, ``message``, ``more_info``, ``status``)::

    async with FakeTwilio() as twilio:
        config = TwilioConfig(account_sid=twilio.account_sid, auth_token=twilio.auth_token,
                              from_number="+15005550006", base_url=twilio.base_url)
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web

_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


@dataclass(frozen=True)
class SentSms:
    """One message Twilio accepted."""

    sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str


class FakeTwilio:
    """Twilio's ``Messages.json`` on 127.0.0.1, for one account."""

    def __init__(self) -> None:
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.port = 0
        self.messages: list[SentSms] = []
        # Every request seen, accepted or not: (account SID in the path, form fields).
        self.requests: list[tuple[str, dict[str, str]]] = []
        # Numbers Twilio calls invalid (21211) and number prefixes of regions the account may
        # not send to (21408), both with their "+".
        self.invalid_numbers: set[str] = set()
        self.blocked_prefixes: set[str] = set()
        # When set, every request gets this HTTP status with a non-JSON body (an outage).
        self.outage_status: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """Where it listens (``TwilioConfig.base_url``)."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeTwilio:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _error(self, status: int, code: int, message: str) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status=status,
        )

    def _authorised(self, request: web.Request, account_sid: str) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        return (user, password) == (self.account_sid, self.auth_token) and (
            account_sid == self.account_sid
        )

    async def _create_message(self, request: web.Request) -> web.Response:
        account_sid = request.match_info["account_sid"]
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.requests.append((account_sid, form))
        if self.outage_status is not None:
            return web.Response(status=self.outage_status, text="upstream unavailable")
        if not self._authorised(request, account_sid):
            return self._error(401, 20003, "Authenticate")
        to = form.get("To", "")
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if "From" not in form and "MessagingServiceSid" not in form:
            return self._error(
                400,
                21603,
                "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
            )
        if not form.get("Body"):
            return self._error(400, 21602, "Message body is required.")
        if not _E164.fullmatch(to) or to in self.invalid_numbers:
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if any(to.startswith(prefix) for prefix in self.blocked_prefixes):
            return self._error(
                400,
                21408,
                f"Permission to send an SMS has not been enabled for the region indicated by "
                f"the 'To' number: {to}.",
            )
        sid = "SM" + secrets.token_hex(16)
        sms = SentSms(
            sid=sid,
            to=to,
            from_=form.get("From"),
            messaging_service_sid=form.get("MessagingServiceSid"),
            body=form["Body"],
        )
        self.messages.append(sms)
        now = format_datetime(datetime.now(UTC))
        resource: dict[str, Any] = {
            "account_sid": account_sid,
            "api_version": "2010-04-01",
            "body": sms.body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sms.from_,
            "messaging_service_sid": sms.messaging_service_sid,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {
                "media": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}/Media.json"
            },
            "to": to,
            "uri": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
        }
        return web.json_response(resource, status=201)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post(
            "/2010-04-01/Accounts/{account_sid}/Messages.json", self._create_message
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
