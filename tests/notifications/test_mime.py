"""The hand-built MIME messages parse back to exactly what went in."""

from __future__ import annotations

import datetime
import email
import email.policy

import pytest

from appservice.notifications.mime import build_message, encode_address_header

TEXT = "Héllo — a line that is long enough to need a soft break " * 4 + "\n.dot\nend  \n"
HTML = '<p lang="fr">Vérifiez <a href="https://x.example/?a=1&amp;b=2">ici</a></p>\n'


@pytest.mark.parametrize("utf8", [False, True])
def test_message_round_trips_through_a_mime_parser(utf8: bool) -> None:
    data = build_message(
        from_header=encode_address_header("Identité, Service", "id@example.org", utf8),
        to_header="alice@example.org",
        subject="Vérifiez votre adresse — Matrix",
        text=TEXT,
        html=HTML,
        msgid_domain="example.org",
        utf8=utf8,
        now=datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC),
    )
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 78 for line in data.split(b"\r\n")[10:])
    if not utf8:
        assert data.isascii()
    # SMTPUTF8 messages carry raw UTF-8 headers, which a string parser reads as such.
    message = (
        email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
        if utf8
        else email.message_from_bytes(data, policy=email.policy.default)
    )
    assert message["Subject"] == "Vérifiez votre adresse — Matrix"
    assert message["From"].addresses[0].display_name == "Identité, Service"
    assert message["From"].addresses[0].addr_spec == "id@example.org"
    assert message["To"] == "alice@example.org"
    assert message["Message-ID"].endswith("@example.org>")
    assert message["Date"] == "Mon, 23 Nov 2026 12:00:00 +0000"
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().replace("\r\n", "\n") == TEXT
    assert html.get_content().replace("\r\n", "\n") == HTML


def test_header_values_cannot_break_out_of_their_line() -> None:
    data = build_message(
        from_header="id@example.org",
        to_header="alice@example.org",
        subject="Hello\r\nBcc: victim@example.org",
        text="x",
        html="x",
        msgid_domain="example.org",
        utf8=False,
    )
    headers = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert not any(line.startswith(b"Bcc:") for line in headers)
