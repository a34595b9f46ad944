"""Messages and pages rendered from Jinja2 templates, which operators can override.

Templates are looked up in ``notifications.templates_dir`` first, then in the built-in
``appservice/templates/`` directory, so an operator copies and edits only the files they want to
change. Templates whose name ends in ``.html`` are autoescaped; ``.txt`` templates are not. An
undefined variable is an error (``StrictUndefined``), and every template is rendered once with
sample values when the generator is built, so a typo stops start-up with the template's name
instead of failing the first real message.

Templates
=========

Emails (each is three files: subject line, plain-text body, HTML body):

``validation_email.subject.txt``, ``validation_email.txt``, ``validation_email.html``
    Sent by ``requestToken`` to verify an email address.
    ``to``, ``token``, ``sid``, ``client_secret``, ``link`` (the full submitToken URL, with the
    query already URL-encoded), ``next_link_present`` (true when the client gave a
    ``next_link``: the user is taken back to it after clicking).
``unbind_email.subject.txt``, ``unbind_email.txt``, ``unbind_email.html``
    Tells the owner of an address that it was unbound from a Matrix ID.
    ``to``, ``mxid``.
``invite_email.subject.txt``, ``invite_email.txt``, ``invite_email.html``
    A third-party invite to someone known only by their email address. The raw values, any of
    which may be an empty string: ``to``, ``sender``, ``sender_display_name``,
    ``sender_avatar_url``, ``room_id``, ``room_name``, ``room_alias``, ``room_avatar_url``,
    ``room_type``, ``room_join_rules`` (each as store-invite received it), ``token``,
    ``join_url`` (``invites.join_url`` with each ``{name}`` of these raw values, of ``email``,
    ``private_key`` and ``sign_url`` replaced by the value, URL-encoded; for Element:
    ``https://app.element.io/#/room/{room_id}?email={email}&signurl={sign_url}&room_name=
    {room_name}&room_avatar_url={room_avatar_url}&inviter_name={sender_display_name}``),
    ``ephemeral_private_key`` (the invite's ephemeral ed25519 seed, unpadded base64: a secret
    for the invitee only) and ``sign_url`` (the sign-ed25519 URL with the token and that key in
    its query, which a client POSTs ``{"mxid": ...}`` to, as Element's ``signurl``). Derived
    values that always read well: ``sender_label`` (the display name,
    else the sender's Matrix ID, else "Someone"), ``room_label`` (the room name, else its
    alias, else "a room" or "a space"), ``is_space`` (``room_type == "m.space"``),
    ``room_avatar_http_url`` (``room_avatar_url`` when it is an ``https://`` URL, else empty:
    mail clients cannot show ``mxc://`` URLs).

SMS:

``validation.sms.txt``
    Sent by ``requestToken`` to verify a phone number. ``to`` (E.164 digits without ``+``),
    ``token``.

Application service:

``invite_expired_reason.txt``
    The reason shown when the inviteExpired user withdraws an expired invite (one line).
    ``invitee`` (the redacted address), ``sender``, ``invited_on`` (date, UTC),
    ``expired_after`` (e.g. "7 days"), ``room_id``; each may be empty for an invite that is
    not one of ours.
``invite_withdrawn_reason.txt``
    The reason shown when a room member withdrew an invite through the bot (``!3pid
    withdraw``; one line). ``invitee``, ``sender``, ``invited_on``, ``room_id`` as above and
    ``withdrawn_by`` (the Matrix ID of who withdrew it).

Web pages (rendered by ``GET .../validate/email/submitToken``):

``validation_success.html``
    The address is verified. No extra variables.
``validation_failure.html``
    It is not. ``reason`` (a sentence saying why, e.g. the link expired).

Layouts, which the built-in templates extend (override them to restyle everything at once):
``_email_layout.html`` (blocks ``title``, ``content``, ``footer``), ``_email_footer.txt``
(included at the end of each plain-text email), ``_page_layout.html`` (blocks ``title``,
``content``).

Every template also gets ``brand`` (``notifications.brand``), ``server_name`` (``server.name``)
and ``public_base_url`` (``server.public_base_url``, without a trailing slash).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2

from appservice.config import ConfigError
from appservice.notifications.message import EmailMessage, NotificationError, SmsMessage

BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"

# Long room names and display names are cut so that subjects and headings stay readable.
_LABEL_MAX = 80
_SUBJECT_MAX = 200
_DERIVED = ("is_space", "room_label", "sender_label", "room_avatar_http_url")


def _shorten(value: str, limit: int) -> str:
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1].rstrip() + "…"


class MessageGenerator:
    """Renders the emails, SMS and web pages the identity server sends or serves."""

    def __init__(
        self,
        templates_dir: str | None,
        brand: str,
        server_name: str,
        public_base_url: str,
    ) -> None:
        """Load the templates and check that each one renders.

        Raises ``ConfigError`` naming the template when an operator template (or the
        directory) is broken.
        """
        loaders: list[jinja2.BaseLoader] = []
        if templates_dir is not None:
            if not Path(templates_dir).is_dir():
                raise ConfigError(
                    f'notifications.templates_dir: "{templates_dir}" is not a directory'
                )
            loaders.append(jinja2.FileSystemLoader(templates_dir))
        loaders.append(jinja2.FileSystemLoader(str(BUILTIN_TEMPLATES_DIR)))
        self._env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html",),
                disabled_extensions=("txt",),
                default_for_string=False,
                default=False,
            ),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            # Templates are read once; an edit takes effect at the next start.
            auto_reload=False,
        )
        self._globals: dict[str, Any] = {
            "brand": brand,
            "server_name": server_name,
            "public_base_url": public_base_url.rstrip("/"),
        }
        self._check()

    # Messages

    def validation_email(
        self,
        to: str,
        token: str,
        sid: str,
        client_secret: str,
        next_link_present: bool,
    ) -> EmailMessage:
        """The email that verifies an address: a link to submitToken and the token itself."""
        query = urlencode({"sid": sid, "client_secret": client_secret, "token": token})
        base = self._globals["public_base_url"]
        link = f"{base}/_matrix/identity/v2/validate/email/submitToken?{query}"
        return self._email(
            "validation_email",
            to=to,
            token=token,
            sid=sid,
            client_secret=client_secret,
            link=link,
            next_link_present=next_link_present,
        )

    def validation_sms(self, to: str, token: str) -> SmsMessage:
        """The SMS that verifies a phone number (``to`` in E.164 digits without ``+``)."""
        text = self._render("validation.sms.txt", {"to": to, "token": token}).strip()
        return SmsMessage(to=to, text=text, template="validation_sms")

    def unbind_email(self, to: str, mxid: str) -> EmailMessage:
        """The notice that ``to`` is no longer bound to ``mxid``."""
        return self._email("unbind_email", to=to, mxid=mxid)

    def invite_email(
        self,
        to: str,
        *,
        sender: str,
        sender_display_name: str,
        room_id: str,
        room_name: str,
        room_alias: str,
        room_avatar_url: str,
        room_type: str,
        token: str,
        join_url: str,
        sender_avatar_url: str = "",
        room_join_rules: str = "",
        ephemeral_private_key: str = "",
        sign_url: str = "",
    ) -> EmailMessage:
        """A third-party invite; any room or sender field may be empty."""
        variables = self._invite_variables(
            {
                "to": to,
                "sender": sender,
                "sender_display_name": sender_display_name,
                "sender_avatar_url": sender_avatar_url,
                "room_id": room_id,
                "room_name": room_name,
                "room_alias": room_alias,
                "room_avatar_url": room_avatar_url,
                "room_type": room_type,
                "room_join_rules": room_join_rules,
                "token": token,
                "join_url": join_url,
                "ephemeral_private_key": ephemeral_private_key,
                "sign_url": sign_url,
            }
        )
        return self._email("invite_email", **variables)

    def expired_invite_reason(
        self, *, invitee: str, sender: str, invited_on: str, expired_after: str, room_id: str
    ) -> str:
        """The reason given when an expired invite is withdrawn (one line; any value may be
        empty when the invite is not one of ours)."""
        text = self._render(
            "invite_expired_reason.txt",
            {
                "invitee": invitee,
                "sender": sender,
                "invited_on": invited_on,
                "expired_after": expired_after,
                "room_id": room_id,
            },
        )
        return " ".join(text.split())

    def withdrawn_invite_reason(
        self, *, invitee: str, sender: str, invited_on: str, withdrawn_by: str, room_id: str
    ) -> str:
        """The reason given when a room member withdrew an invite (one line), from
        ``invite_withdrawn_reason.txt``."""
        text = self._render(
            "invite_withdrawn_reason.txt",
            {
                "invitee": invitee,
                "sender": sender,
                "invited_on": invited_on,
                "withdrawn_by": withdrawn_by,
                "room_id": room_id,
            },
        )
        return " ".join(text.split())

    def page(self, name: str, **variables: Any) -> str:
        """A web page, e.g. ``page("validation_failure", reason="...")``.

        ``name`` may be given with or without its ``.html`` suffix.
        """
        if not name.endswith(".html"):
            name += ".html"
        return self._render(name, variables)

    # Internals

    @staticmethod
    def _invite_variables(given: dict[str, str]) -> dict[str, Any]:
        is_space = given["room_type"] == "m.space"
        room_label = (
            given["room_name"] or given["room_alias"] or ("a space" if is_space else "a room")
        )
        sender_label = given["sender_display_name"] or given["sender"] or "Someone"
        avatar = given["room_avatar_url"]
        return {
            **given,
            "is_space": is_space,
            "room_label": _shorten(room_label, _LABEL_MAX),
            "sender_label": _shorten(sender_label, _LABEL_MAX),
            "room_avatar_http_url": avatar if avatar.startswith("https://") else "",
        }

    def _email(self, name: str, **variables: Any) -> EmailMessage:
        subject = self._render(f"{name}.subject.txt", variables)
        return EmailMessage(
            to=variables["to"],
            # A subject is one line, whatever the template or a room name contains.
            subject=_shorten(subject, _SUBJECT_MAX),
            text=self._render(f"{name}.txt", variables),
            html=self._render(f"{name}.html", variables),
            template=name,
        )

    def _render(self, name: str, variables: dict[str, Any]) -> str:
        try:
            template = self._env.get_template(name)
            return template.render({**variables, **self._globals})
        except jinja2.TemplateSyntaxError as e:
            where = f"{e.name or name}, line {e.lineno}"
            raise NotificationError(f"template {where}: {e.message}") from e
        except jinja2.TemplateError as e:
            # Jinja's messages name the missing template or variable, not the values.
            raise NotificationError(f"template {name}: {e.message}") from e
        except Exception as e:
            # A filter or operator misused in a template; the message could quote a value.
            raise NotificationError(f"template {name}: {type(e).__name__}") from e

    def _check(self) -> None:
        """Render every template with sample values (both full and empty invite fields)."""
        full_invite = self._invite_variables(
            {
                "to": "alice@example.org",
                "sender": "@bob:example.org",
                "sender_display_name": "Bob",
                "sender_avatar_url": "mxc://example.org/bob",
                "room_id": "!room:example.org",
                "room_name": "Example room",
                "room_alias": "#example:example.org",
                "room_avatar_url": "https://example.org/avatar.png",
                "room_type": "m.space",
                "room_join_rules": "invite",
                "token": "sampletoken",
                "join_url": "https://example.org/join",
                "ephemeral_private_key": "c2FtcGxla2V5",
                "sign_url": "https://example.org/_matrix/identity/v2/sign-ed25519?token=t",
            }
        )
        empty_invite = self._invite_variables(
            {key: "" for key in full_invite if key not in _DERIVED} | {"to": "alice@example.org"}
        )
        validation = {
            "to": "alice@example.org",
            "token": "sampletoken",
            "sid": "samplesid",
            "client_secret": "samplesecret",
            "link": "https://example.org/submitToken",
        }
        samples: list[tuple[str, dict[str, Any]]] = [
            ("validation_email", {**validation, "next_link_present": True}),
            ("validation_email", {**validation, "next_link_present": False}),
            ("unbind_email", {"to": "alice@example.org", "mxid": "@alice:example.org"}),
            ("invite_email", full_invite),
            ("invite_email", empty_invite),
        ]
        try:
            for name, variables in samples:
                self._email(name, **variables)
            self._render("validation.sms.txt", {"to": "15005550006", "token": "123456"})
            self.expired_invite_reason(
                invitee="a…@e…",
                sender="@bob:example.org",
                invited_on="2026-11-02",
                expired_after="7 days",
                room_id="!room:example.org",
            )
            self.expired_invite_reason(
                invitee="", sender="", invited_on="", expired_after="", room_id=""
            )
            self.withdrawn_invite_reason(
                invitee="a…@e…",
                sender="@bob:example.org",
                invited_on="2026-11-02",
                withdrawn_by="@alice:example.org",
                room_id="!room:example.org",
            )
            self.page("validation_success")
            self.page("validation_failure", reason="The link has expired.")
        except NotificationError as e:
            raise ConfigError(f"notifications.templates_dir: {e}") from e
