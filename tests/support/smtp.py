"""A real SMTP server on 127.0.0.1 that keeps what it receives (aiosmtpd), for tests.

It is started with ``loop.create_server`` on the test's own loop (aiosmtpd's
``Controller(port=0)`` is broken), counts the connections it accepts, can speak plain SMTP,
STARTTLS or implicit TLS with the test certificates, can require AUTH, and can be told to
refuse recipients or messages or to drop its connections::

    async with SmtpSink(security="starttls", certificates=certs) as sink:
        ...  # send to sink.port
        [mail] = await sink.wait_for(1)
        assert mail.message["Subject"] == "Hello"
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.tls import TestCertificates


@dataclass(frozen=True)
class ReceivedMail:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    # Parsed with the modern ``email`` policy: headers are decoded, ``get_body`` works.
    message: email.message.EmailMessage
    # Which connection (1, 2, ...) delivered it.
    connection: int
    authenticated_as: str | None


class _Handler:
    """aiosmtpd hooks: apply the sink's refusals, keep accepted mail."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # this hook's job once it exists
        if self._sink.pipelining:
            # aiosmtpd reads command by command, so it serves pipelined clients; it just
            # does not say so.
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        sink = self._sink
        # Were RCPT and DATA written together with MAIL (already buffered, unanswered)?
        buffered = getattr(server._reader, "_buffer", b"")
        if b"RCPT" in buffered and b"DATA" in buffered:
            sink.pipelined_envelopes += 1
        if sink.mail_replies:
            reply = sink.mail_replies.pop(0)
            if reply == SmtpSink.DROP and isinstance(server.transport, asyncio.Transport):
                # Vanish without a word, as a server that timed the session out.
                server.transport.abort()
            return reply
        if sink.credentials is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._sink.rcpt_reply is not None:
            return self._sink.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self._sink
        if sink.data_delay:
            await asyncio.sleep(sink.data_delay)
        if sink.data_reply is not None:
            return sink.data_reply
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        await sink._received(
            ReceivedMail(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=raw,
                message=message,
                connection=sink._connection_of.get(id(server), 0),
                authenticated_as=login.decode() if login is not None else None,
            )
        )
        return "250 2.0.0 Message accepted for delivery"


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol, telling the sink when a connection ends."""

    def __init__(self, sink: SmtpSink, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._sink._connection_lost()


class SmtpSink:
    """An SMTP server on 127.0.0.1 collecting every message it accepts."""

    # A "reply" to MAIL that drops the connection instead.
    DROP = "drop"

    def __init__(
        self,
        *,
        security: Literal["none", "starttls", "tls"] = "none",
        certificates: TestCertificates | None = None,
        credentials: tuple[str, str] | None = None,
        smtputf8: bool = False,
        pipelining: bool = True,
    ) -> None:
        """``certificates`` are needed for ``starttls`` and ``tls``.

        With ``credentials`` (user, password), ``AUTH`` is offered and ``MAIL`` is refused
        with 530 until the client logged in; with ``starttls`` it is offered only after
        STARTTLS. ``smtputf8`` offers the SMTPUTF8 extension (internationalised addresses).
        ``pipelining`` offers PIPELINING (RFC 2920), as Postfix and most relays do.
        """
        if security != "none" and certificates is None:
            raise ValueError("TLS needs the test certificates")
        self.security = security
        self.certificates = certificates
        self.credentials = credentials
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        # MAIL commands that arrived with their RCPT and DATA in the same write.
        self.pipelined_envelopes = 0
        self.port = 0
        self.mails: list[ReceivedMail] = []
        # How many connections were accepted, and how many of them have closed since.
        self.connections = 0
        self.closed_connections = 0
        # Replies to force: one per MAIL command (consumed in order; DROP drops the connection),
        # to every RCPT, to DATA.
        self.mail_replies: list[str] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        # Seconds to wait before answering the end of a message (a stalled server).
        self.data_delay = 0.0
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []
        self._connection_of: dict[int, int] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        ok = (
            self.credentials is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        # handled=False: aiosmtpd answers 535 itself on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def _new_protocol(self) -> SMTP:
        server_context = self.certificates.server_context() if self.certificates else None
        protocol = _SinkSMTP(
            self,
            _Handler(self),
            hostname="localhost",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=server_context if self.security == "starttls" else None,
            require_starttls=self.security == "starttls",
            authenticator=self._authenticate if self.credentials is not None else None,
            # Implicit TLS is invisible to aiosmtpd's check; plain AUTH is a test choice.
            auth_require_tls=self.security == "starttls",
            timeout=30,
            loop=asyncio.get_running_loop(),
        )
        self.connections += 1
        self._connection_of[id(protocol)] = self.connections
        self._protocols.append(protocol)
        return protocol

    async def start(self) -> None:
        """Listen on a free loopback port."""
        ssl_context: ssl.SSLContext | None = None
        if self.security == "tls":
            assert self.certificates is not None
            ssl_context = self.certificates.server_context()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_protocol, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop_connections(self) -> None:
        """Close every open connection from the server side, as an idle timeout would."""
        for protocol in self._protocols:
            if protocol.transport is not None and not protocol.transport.is_closing():
                protocol.transport.close()

    async def stop(self) -> None:
        """Stop listening, close the connections still open and end their handlers."""
        if self._server is None:
            return
        self._server.close()
        self.drop_connections()
        handlers: list[asyncio.Task[None]] = []
        for protocol in self._protocols:
            # After a failed STARTTLS handshake aiosmtpd is never told that the connection
            # ended: close the raw transport and end its handler here.
            original = protocol._original_transport
            if original is not None and not original.is_closing():
                original.close()
            handler = protocol._handler_coroutine
            if handler is not None and not handler.done():
                handler.cancel()
                handlers.append(handler)
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def _received(self, mail: ReceivedMail) -> None:
        async with self._changed:
            self.mails.append(mail)
            self._changed.notify_all()

    def _connection_lost(self) -> None:
        self.closed_connections += 1
        self._notify()

    async def wait_for(self, count: int, within: float = 5.0) -> list[ReceivedMail]:
        """Wait (at most ``within`` seconds) until ``count`` messages arrived; return them."""
        await self.wait_until(lambda: len(self.mails) >= count, within)
        return list(self.mails)

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (at most ``within`` seconds) until ``predicate()``, checked at each arrival of a
        mail and each closed connection, holds."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
