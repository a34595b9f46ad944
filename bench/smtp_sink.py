"""A loopback SMTP sink for the benchmark, run as its own process (``python bench/smtp_sink.py``).

It listens on 127.0.0.1 (a free port, printed as ``port <n>`` on stdout once it listens), really
accepts every message over SMTP and counts the recipients it received. Its own process keeps its
CPU out of the load generator's and the servers'; it still shares their cores, so it should cost
little per mail, as a real MTA (Postfix, in C) does.

Two implementations, chosen with ``--impl``:

- ``lean`` (the default): a small SMTP server (the RFC 5321 subset a mail submission needs)
  written on ``asyncio.Protocol``. It looks for the end of the data with one ``bytes.find`` per
  read instead of handling the message line by line, and answers every command of a read in one
  write. It offers PIPELINING (RFC 2920) like Postfix and most relays.
- ``aiosmtpd``: aiosmtpd's SMTP server, which reads DATA line by line in Python (about 0.8 ms
  of CPU per 5 KB quoted-printable mail, measured), with PIPELINING offered too.

Clients that do not pipeline (sydent's smtplib) are served one command at a time by either.

Commands on stdin, one per line, each answered with one line on stdout:

- ``count <prefix>``: how many accepted recipients start with ``prefix``;
- ``total``: how many messages were accepted;
- ``cpu``: CPU seconds (user + system) this process has used so far (``time.process_time()``);
- ``quit``: stop (``bye``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import sys
import time
from collections.abc import Callable, Iterable

from aiosmtpd.smtp import SMTP, Envelope, Session

# What EHLO announces as SIZE (RFC 1870); bigger messages are refused with 552.
SIZE_LIMIT = 32 * 1024 * 1024
# Longest command line (without its line ending) the lean server takes; longer ones get a 500.
MAX_COMMAND_LINE = 4096
END_OF_DATA = b"\r\n.\r\n"
_DIGITS = "0123456789"


class Counts:
    """Accepted messages, and accepted deliveries per (lowercased) recipient.

    Recipients are kept in one ``Counter`` per *stem*, their address up to the ``@`` without its
    trailing digits: the bench's addresses are ``<prefix><i>@bench.example``, so ``count`` adds up
    whole groups instead of scanning every recipient of the run, which would cost milliseconds
    of the sink's CPU per question late in a long run (and show up in its CPU per mail).
    """

    def __init__(self) -> None:
        self.messages = 0
        self._groups: dict[str, collections.Counter[str]] = {}
        self._group_totals: collections.Counter[str] = collections.Counter()

    def add(self, recipients: Iterable[str]) -> None:
        """Count one accepted message and a delivery to each of its recipients."""
        self.messages += 1
        for rcpt in recipients:
            rcpt = rcpt.lower()
            stem = rcpt.partition("@")[0].rstrip(_DIGITS)
            group = self._groups.get(stem)
            if group is None:
                group = self._groups[stem] = collections.Counter()
            group[rcpt] += 1
            self._group_totals[stem] += 1

    def count(self, prefix: str) -> int:
        """Accepted deliveries to recipients starting with ``prefix``."""
        prefix = prefix.lower()
        total = 0
        for stem, group in self._groups.items():
            # Every address of a group starts with its stem, so a matching address's stem is
            # either longer than the prefix (the whole group matches) or a prefix of it.
            if stem.startswith(prefix):
                total += self._group_totals[stem]
            elif prefix.startswith(stem):
                total += sum(n for rcpt, n in group.items() if rcpt.startswith(prefix))
        return total


# --------------------------------------------------------------------------------------------
# lean: SMTP on asyncio.Protocol
# --------------------------------------------------------------------------------------------

_EHLO_REPLY = (
    b"250-localhost\r\n"
    b"250-PIPELINING\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 SIZE " + str(SIZE_LIMIT).encode() + b"\r\n"
)
_NOT_IMPLEMENTED = frozenset({"EXPN", "HELP", "TURN", "ETRN", "AUTH", "STARTTLS", "BDAT"})


def _path(argument: str, keyword: str) -> tuple[str, list[str]] | None:
    """The address and parameters of ``FROM:<address> params`` (``keyword`` = ``FROM:``)."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword) :].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        return rest[1:end], rest[end + 1 :].split()
    # Lenient, like most servers: a bare address without angle brackets.
    address, _, parameters = rest.partition(" ")
    return address, parameters.split()


class LeanSMTP(asyncio.Protocol):
    """One SMTP connection: commands until ``DATA``, then the message until ``<CRLF>.<CRLF>``.

    Every complete command of a read is answered, and all the replies go out in one write, as
    real servers do when they flush once their input is drained (RFC 2920): our server writes
    ``MAIL``, ``RCPT`` and ``DATA`` at once and gets the three replies in one segment. A
    message is counted only once its end marker arrived: a connection closed in the middle of
    one delivers nothing.
    """

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.closing = False
        # Inside a command line already longer than MAX_COMMAND_LINE (its bytes are dropped).
        self.discarding_line = False
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []
        # Bytes of the message dropped from the buffer so far (see _data).
        self.data_size = 0

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 localhost ESMTP bench sink\r\n")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        replies: list[bytes] = []
        progress = True
        while progress and not self.closing:
            progress = self._data(replies) if self.in_data else self._command(replies)
        if self.transport is not None:
            if replies:
                self.transport.write(b"".join(replies))
            if self.closing:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # A message whose end marker did not arrive is not counted.
        self.transport = None
        self.buffer.clear()
        self._reset()

    # Command mode

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpt_tos = []

    def _command(self, replies: list[bytes]) -> bool:
        """Handle the next complete command line; False when there is none yet."""
        buffer = self.buffer
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > MAX_COMMAND_LINE + 1:  # + 1: a CR may still be followed by its LF
                self.discarding_line = True
                buffer.clear()
            return False
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if line.endswith(b"\r"):  # CRLF, as RFC 5321 wants; a bare LF is tolerated too
            line = line[:-1]
        if self.discarding_line or len(line) > MAX_COMMAND_LINE:
            self.discarding_line = False
            replies.append(b"500 5.5.2 Line too long\r\n")
        else:
            replies.append(self._reply(line.decode("utf-8", "replace")))
        return True

    def _reply(self, line: str) -> bytes:
        """The reply to one command (switching to data mode after an accepted ``DATA``)."""
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            self._reset()
            return _EHLO_REPLY
        if verb == "HELO":
            self._reset()
            return b"250 localhost\r\n"
        if verb == "MAIL":
            if self.mail_from is not None:
                return b"503 5.5.1 Error: nested MAIL command\r\n"
            path = _path(argument, "FROM:")
            if path is None:
                return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
            address, parameters = path
            for parameter in parameters:
                keyword, _, value = parameter.partition("=")
                if keyword.upper() == "SIZE" and value.isdigit() and int(value) > SIZE_LIMIT:
                    return b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
            self.mail_from = address
            self.rcpt_tos = []
            return b"250 2.1.0 OK\r\n"
        if verb == "RCPT":
            if self.mail_from is None:
                return b"503 5.5.1 Error: need MAIL command\r\n"
            path = _path(argument, "TO:")
            if path is None or not path[0]:
                return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
            self.rcpt_tos.append(path[0])
            return b"250 2.1.5 OK\r\n"
        if verb == "DATA":
            if argument.strip():
                return b"501 5.5.4 Syntax: DATA\r\n"
            if not self.rcpt_tos:
                return b"503 5.5.1 Error: need RCPT command\r\n"
            self.in_data = True
            # The data is searched for CRLF "." CRLF; the CRLF that ended DATA counts as the
            # first CRLF, so an empty message (just "." CRLF) ends it too. It is put back in
            # front of the data and taken off the size.
            self.buffer[0:0] = b"\r\n"
            self.data_size = -2
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == "RSET":
            self._reset()
            return b"250 2.0.0 OK\r\n"
        if verb == "NOOP":
            return b"250 2.0.0 OK\r\n"
        if verb == "QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        if verb == "VRFY":
            return b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        if verb in _NOT_IMPLEMENTED:
            return b"502 5.5.1 Command not implemented\r\n"
        return b"500 5.5.2 Error: command not recognized\r\n"

    # Data mode

    def _data(self, replies: list[bytes]) -> bool:
        """Look for the end of the message; False when it has not arrived yet.

        The message itself is not kept (only counted), so what has been searched is dropped
        except its last 4 bytes, which may begin an end marker completed by the next read: each
        byte is searched about once, not once per read. Dot-stuffing is not undone (nothing
        reads the message), so the size checked against SIZE is that of the stuffed data.

        sydent's smtplib sends its message body with bare LF line endings, but smtplib always
        ends the data with CRLF "." CRLF, so looking for that marker alone suffices.
        """
        buffer = self.buffer
        end = buffer.find(END_OF_DATA)
        if end < 0:
            if len(buffer) > 4:
                self.data_size += len(buffer) - 4
                del buffer[:-4]
            return False
        size = self.data_size + end + 2  # the message ends with the marker's first CRLF
        del buffer[: end + len(END_OF_DATA)]
        self.in_data = False
        if size > SIZE_LIMIT:
            replies.append(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        else:
            self.counts.add(self.rcpt_tos)
            replies.append(b"250 2.0.0 Message accepted for delivery\r\n")
        self._reset()
        return True


# --------------------------------------------------------------------------------------------
# aiosmtpd
# --------------------------------------------------------------------------------------------


class CountingHandler:
    """aiosmtpd hooks that accept everything and count recipients by address."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts

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
        self.counts.add(envelope.rcpt_tos)
        return "250 2.0.0 Message accepted for delivery"


class LenientSMTP(SMTP):
    """aiosmtpd's SMTP server, tolerating long "lines".

    sydent hands smtplib a message with bare LF line endings (Jinja normalises its templates to
    LF, and smtplib does not fix the line endings of a ``bytes`` message), so to a strict server
    the whole body is one line over RFC 5321's 1,000 octets. Postfix and most MTAs accept such
    mail; so does this sink.
    """

    line_length_limit = 1 << 20


# --------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------


async def serve(impl: str = "lean") -> None:
    """Listen, announce the port, answer commands until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    counts = Counts()
    factory: Callable[[], asyncio.BaseProtocol]
    if impl == "lean":
        factory = functools.partial(LeanSMTP, counts)
    else:
        factory = functools.partial(
            LenientSMTP, CountingHandler(counts), hostname="localhost", timeout=60, loop=loop
        )
    server = await loop.create_server(factory, "127.0.0.1", 0)
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
                print(counts.count(argument), flush=True)
            elif command == "total":
                print(counts.messages, flush=True)
            elif command == "cpu":
                print(f"{time.process_time():.6f}", flush=True)
            else:
                print(f"error unknown command {command!r}", flush=True)
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    """Parse ``--impl`` and serve."""
    parser = argparse.ArgumentParser(
        prog="bench/smtp_sink.py", description="Loopback SMTP sink for bench/run.py"
    )
    parser.add_argument(
        "--impl",
        choices=("lean", "aiosmtpd"),
        default="lean",
        help="SMTP server: lean (asyncio.Protocol, the default) or aiosmtpd (DATA line by line "
        "in Python, ~0.8 ms CPU per 5 KB mail)",
    )
    asyncio.run(serve(parser.parse_args(argv).impl))


if __name__ == "__main__":
    main()
