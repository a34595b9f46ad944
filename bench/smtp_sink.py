"""A loopback SMTP sink for the benchmark, run as its own process (``python bench/smtp_sink.py``).

It listens on 127.0.0.1 (a free port, printed as ``port <n>`` on stdout once it listens), really
accepts every message through aiosmtpd's SMTP protocol and counts the recipients it received.
Like Postfix and most relays it offers PIPELINING (RFC 2920); clients that do not pipeline
(sydent's smtplib) are served one command at a time as before.
Its own process keeps its CPU out of the load generator's and the server's.

Commands on stdin, one per line, each answered with one line on stdout:

- ``count <prefix>``: how many accepted recipients start with ``prefix``;
- ``total``: how many messages were accepted;
- ``quit``: stop (``bye``).
"""

from __future__ import annotations

import asyncio
import collections
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class CountingHandler:
    """aiosmtpd hooks that accept everything and count recipients by address."""

    def __init__(self) -> None:
        self.recipients: collections.Counter[str] = collections.Counter()
        self.messages = 0

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer PIPELINING: aiosmtpd reads one command at a time, so it serves it already."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count the message and each of its recipients."""
        self.messages += 1
        for rcpt in envelope.rcpt_tos:
            self.recipients[rcpt.lower()] += 1
        return "250 2.0.0 Message accepted for delivery"

    def count(self, prefix: str) -> int:
        """Accepted deliveries to recipients starting with ``prefix``."""
        prefix = prefix.lower()
        return sum(n for rcpt, n in self.recipients.items() if rcpt.startswith(prefix))


class LenientSMTP(SMTP):
    """aiosmtpd's SMTP server, tolerating long "lines".

    sydent hands smtplib a message with bare LF line endings (Jinja normalises its templates to
    LF, and smtplib does not fix the line endings of a ``bytes`` message), so to a strict server
    the whole body is one line over RFC 5321's 1,000 octets. Postfix and most MTAs accept such
    mail; so does this sink.
    """

    line_length_limit = 1 << 20


async def serve() -> None:
    """Listen, announce the port, answer commands until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    handler = CountingHandler()
    server = await loop.create_server(
        lambda: LenientSMTP(handler, hostname="localhost", timeout=60, loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                print("bye", flush=True)
                return
            command, _, argument = line.partition(" ")
            if command == "count":
                print(handler.count(argument), flush=True)
            elif command == "total":
                print(handler.messages, flush=True)
            else:
                print(f"error unknown command {command!r}", flush=True)
    finally:
        server.close()


if __name__ == "__main__":
    asyncio.run(serve())
