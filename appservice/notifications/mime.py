"""Email messages as bytes for SMTP DATA: ``multipart/alternative`` with a plain-text and an HTML
part, UTF-8, quoted-printable.

Built directly rather than through the ``email`` package's object model, which spent about half
of the server's CPU per mail under load (header registry, policies, generator). The output is
plain RFC 5322/2045/2047: line endings CRLF, body lines at most 76 characters, headers encoded
with RFC 2047 when they are not ASCII (unless the message goes out with SMTPUTF8).
"""

from __future__ import annotations

import binascii
import datetime
import email.header
import email.utils
import secrets

_PART_HEADERS = {
    subtype: (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode()
    for subtype in ("plain", "html")
}


def encode_header_value(value: str, utf8: bool) -> str:
    """A header value on one logical line: as is when ASCII (or SMTPUTF8), else RFC 2047."""
    value = " ".join(value.split())  # no CR/LF can reach the header block
    if value.isascii() or utf8:
        return value
    return email.header.Header(value, "utf-8", maxlinelen=76).encode(linesep="\r\n")


def encode_address_header(name: str, address: str, utf8: bool) -> str:
    """``Name <address>``, the name quoted as needed and RFC 2047-encoded unless SMTPUTF8."""
    if not name:
        return address
    if name.isascii() or not utf8:
        return email.utils.formataddr((name, address), charset="utf-8")
    return f'"{email.utils.quote(name)}" <{address}>'


def _quoted_printable(text: str) -> bytes:
    """UTF-8 quoted-printable body with CRLF line endings and lines of at most 76 characters."""
    lf_only = text.replace("\r\n", "\n").replace("\r", "\n")
    return binascii.b2a_qp(lf_only.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")


def build_message(
    *,
    from_header: str,
    to_header: str,
    subject: str,
    text: str,
    html: str,
    msgid_domain: str,
    utf8: bool,
    now: datetime.datetime | None = None,
) -> bytes:
    """The whole message, every line ended by CRLF (the last one too), not yet dot-stuffed.
    ``from_header``/``to_header`` are ready-made header values."""
    boundary = "=_alt_" + secrets.token_hex(12)
    when = now or datetime.datetime.now(datetime.UTC)
    headers = (
        f"From: {from_header}\r\n"
        f"To: {to_header}\r\n"
        f"Subject: {encode_header_value(subject, utf8)}\r\n"
        f"Date: {email.utils.format_datetime(when)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain=msgid_domain)}\r\n"
        # RFC 3834: no out-of-office replies to a robot.
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
    )
    delimiter = f"--{boundary}\r\n".encode()
    return b"".join(
        (
            headers.encode("utf-8"),
            delimiter,
            _PART_HEADERS["plain"],
            _quoted_printable(text),
            b"\r\n",
            delimiter,
            _PART_HEADERS["html"],
            _quoted_printable(html),
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
