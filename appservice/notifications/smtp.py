"""Email over SMTP with aiosmtplib, reusing connections.

Up to ``max_connections`` SMTP sessions are open at once; a session that finished a mail is
kept for the next one for ``max_idle`` seconds (then closed with ``QUIT``), so a burst of mails
pays for one handshake (and TLS negotiation, and AUTH) per session instead of one per mail.
A mail counts as sent only when the server answered ``250`` to its data. A kept-alive session
that the server dropped in the meantime (it closes, or answers ``421``) is noticed at the first
command of the next mail, which is then retried once on a fresh session.

A mail can be *gated* on other work (storing the invite it announces): the envelope and the
message go to the server while that work runs, and only the end of data (the line with a single
dot, after which the server delivers) waits for it. If the work fails or declines, the session is
closed before the end of data, so the server discards the message (RFC 5321, 4.1.1.4). The
caller's database write and the SMTP round trips then overlap instead of adding up.

aiosmtplib opens each session (TLS, STARTTLS, EHLO, AUTH); the mail transactions then run on the
session's transport through ``_SessionLink``, because aiosmtplib reads one reply per command it
wrote and so cannot pipeline. When the server offers PIPELINING (RFC 2920, as Postfix and most
relays do), ``MAIL``, ``RCPT`` and ``DATA`` go out in one write and a mail costs two round trips
instead of four.
"""

from __future__ import annotations

import asyncio
import collections
import email.message
import email.policy
import email.utils
import logging
import re
import socket
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from appservice.config import ConfigError, SmtpConfig
from appservice.notifications.message import EmailMessage, NotificationError
from appservice.notifications.mime import build_message, encode_address_header

log = logging.getLogger(__name__)

# One address, no display name, no header syntax: what a client may register.
_ADDRESS = re.compile(r'[^\s@<>,;"()\[\]\\]+@[^\s@<>,;"()\[\]\\]+')
# Servers commonly limit the mails per session; start a fresh one before they complain.
_MAX_MAILS_PER_SESSION = 100


# A reply longer than this without its last line is not SMTP.
_MAX_REPLY = 64 * 1024


class _SessionLink(asyncio.Protocol):
    """The mail transactions' side of an open SMTP session: writes commands, queues replies.

    It takes over the transport from aiosmtplib once the session is set up. Every complete reply
    (its last line has a space after the code) is queued in order, so replies to pipelined
    commands are read one by one, whenever they arrive.
    """

    def __init__(self, transport: asyncio.BaseTransport, reply_timeout: float) -> None:
        self._transport = transport
        self._reply_timeout = reply_timeout
        self._buffer = bytearray()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._failure: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # One timer watches the reply being waited for: it is re-armed to the current deadline
        # when it fires, rather than a timer made and cancelled for every reply.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def is_connected(self) -> bool:
        """Whether commands can still be written."""
        return self._failure is None and not self._transport.is_closing()

    def data_received(self, data: bytes) -> None:
        """Queue each complete reply."""
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            if self._buffer[start + 3 : start + 4] != b"-":
                self._queue_reply(bytes(self._buffer[: end + 1]))
                del self._buffer[: end + 1]
                start = 0
            else:
                start = end + 1
        if len(self._buffer) > _MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Reply too long"))

    def eof_received(self) -> bool:
        """The server closed: close our side too."""
        self._fail(aiosmtplib.SMTPServerDisconnected("The server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake a reader waiting for a reply that will not come."""
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))

    def send(self, data: bytes) -> None:
        """Write commands or message data."""
        if not self.is_connected:
            raise self._failure or aiosmtplib.SMTPServerDisconnected("Connection lost")
        cast(asyncio.WriteTransport, self._transport).write(data)

    async def reply(self) -> SMTPResponse:
        """The next reply, in the order the commands were written; the connection is closed
        when none came within the reply timeout (a late one would be taken for the next
        command's)."""
        if not self._replies and self._failure is None:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._deadline = loop.time() + self._reply_timeout
            if self._timer is None:
                self._timer = loop.call_at(self._deadline, self._check_deadline)
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._failure is not None
        raise self._failure

    def _check_deadline(self) -> None:
        self._timer = None
        if self._waiter is None or self._failure is not None:
            return  # nothing awaited: the next wait arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for a reply"))
        else:
            self._timer = loop.call_at(self._deadline, self._check_deadline)

    def close(self) -> None:
        """Close the connection now (a message in progress is discarded by the server)."""
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection closed"))

    def _queue_reply(self, reply: bytes) -> None:
        lines = reply.split(b"\n")
        if not lines[0][:3].isdigit():
            self._fail(aiosmtplib.SMTPResponseException(-1, "Malformed reply"))
            return
        text = b"\n".join(line[4:].strip() for line in lines[:-1] or lines)
        self._replies.append(SMTPResponse(int(lines[0][:3]), text.decode("utf-8", "replace")))
        self._wake()

    def _fail(self, failure: aiosmtplib.SMTPException) -> None:
        if self._failure is None:
            self._failure = failure
            self._transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass(eq=False)
class _Session:
    """One SMTP connection, what its server offers, and its bookkeeping."""

    link: _SessionLink
    pipelining: bool
    smtputf8: bool
    mails: int = 0
    expiry: asyncio.TimerHandle | None = field(default=None)


class _BrokenSession(Exception):
    """The kept-alive session failed before the server saw anything of this mail."""


class _Abandoned(Exception):
    """The gate declined: the mail was dropped before its end of data."""


# Work a mail waits for before its end of data: True to deliver, False to drop the mail.
Gate = Awaitable[bool]


def _ascii_address(address: str) -> tuple[str, bool]:
    """The address with an ASCII (IDNA) domain, and whether its local part needs SMTPUTF8."""
    local, _, domain = address.rpartition("@")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise NotificationError("the recipient's domain is not a valid domain name") from e
    return f"{local}@{domain}", not local.isascii()


class SmtpConnector:
    """Sends email through one SMTP server (``notifications.email.smtp``)."""

    def __init__(
        self,
        config: SmtpConfig,
        sender: str,
        *,
        max_connections: int = 4,
        max_idle: float = 30.0,
    ) -> None:
        """Check the options and load the TLS trust store (at start-up, not per mail).

        ``sender`` is the ``From:`` header (``"Name <address>"`` or a bare address); its address
        is the envelope sender and its domain names the ``Message-ID``.
        """
        if config.security not in ("none", "starttls", "tls"):
            raise ConfigError(
                f'notifications.email.smtp.security: "{config.security}" is not one of '
                "none, starttls, tls"
            )
        _, address = email.utils.parseaddr(sender)
        if not _ADDRESS.fullmatch(address):
            raise ConfigError(f'notifications.email.sender: "{sender}" has no email address')
        self._config = config
        self._sender = sender
        self._envelope_from = address
        name = email.utils.parseaddr(sender)[0]
        # The From: header for each kind of message (7-bit, or SMTPUTF8), built once.
        self._from_headers = {
            utf8: encode_address_header(name, address, utf8) for utf8 in (False, True)
        }
        domain = address.rpartition("@")[2]
        try:
            self._msgid_domain = domain.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ConfigError(f'notifications.email.sender: "{domain}" is not a domain') from e
        self._tls_context: ssl.SSLContext | None = None
        if config.security != "none":
            self._tls_context = ssl.create_default_context()
            if config.ca_file is not None:
                try:
                    self._tls_context.load_verify_locations(cafile=config.ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError(
                        f'notifications.email.smtp.ca_file: cannot load "{config.ca_file}": {e}'
                    ) from e
        elif config.username is not None:
            log.warning(
                "SMTP credentials are configured with security: none; they cross the network "
                "in clear text"
            )
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Session] = []
        self._background: set[asyncio.Task[None]] = set()
        self._local_hostname: str | None = None
        self._closed = False

    @property
    def _where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    async def send_email(self, msg: EmailMessage, gate: Gate | None = None) -> bool:
        """Send ``msg``; return once the server accepted it, else raise ``NotificationError``.

        With ``gate``, the mail is transferred while ``gate`` runs and delivered only if it
        returns True; False drops the mail (and ``send_email`` returns False). ``gate`` is always
        awaited to its end, also when sending fails first; if it raises, that exception
        propagates (the mail was not delivered).
        """
        gate_task = asyncio.ensure_future(gate) if gate is not None else None
        try:
            data, recipient, utf8 = self._serialise(msg)
            if self._closed:
                raise NotificationError("the SMTP connector is closed")
            async with self._slots:
                if self._closed:
                    raise NotificationError("the SMTP connector is closed")
                await self._deliver(data, recipient, utf8, gate_task)
            return True
        except _Abandoned:
            return False
        except NotificationError as e:
            log.warning("Email not sent: %s", e)
            if gate_task is not None:
                await gate_task  # its own failure, if any, is the one to report
            raise
        finally:
            if gate_task is not None and not gate_task.done():
                # Cancelled or failed in an unexpected way: never leave the work half-awaited.
                await asyncio.shield(gate_task)

    async def close(self) -> None:
        """Wait for mails in flight, then end every session politely."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self._max_connections):
            await self._slots.acquire()
        idle, self._idle = self._idle, []
        for session in idle:
            if session.expiry is not None:
                session.expiry.cancel()
            self._quit_later(session)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for _ in range(self._max_connections):
            self._slots.release()

    # The message

    def _serialise(self, msg: EmailMessage) -> tuple[bytes, str, bool]:
        """The message as bytes for DATA, the envelope recipient, and whether it needs SMTPUTF8."""
        if not _ADDRESS.fullmatch(msg.to):
            raise NotificationError("the recipient is not a single email address")
        recipient, to_utf8 = _ascii_address(msg.to)
        utf8 = to_utf8 or not self._envelope_from.isascii()
        try:
            data = build_message(
                from_header=self._from_headers[utf8],
                # The domain in its ASCII (IDNA) form unless the address needs SMTPUTF8 anyway.
                to_header=msg.to if to_utf8 else recipient,
                subject=msg.subject,
                text=msg.text,
                html=msg.html,
                msgid_domain=self._msgid_domain,
                utf8=utf8,
            )
            return data, recipient, utf8
        except (ValueError, TypeError, UnicodeError) as e:
            raise NotificationError(f"the message cannot be encoded ({type(e).__name__})") from e

    # Sessions

    async def _deliver(
        self, data: bytes, recipient: str, utf8: bool, gate: asyncio.Future[bool] | None
    ) -> None:
        session = self._checkout()
        if session is not None:
            try:
                await self._transaction(session, data, recipient, utf8, gate)
                return
            except _BrokenSession:
                log.info("Kept-alive SMTP session to %s was closed; retrying once", self._where)
        session = await self._connect()
        try:
            await self._transaction(session, data, recipient, utf8, gate)
        except _BrokenSession as e:
            raise self._error(e.__cause__ or e, recipient) from e.__cause__

    def _checkout(self) -> _Session | None:
        while self._idle:
            session = self._idle.pop()
            if session.expiry is not None:
                session.expiry.cancel()
                session.expiry = None
            if session.link.is_connected:
                return session
            session.link.close()
        return None

    def _checkin(self, session: _Session) -> None:
        if self._closed or session.mails >= _MAX_MAILS_PER_SESSION:
            self._quit_later(session)
            return
        session.expiry = asyncio.get_running_loop().call_later(
            self._max_idle, self._expire, session
        )
        self._idle.append(session)

    def _expire(self, session: _Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
            session.expiry = None
            self._quit_later(session)

    def _quit_later(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(session))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quit(self, session: _Session) -> None:
        try:
            if session.link.is_connected:
                session.link.send(b"QUIT\r\n")
                async with asyncio.timeout(min(self._config.timeout, 5.0)):
                    await session.link.reply()
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            session.link.close()

    async def _connect(self) -> _Session:
        if self._local_hostname is None:
            # getfqdn may ask the resolver: not on the event loop.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        config = self._config
        smtp = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            username=config.username,
            password=config.password,
            local_hostname=self._local_hostname,
            timeout=float(config.timeout),
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            tls_context=self._tls_context,
        )
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()
        except (aiosmtplib.SMTPException, OSError) as e:
            smtp.close()
            raise self._error(e, None) from e
        except BaseException:
            smtp.close()
            raise
        transport = smtp.transport
        if transport is None or not smtp.is_connected:
            smtp.close()
            raise self._error(aiosmtplib.SMTPServerDisconnected("Connection lost"), None)
        link = _SessionLink(transport, float(config.timeout))
        transport.set_protocol(link)
        log.debug("Opened an SMTP session to %s", self._where)
        return _Session(
            link,
            pipelining=smtp.supports_extension("pipelining"),
            smtputf8=smtp.supports_extension("smtputf8"),
        )

    async def _transaction(
        self,
        session: _Session,
        data: bytes,
        recipient: str,
        utf8: bool,
        gate: asyncio.Future[bool] | None,
    ) -> None:
        """One mail on ``session``; checks the session back in unless it is spoilt.

        Raises ``_BrokenSession`` when the session was found dead at ``MAIL`` (nothing of this
        mail was delivered), ``_Abandoned`` when ``gate`` declined, ``NotificationError`` for
        any other failure; the gate's own exception propagates as is.
        """
        options = ""
        if utf8:
            if not session.smtputf8:
                self._checkin(session)
                raise NotificationError(
                    "the SMTP server does not accept internationalised addresses (SMTPUTF8)"
                )
            options = " SMTPUTF8"
        link = session.link
        reusable = False
        try:
            await self._envelope(session, recipient, options)
            # Dot-stuffing (RFC 5321, 4.5.2); build_message ends every line with CRLF already.
            message = data.replace(b"\r\n.", b"\r\n..")
            if message.startswith(b"."):
                message = b"." + message
            if gate is not None and not gate.done():
                # The server takes in the message while the gate's work runs.
                link.send(message)
                message = b""
            if gate is not None and not await gate:
                raise _Abandoned()
            link.send(message + b".\r\n")
            reply = await link.reply()
            if reply.code != 250:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
            session.mails += 1
            reusable = True
        except aiosmtplib.SMTPResponseException as e:
            # The server answered: the session is sound once the envelope is reset.
            reusable = e.code != 421 and await self._reset(link)
            raise self._error(e, recipient) from e
        except (aiosmtplib.SMTPException, OSError) as e:
            raise self._error(e, recipient) from e
        finally:
            if reusable and link.is_connected:
                self._checkin(session)
            else:
                link.close()

    async def _envelope(self, session: _Session, recipient: str, options: str) -> None:
        """``MAIL``, ``RCPT`` and ``DATA``; returns once the server is ready for the message.

        With PIPELINING the three commands are written at once and their replies read in order;
        without, each waits for the one before. Raises ``_BrokenSession`` when ``MAIL`` finds
        the session closed, else the first refusal as an aiosmtplib exception.
        """
        link = session.link
        encoding = "utf-8" if options else "ascii"
        commands = (
            f"MAIL FROM:<{self._envelope_from}>{options}\r\n".encode(encoding),
            f"RCPT TO:<{recipient}>\r\n".encode(encoding),
            b"DATA\r\n",
        )
        if session.pipelining:
            link.send(b"".join(commands))
        else:
            link.send(commands[0])
        try:
            reply = await link.reply()
        except aiosmtplib.SMTPServerDisconnected as e:
            raise _BrokenSession() from e
        if reply.code == 421:
            raise _BrokenSession() from aiosmtplib.SMTPResponseException(421, reply.message)
        refusal: aiosmtplib.SMTPResponseException | None = None
        if reply.code != 250:
            refusal = aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self._envelope_from)
            if not session.pipelining:
                raise refusal
        for command, expected in ((commands[1], (250, 251)), (commands[2], (354,))):
            if not session.pipelining:
                link.send(command)
            reply = await link.reply()
            if refusal is None and reply.code not in expected:
                if command is commands[1]:
                    refusal = aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
                else:
                    refusal = aiosmtplib.SMTPDataError(reply.code, reply.message)
                if not session.pipelining:
                    raise refusal
        if refusal is not None:
            if reply.code == 354:
                # In DATA after all: closing the session keeps the server from delivering.
                link.close()
            raise refusal

    async def _reset(self, link: _SessionLink) -> bool:
        try:
            link.send(b"RSET\r\n")
            reply = await link.reply()
        except (aiosmtplib.SMTPException, OSError):
            return False
        return reply.code == 250 and link.is_connected

    def _error(self, e: BaseException, recipient: str | None) -> NotificationError:
        """A ``NotificationError`` for an SMTP failure, naming neither addresses nor secrets."""
        if isinstance(e, aiosmtplib.SMTPResponseException):
            reply = e.message
            if recipient is not None:
                reply = re.sub(re.escape(recipient), "<recipient>", reply, flags=re.IGNORECASE)
            reply = " ".join(reply.split())[:200]
            if isinstance(e, aiosmtplib.SMTPAuthenticationError):
                what = "refused our credentials"
            elif isinstance(e, aiosmtplib.SMTPRecipientRefused):
                what = "refused the recipient"
            elif isinstance(e, aiosmtplib.SMTPSenderRefused):
                what = "refused the sender"
            elif isinstance(e, aiosmtplib.SMTPDataError):
                what = "refused the message"
            else:
                what = "refused"
            return NotificationError(
                f"the SMTP server {what} ({e.code} {reply})",
                code=e.code,
                transient=400 <= e.code < 500,
            )
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLError):
            reason = getattr(cause, "verify_message", None) or cause.reason or str(cause)
            return NotificationError(f"TLS with the SMTP server {self._where} failed: {reason}")
        if isinstance(e, TimeoutError):
            return NotificationError(f"the SMTP server {self._where} timed out", transient=True)
        if isinstance(e, aiosmtplib.SMTPConnectError):
            return NotificationError(
                f"cannot connect to the SMTP server {self._where}", transient=True
            )
        if isinstance(e, ConnectionError):
            return NotificationError(
                f"the SMTP server {self._where} closed the connection", transient=True
            )
        if isinstance(e, OSError):
            return NotificationError(
                f"cannot reach the SMTP server {self._where} ({type(e).__name__})",
                transient=True,
            )
        # aiosmtplib's own messages (e.g. STARTTLS not supported) carry no secrets.
        return NotificationError(f"SMTP with {self._where} failed: {e}")
