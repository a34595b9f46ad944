"""The message generator: built-in templates, operator overrides, escaping, strictness."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from appservice.config import ConfigError
from appservice.notifications import EmailMessage, MessageGenerator, NotificationError
from appservice.notifications.generator import BUILTIN_TEMPLATES_DIR

BASE = "https://id.example.org"


def make_generator(templates_dir: Path | None = None) -> MessageGenerator:
    return MessageGenerator(
        str(templates_dir) if templates_dir is not None else None,
        brand="Example Identity",
        server_name="id.example.org",
        public_base_url=BASE + "/",
    )


def invite(generator: MessageGenerator, **fields: str) -> EmailMessage:
    values = {
        "sender": "",
        "sender_display_name": "",
        "room_id": "",
        "room_name": "",
        "room_alias": "",
        "room_avatar_url": "",
        "room_type": "",
        "token": "invitetoken",
        "join_url": "",
    }
    values.update(fields)
    return generator.invite_email("carol@example.com", **values)


def test_validation_email_links_to_submit_token_with_encoded_query() -> None:
    msg = make_generator().validation_email(
        "alice@example.com", "tok&en=1", "sid 1", "s3cret/+", next_link_present=False
    )
    assert msg.to == "alice@example.com"
    assert msg.subject == "Verify your email address for Example Identity"
    link = next(line for line in msg.text.splitlines() if line.startswith(BASE))
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == (
        BASE + "/_matrix/identity/v2/validate/email/submitToken"
    )
    assert parse_qs(parts.query) == {
        "sid": ["sid 1"],
        "client_secret": ["s3cret/+"],
        "token": ["tok&en=1"],
    }
    assert "Your verification code is: tok&en=1" in msg.text
    assert "return to your Matrix client" in msg.text
    # In HTML the link is an attribute, escaped once.
    assert f'href="{link.replace("&", "&amp;")}"' in msg.html
    assert "tok&amp;en=1" in msg.html
    assert '<html lang="en"' in msg.html


def test_validation_email_mentions_the_next_link() -> None:
    msg = make_generator().validation_email("a@example.com", "t", "s", "c", next_link_present=True)
    assert "taken back to where you started" in msg.text
    assert "taken back to where you started" in msg.html


def test_validation_sms_is_short_with_brand_and_code() -> None:
    sms = make_generator().validation_sms("447700900123", "123456")
    assert sms.to == "447700900123"
    assert sms.text == "Example Identity: your verification code is 123456"


def test_unbind_email_names_address_and_matrix_id() -> None:
    msg = make_generator().unbind_email("bob@example.com", "@bob:example.org")
    assert "unlinked" in msg.subject
    for body in (msg.text, msg.html):
        assert "bob@example.com" in body
        assert "@bob:example.org" in body


def test_invite_email_escapes_room_name_in_html_only() -> None:
    msg = invite(
        make_generator(),
        sender="@mallory:example.org",
        sender_display_name="Mallory <b>",
        room_name="<script>alert(1)</script>",
        join_url="https://app.example.org/#/room/!r?email=carol%40example.com&token=t",
    )
    assert "<script>" not in msg.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in msg.html
    assert "Mallory &lt;b&gt;" in msg.html
    assert 'href="https://app.example.org/#/room/!r?email=carol%40example.com&amp;token=t"' in (
        msg.html
    )
    # Plain text and the subject are not HTML: no entities there.
    assert msg.subject == "Mallory <b> invited you to <script>alert(1)</script>"
    assert "<script>alert(1)</script>" in msg.text
    assert "Mallory <b> (@mallory:example.org)" in msg.text


def test_invite_email_reads_well_with_every_field_empty() -> None:
    msg = invite(make_generator())
    assert msg.subject == "Someone invited you to a room"
    assert "Someone invited carol@example.com to join a room on Matrix" in msg.text
    assert "sign in to a Matrix client" in msg.text
    assert "None" not in msg.text and "None" not in msg.html
    assert "<img" not in msg.html


def test_invite_email_falls_back_to_alias_then_space() -> None:
    generator = make_generator()
    by_alias = invite(generator, room_alias="#general:example.org", sender="@dan:example.org")
    assert by_alias.subject == "@dan:example.org invited you to #general:example.org"
    space = invite(generator, room_type="m.space")
    assert space.subject == "Someone invited you to a space"
    assert "to join a space on Matrix" in space.text
    named_space = invite(
        generator,
        room_type="m.space",
        room_name="Team",
        join_url="https://app.example.org/join",
        room_avatar_url="https://media.example.org/avatar.png",
    )
    assert "Join the space" in named_space.html
    assert '<img src="https://media.example.org/avatar.png" alt=""' in named_space.html


def test_invite_email_does_not_embed_mxc_avatars() -> None:
    msg = invite(make_generator(), room_avatar_url="mxc://example.org/abc")
    assert "mxc://" not in msg.html


def test_subject_is_one_line_even_with_newlines_in_a_room_name() -> None:
    msg = invite(make_generator(), room_name="Evil\r\nBcc: everyone@example.com")
    assert "\n" not in msg.subject and "\r" not in msg.subject


def test_pages_render_with_reason_escaped() -> None:
    generator = make_generator()
    failure = generator.page("validation_failure.html", reason="Link expired <now>")
    assert "Link expired &lt;now&gt;" in failure
    assert "<title>Verification failed · Example Identity</title>" in failure
    success = generator.page("validation_success")
    assert "verified" in success
    assert '<html lang="en"' in success


def test_operator_override_replaces_one_template_and_keeps_the_others(tmp_path: Path) -> None:
    (tmp_path / "validation.sms.txt").write_text("{{ token }} is your {{ server_name }} code")
    generator = make_generator(tmp_path)
    assert generator.validation_sms("15005550006", "654321").text == (
        "654321 is your id.example.org code"
    )
    builtin = make_generator().validation_email("a@example.com", "t", "s", "c", False)
    assert generator.validation_email("a@example.com", "t", "s", "c", False) == builtin


def test_operator_template_can_extend_the_builtin_layout(tmp_path: Path) -> None:
    (tmp_path / "unbind_email.html").write_text(
        '{% extends "_email_layout.html" %}{% block content %}<p>Gone: {{ mxid }}</p>{% endblock %}'
    )
    msg = make_generator(tmp_path).unbind_email("a@example.com", "@a:example.org")
    assert "<p>Gone: @a:example.org</p>" in msg.html
    assert "Example Identity" in msg.html


def test_template_typo_stops_start_up_naming_the_template(tmp_path: Path) -> None:
    (tmp_path / "invite_email.txt").write_text("{{ room_nmae }} awaits")
    with pytest.raises(ConfigError) as raised:
        make_generator(tmp_path)
    message = str(raised.value)
    assert message.startswith("notifications.templates_dir:")
    assert "invite_email.txt" in message and "room_nmae" in message


def test_template_syntax_error_stops_start_up_with_line(tmp_path: Path) -> None:
    (tmp_path / "validation_failure.html").write_text("<p>\n{% if reason %}</p>")
    with pytest.raises(ConfigError, match=r"validation_failure.html, line \d"):
        make_generator(tmp_path)


def test_missing_templates_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"notifications\.templates_dir"):
        make_generator(tmp_path / "nope")


def test_undefined_variable_at_render_time_is_a_notification_error() -> None:
    generator = make_generator()
    with pytest.raises(NotificationError, match="'reason' is undefined"):
        generator.page("validation_failure")


def test_builtin_templates_are_all_documented() -> None:
    from appservice.notifications import generator

    doc = generator.__doc__ or ""
    for path in BUILTIN_TEMPLATES_DIR.iterdir():
        assert f"``{path.name}``" in doc, path.name


def test_rendered_messages_are_saved_for_review(artifacts_dir: Path) -> None:
    generator = make_generator()
    out = artifacts_dir / "notifications"
    out.mkdir(exist_ok=True)
    emails = {
        "validation_email": generator.validation_email(
            "alice@example.com", "Yx3kQ9", "sid", "secret", next_link_present=False
        ),
        "unbind_email": generator.unbind_email("alice@example.com", "@alice:example.org"),
        "invite_email": invite(
            generator,
            sender="@bob:example.org",
            sender_display_name="Bob",
            room_name="Project Falcon",
            room_alias="#falcon:example.org",
            join_url="https://app.example.org/#/room/#falcon:example.org",
        ),
        "invite_email_empty": invite(generator),
    }
    for name, msg in emails.items():
        (out / f"{name}.html").write_text(msg.html)
        (out / f"{name}.txt").write_text(f"Subject: {msg.subject}\n\n{msg.text}")
    (out / "validation_success.html").write_text(generator.page("validation_success"))
    (out / "validation_failure.html").write_text(
        generator.page("validation_failure", reason="This link has expired.")
    )
    assert len(list(out.iterdir())) >= 10


INVITE_FIELDS = (
    "sender",
    "sender_display_name",
    "sender_avatar_url",
    "room_id",
    "room_name",
    "room_alias",
    "room_avatar_url",
    "room_type",
    "room_join_rules",
    "token",
    "join_url",
    "ephemeral_private_key",
    "sign_url",
)


def test_an_invite_template_gets_every_store_invite_field(tmp_path: Path) -> None:
    """Each detail store-invite keeps (sender_avatar_url and room_join_rules too), the invite's
    ephemeral private key and its sign URL reach an operator's template."""
    # A template naming every variable (StrictUndefined: a missing one is an error).
    (tmp_path / "invite_email.txt").write_text(
        "".join(f"{name}=[{{{{ {name} }}}}]\n" for name in ("to", *INVITE_FIELDS))
    )
    generator = make_generator(tmp_path)
    values = {name: f"value-of-{name}" for name in INVITE_FIELDS}
    msg = generator.invite_email("carol@example.com", **values)
    lines = dict(line.split("=", 1) for line in msg.text.splitlines())
    assert lines.pop("to") == "[carol@example.com]"
    assert lines == {name: f"[value-of-{name}]" for name in INVITE_FIELDS}


def test_withdrawn_invite_reason_names_who_withdrew_it(tmp_path: Path) -> None:
    reason = make_generator().withdrawn_invite_reason(
        invitee="d…@e…",
        sender="@carol:example.org",
        invited_on="2026-11-02",
        withdrawn_by="@alice:example.org",
        room_id="!room:example.org",
    )
    assert reason == (
        "The invitation sent to d…@e… by @carol:example.org on 2026-11-02"
        " was withdrawn by @alice:example.org."
    )
    (tmp_path / "invite_withdrawn_reason.txt").write_text("Gone ({{ withdrawn_by }})\n")
    assert (
        make_generator(tmp_path).withdrawn_invite_reason(
            invitee="", sender="", invited_on="", withdrawn_by="@a:b", room_id=""
        )
        == "Gone (@a:b)"
    )
