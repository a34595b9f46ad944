"""``bench/smtp_sink.py``: both implementations really speak SMTP and count what they accept."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import select
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]


def _load_sink_module() -> ModuleType:
    """``bench/smtp_sink.py`` by path: ``bench`` is this test package's name on sys.path."""
    spec = importlib.util.spec_from_file_location("bench_smtp_sink", REPO / "bench/smtp_sink.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smtp_sink = _load_sink_module()
SIZE_LIMIT: int = smtp_sink.SIZE_LIMIT
TIMEOUT = 10.0

# sydent's kind of message: bytes with bare LF line endings, one "line" to a strict server.
BARE_LF_MAIL = (
    b"From: Sydent <noreply@localhost>\nTo: someone@bench.example\nSubject: invite\n\n"
    + b"A line of the invitation, quoted-printable or not, long enough to add up.\n" * 80
)


class Sink:
    """The sink as a subprocess, asked over its stdin/stdout."""

    def __init__(self, impl: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "smtp_sink.py"), "--impl", impl],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        word, _, port = self._read_line().partition(" ")
        assert word == "port", word
        self.port = int(port)

    def _read_line(self) -> str:
        """One line of stdout, byte by byte (nothing past it is consumed), within TIMEOUT."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError(f"no answer from the sink; read so far {data!r}")
            chunk = os.read(self.process.stdout.fileno(), 1)
            if not chunk:
                raise EOFError(f"the sink closed its stdout; read so far {data!r}")
            data += chunk
        return data.decode().strip()

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        return self._read_line()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask("quit")
                self.process.wait(timeout=TIMEOUT)
            except (OSError, TimeoutError, EOFError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture(params=["lean", "aiosmtpd"])
def sink(request: pytest.FixtureRequest) -> Iterator[Sink]:
    started = Sink(request.param)
    try:
        yield started
    finally:
        started.close()


def _replies(conn: socket.socket, pending: bytearray, count: int) -> list[str]:
    """The next ``count`` complete replies (multi-line ones joined), within TIMEOUT."""
    replies: list[str] = []
    current: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while len(replies) < count:
        end = pending.find(b"\r\n")
        if end < 0:
            assert time.monotonic() < deadline, f"replies so far: {replies}"
            chunk = conn.recv(65536)
            assert chunk, f"connection closed; replies so far: {replies}"
            pending += chunk
            continue
        line = pending[:end].decode()
        del pending[: end + 2]
        current.append(line)
        if line[3:4] != "-":
            replies.append("\n".join(current))
            current = []
    return replies


def _codes(replies: list[str]) -> list[str]:
    return [reply[:3] for reply in replies]


def test_smtplib_mail_to_two_recipients_and_a_bare_lf_mail(sink: Sink) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=TIMEOUT) as smtp:
        refused = smtp.sendmail(
            "sender@localhost",
            ["Two1A@Bench.Example", "two1b@bench.example"],
            b"Subject: hello\r\n\r\nHello.\r\n",
        )
        assert refused == {}
        assert smtp.sendmail("sender@localhost", ["lf1@bench.example"], BARE_LF_MAIL) == {}
    assert sink.ask("count two1") == "2"
    assert sink.ask("count TWO1A") == "1"
    assert sink.ask("count lf1") == "1"
    assert sink.ask("count nobody") == "0"
    assert sink.ask("total") == "2"


def test_pipelined_commands_are_answered_in_order(sink: Sink) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=TIMEOUT) as conn:
        pending = bytearray()
        assert _codes(_replies(conn, pending, 1)) == ["220"]
        conn.sendall(b"EHLO client.test\r\n")
        (ehlo,) = _replies(conn, pending, 1)
        assert ehlo.startswith("250") and "PIPELINING" in ehlo.upper()

        conn.sendall(
            b"MAIL FROM:<sender@localhost>\r\n"
            b"RCPT TO:<pipe1a@bench.example>\r\n"
            b"RCPT TO:<pipe1b@bench.example>\r\n"
            b"DATA\r\n"
        )
        assert _codes(_replies(conn, pending, 4)) == ["250", "250", "250", "354"]
        # The body has a dot-stuffed line; the next envelope follows the end marker at once.
        conn.sendall(
            b"Subject: one\r\n\r\nfirst line\r\n..a line starting with a dot\r\nlast\r\n.\r\n"
            b"MAIL FROM:<sender@localhost>\r\n"
            b"RCPT TO:<pipe2@bench.example>\r\n"
            b"DATA\r\n"
        )
        assert _codes(_replies(conn, pending, 4)) == ["250", "250", "250", "354"]
        # The second message's end marker split across two writes, then NOOP and QUIT with it.
        conn.sendall(b"Subject: two\r\n\r\nsecond\r\n")
        time.sleep(0.05)
        conn.sendall(b".\r\nNOOP\r\nQUIT\r\n")
        assert _codes(_replies(conn, pending, 3)) == ["250", "250", "221"]
    assert sink.ask("count pipe1") == "2"
    assert sink.ask("count pipe2") == "1"
    assert sink.ask("total") == "2"


def test_data_without_recipient_is_refused(sink: Sink) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.test")
        assert smtp.docmd("DATA")[0] == 503
        assert smtp.mail("sender@localhost")[0] == 250
        assert smtp.docmd("DATA")[0] == 503
        assert smtp.rset()[0] == 250
    assert sink.ask("total") == "0"


def test_connection_closed_mid_message_delivers_nothing(sink: Sink) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=TIMEOUT) as conn:
        pending = bytearray()
        _replies(conn, pending, 1)
        conn.sendall(b"HELO client.test\r\n")
        conn.sendall(b"MAIL FROM:<sender@localhost>\r\n")
        conn.sendall(b"RCPT TO:<cut1@bench.example>\r\n")
        conn.sendall(b"DATA\r\n")
        assert _codes(_replies(conn, pending, 4)) == ["250", "250", "250", "354"]
        conn.sendall(b"Subject: cut\r\n\r\nhalf a message\r\n")
    # The cut message is never counted; a whole one on a new connection still is.
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=TIMEOUT) as smtp:
        smtp.sendmail("sender@localhost", ["after1@bench.example"], b"Subject: x\r\n\r\nx\r\n")
    assert sink.ask("count cut1") == "0"
    assert sink.ask("total") == "1"


def test_stdin_commands(sink: Sink) -> None:
    first = float(sink.ask("cpu"))
    assert first > 0
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=TIMEOUT) as smtp:
        for i in range(5):
            smtp.sendmail(
                "sender@localhost", [f"cmd1x{i}@bench.example"], b"Subject: x\r\n\r\nx\r\n"
            )
    assert sink.ask("count cmd1x") == "5"
    assert sink.ask("count cmd1x3") == "1"
    assert sink.ask("count cmd1x3@bench.example") == "1"
    assert sink.ask("count cmd1") == "5"
    assert sink.ask("count cmd2") == "0"
    assert sink.ask("total") == "5"
    assert float(sink.ask("cpu")) >= first
    assert sink.ask("nonsense").startswith("error")
    assert sink.ask("quit") == "bye"
    assert sink.process.wait(timeout=TIMEOUT) == 0


# --------------------------------------------------------------------------------------------
# The lean server in process, on a fake transport: one write per read, split markers, limits
# --------------------------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True


def _connected() -> tuple[Any, FakeTransport, Any]:
    """A lean protocol on a fake transport, its greeting taken, and its counts."""
    counts = smtp_sink.Counts()
    protocol = smtp_sink.LeanSMTP(counts)
    transport = FakeTransport()
    protocol.connection_made(transport)
    assert transport.writes == [b"220 localhost ESMTP bench sink\r\n"]
    transport.writes.clear()
    return protocol, transport, counts


def _lines(write: bytes) -> list[bytes]:
    return [line[:3] for line in write.split(b"\r\n") if line]


ENVELOPE = b"MAIL FROM:<s@localhost>\r\nRCPT TO:<Lean1@bench.example>\r\nDATA\r\n"


def test_lean_answers_every_command_of_a_read_in_one_write() -> None:
    protocol, transport, counts = _connected()
    protocol.data_received(b"EHLO x\r\n" + ENVELOPE)
    assert len(transport.writes) == 1
    assert _lines(transport.writes[0]) == [b"250"] * 5 + [b"250", b"250", b"354"]
    protocol.data_received(b"body\r\n.\r\n" + ENVELOPE + b".\r\nQUIT\r\n")
    # The second message is empty: "." right after the 354.
    assert len(transport.writes) == 2
    assert _lines(transport.writes[1]) == [b"250", b"250", b"250", b"354", b"250", b"221"]
    assert transport.closed
    assert counts.messages == 2 and counts.count("lean1@") == 2


def test_lean_finds_the_end_marker_fed_byte_by_byte() -> None:
    protocol, transport, counts = _connected()
    protocol.data_received(ENVELOPE)
    stream = b"line one\r\n..dotted\r\nbare LF\nlines\n\r\n.\r\nNOOP\r\n"
    for byte in stream:
        protocol.data_received(bytes([byte]))
    assert _lines(b"".join(transport.writes)) == [b"250", b"250", b"354", b"250", b"250"]
    assert counts.messages == 1
    # A lone "." line inside the data but not after a CRLF does not end it.
    protocol.data_received(ENVELOPE + b"a\n.\nb\r\n")
    assert counts.messages == 1
    protocol.data_received(b".\r\n")
    assert counts.messages == 2


def test_lean_limits_and_unknown_commands() -> None:
    protocol, transport, counts = _connected()
    protocol.data_received(b"X" * 5000)
    protocol.data_received(b"Y" * 5000 + b"\r\nNOOP\r\n")
    protocol.data_received(b"vrfy someone\r\nEXPN list\r\nFOO\r\nRCPT TO:<a@b>\r\nnoop\r\n")
    assert _lines(b"".join(transport.writes)) == [
        b"500",
        b"250",
        b"252",
        b"502",
        b"500",
        b"503",
        b"250",
    ]
    transport.writes.clear()
    protocol.data_received(ENVELOPE)
    chunk = b"x" * 65535 + b"\n"
    for _ in range(SIZE_LIMIT // len(chunk) + 2):
        protocol.data_received(chunk)
    assert len(protocol.buffer) <= len(chunk)  # the data is not kept
    protocol.data_received(b"\r\n.\r\nRSET\r\n")
    assert _lines(b"".join(transport.writes)) == [b"250", b"250", b"354", b"552", b"250"]
    assert counts.messages == 0


def test_lean_connection_lost_mid_message() -> None:
    protocol, transport, counts = _connected()
    protocol.data_received(ENVELOPE + b"Subject: x\r\n\r\nbody\r\n")
    protocol.connection_lost(None)
    assert _lines(b"".join(transport.writes)) == [b"250", b"250", b"354"]
    assert counts.messages == 0 and counts.count("") == 0
