"""A bounded property-based fuzz of the Identity Service API, driven by the Matrix spec's own
OpenAPI files (read from ../shared/spec): on SQLite and PostgreSQL, no request gets a 5xx and
every response conforms to the spec (status, content type, body schema, Matrix error body).

The cases come from schemathesis, positive (valid per the spec's schemas) and negative
(breaking them), for every operation. Some of them are given real values the server made
beforehand (a validated session, a pending one with its token, an invite, the pepper, the
keys...), so that the fuzz reaches past "no such session" into the successful paths."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from unpaddedbase64 import encode_base64

from tests.api.test_bind import validated_session
from tests.api.test_validation import link_from_mail
from tests.support.api_server import Api
from tests.support.spec_fuzz import (
    AnyCase,
    SpecError,
    identity_api_document,
    matrix_error_body,
    spec_operations,
    status_code_conformance_with_spec_prose,
    with_prose_rules,
)

V2 = "/_matrix/identity/v2"
LOGOUT = f"POST {V2}/account/logout"
TERMS_URL = "https://example.org/tos-1-en.html"
# Cases per operation and generation mode: 23 operations, 16 of them with a body or query to
# break, so 39 runs of up to MAX_EXAMPLES requests per database.
MAX_EXAMPLES = 100
# A request that takes longer fails the fuzz (which must stay within its time budget).
REQUEST_TIMEOUT_S = 10.0
# What an operation that needs an access token is sent: mostly the fuzz user's own, sometimes
# none, one the server never issued, an empty one, or another scheme.
VALID = "valid"
AUTH_VARIANTS = [VALID] * 12 + [None, "Bearer not-a-token", "Bearer ", "Basic Zm9vOmJhcg=="]
# Users registered beforehand for logout to end (registering is rate-limited per IP).
LOGOUT_USERS = 6

Seeds = dict[str, dict[str, dict[str, Any]]]
SEED = encode_base64(bytes(range(32)))
# Values generation rarely hits by chance, put into string (and integer) fields now and then:
# NUL (PostgreSQL text cannot hold it), strings longer than any limit or index entry, the
# empty and blank ones, invisible and astral characters, escapes, and well-formed identifiers.
NASTY_STRINGS = [
    "\x00",
    "a\x00b",
    "",
    " ",
    "\t\r\n",
    "x" * 3000,
    "\u00e9" * 3000,
    "\U0001f600",
    "\u202e\ufeff",
    "%00",
    "../%2F",
    "ed25519:0",
    "@fuzz:hs.test",
    "!fuzz:hs.test",
    "mxc://hs.test/fuzz",
    "https://example.org/\u00e9",
    "javascript:alert(1)",
]
# Not the long ones in a URL: over 8 KiB, aiohttp refuses the request line itself (a plain-text
# 400, before any handler), which is the transport's business, not the API's.
URL_NASTY_STRINGS = [value for value in NASTY_STRINGS if len(quote(value)) < 1000]
NASTY_INTEGERS = [0, -1, 2**53, 2**63, -(2**63) - 1, 10**30]
# Leaves of one case that may be replaced (a negative body can be a large tree).
NASTY_LEAVES = 20
SUBMIT_TOKEN_OPERATIONS = [(m, medium) for m in ("POST", "GET") for medium in ("email", "msisdn")]


@pytest.fixture
def config_yaml() -> str:
    # Terms to accept, so that GET /terms has content to check and the fuzz users have
    # accepted them; only the fake homeserver may register (random server names would send the
    # server out to the network); requestToken's per-IP limit raised so that it keeps sending
    # mail (the per-address limits stay, and are met).
    return f"""
terms:
  policies:
    terms_of_service:
      version: "1"
      languages:
        en: {{name: Terms of Service, url: "{TERMS_URL}"}}
accounts:
  allowed_homeservers: [hs.test]
ratelimits:
  request_token_per_ip: {{limit: 100000, period: 1h}}
"""


async def _user(api: Api, localpart: str) -> tuple[str, str]:
    """A registered user who accepted the terms: (user_id, Authorization header)."""
    user_id, token = await api.register(localpart)
    status, body = await api.request(
        "POST", f"{V2}/terms", token=token, json={"user_accepts": [TERMS_URL]}
    )
    assert status == 200, body
    return user_id, f"Bearer {token}"


async def _seeds(api: Api, user_id: str, token: str) -> Seeds:
    """Real values for the fields of each operation (label -> location -> field -> value)."""
    bound = "fuzz-bound@example.org"
    sid = await validated_session(api, token, email=bound, secret="fuzzBound")
    # A session waiting for its token for each submitToken operation (wrong tokens end one);
    # the email link's (GET) leads to a next_link (a 3XX, not followed).
    pending = {}
    for method, medium in SUBMIT_TOKEN_OPERATIONS:
        mails = len(api.smtp.mails)
        request = {
            "client_secret": "fuzzPending",
            "email": f"fuzz-{method}-{medium}@example.org".lower(),
            "send_attempt": 1,
        }
        if (method, medium) == ("GET", "email"):
            request["next_link"] = "https://example.org/validated"
        status, body = await api.request(
            "POST", f"{V2}/validate/email/requestToken", token=token, json=request
        )
        assert status == 200, body
        await api.smtp.wait_for(mails + 1)
        pending[method, medium] = link_from_mail(api)
    status, details = await api.request("GET", f"{V2}/hash_details", token=token)
    assert status == 200, details
    room = {"medium": "email", "room_id": "!fuzz:hs.test", "sender": user_id}
    status, invite = await api.request(
        "POST", f"{V2}/store-invite", token=token, json={**room, "address": "fuzz@example.org"}
    )
    assert status == 200, invite
    server_key, ephemeral_key = (key["public_key"] for key in invite["public_keys"])
    credentials = api.homeserver.issue_openid_token(f"@fuzz-reg:{api.homeserver.server_name}", "o")
    session = {"sid": sid, "client_secret": "fuzzBound"}
    return {
        f"POST {V2}/account/register": {"body": credentials},
        f"GET {V2}/3pid/getValidated3pid": {"query": session},
        f"POST {V2}/3pid/bind": {"body": {**session, "mxid": user_id}},
        f"POST {V2}/3pid/unbind": {
            "body": {**session, "mxid": user_id, "threepid": {"medium": "email", "address": bound}}
        },
        **{
            f"{method} {V2}/validate/{medium}/submitToken": {
                "body" if method == "POST" else "query": pending[method, medium]
            }
            for method, medium in SUBMIT_TOKEN_OPERATIONS
        },
        f"POST {V2}/validate/msisdn/requestToken": {
            "body": {"country": "GB", "phone_number": "020 7946 0018"}
        },
        f"POST {V2}/lookup": {"body": {"algorithm": "sha256", "pepper": details["lookup_pepper"]}},
        f"POST {V2}/store-invite": {"body": {**room, "address": "fuzz-invitee@example.org"}},
        # Any ed25519 seed signs (the homeserver checks the signature against the invite).
        f"POST {V2}/sign-ed25519": {
            "body": {"token": invite["token"], "mxid": user_id, "private_key": SEED}
        },
        f"GET {V2}/pubkey/{{keyId}}": {"path_parameters": {"keyId": "ed25519:0"}},
        f"GET {V2}/pubkey/isvalid": {"query": {"public_key": server_key}},
        f"GET {V2}/pubkey/ephemeral/isvalid": {"query": {"public_key": ephemeral_key}},
        f"POST {V2}/terms": {"body": {"user_accepts": [TERMS_URL]}},
    }


class Fuzzer:
    """Runs in a worker thread (schemathesis sends with ``requests``, blocking) while the
    server answers on the test's event loop."""

    def __init__(
        self,
        schema: schemathesis.BaseSchema,
        base_url: str,
        authorization: str,
        seeds: Seeds,
        logout_authorizations: list[str],
    ) -> None:
        self.schema = schema
        self.base_url = base_url
        self.authorization = authorization
        self.seeds = seeds
        self.session = requests.Session()
        self.checks = [
            not_a_server_error,
            status_code_conformance_with_spec_prose(authorization),
            content_type_conformance,
            response_schema_conformance,
            matrix_error_body,
        ]
        # Logout ends the token it is sent with: it takes the next of its own each time one
        # was ended, then keeps sending the last (which is then 401 M_UNKNOWN_TOKEN).
        self._logout = list(logout_authorizations)
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)

    def run(self) -> None:
        """``MAX_EXAMPLES`` cases per operation and generation mode."""
        try:
            for operation in spec_operations(self.schema):
                definition = operation.definition.raw
                auth = st.sampled_from(AUTH_VARIANTS) if definition.get("security") else st.none()
                seeds = self.seeds.get(operation.label, {})
                fields = sorted((loc, name) for loc, values in seeds.items() for name in values)
                modes = [GenerationMode.POSITIVE]
                # Negative cases break the body or query; an operation without either has
                # nothing to break.
                if "requestBody" in definition or any(
                    parameter.get("in") == "query" for parameter in definition.get("parameters", [])
                ):
                    modes.append(GenerationMode.NEGATIVE)
                for mode in modes:
                    self._fuzz(
                        operation.as_strategy(generation_mode=mode),
                        auth,
                        st.frozensets(st.sampled_from(fields)) if fields else st.just(frozenset()),
                    )
        finally:
            self.session.close()

    def _fuzz(
        self,
        cases: st.SearchStrategy[AnyCase],
        auth: st.SearchStrategy[str | None],
        seeded: st.SearchStrategy[frozenset[tuple[str, str]]],
    ) -> None:
        # derandomize: the same cases on every run. No shrinking: it would send an unbounded
        # number of requests; a failure names the case (with a curl command) as it was sent.
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=cases, auth=auth, seeded=seeded, data=st.data())
        def fuzz(
            case: AnyCase,
            auth: str | None,
            seeded: frozenset[tuple[str, str]],
            data: st.DataObject,
        ) -> None:
            self._send(case, auth, seeded, data)

        fuzz()

    def _send(
        self,
        case: AnyCase,
        auth: str | None,
        seeded: frozenset[tuple[str, str]],
        data: st.DataObject,
    ) -> None:
        label = case.operation.label
        for location, name in sorted(seeded):
            container = getattr(case, location)
            if isinstance(container, dict):
                container[name] = copy.deepcopy(self.seeds[label][location][name])
        leaves = [0]
        for location in ("path_parameters", "query", "body"):
            container = getattr(case, location)
            if isinstance(container, dict):
                strings = NASTY_STRINGS if location == "body" else URL_NASTY_STRINGS
                setattr(case, location, _with_nasty_values(container, data, leaves, strings))
        headers = {}
        if auth == VALID:
            headers["Authorization"] = self._logout[0] if label == LOGOUT else self.authorization
        elif auth is not None:
            headers["Authorization"] = auth
        response = case.call_and_validate(
            base_url=self.base_url,
            session=self.session,
            headers=headers,
            checks=self.checks,
            timeout=REQUEST_TIMEOUT_S,
            # A next_link redirect is checked as it is, never followed (off the machine).
            allow_redirects=False,
        )
        self.statuses[label][response.status_code] += 1
        ended = label == LOGOUT and auth == VALID and response.status_code == 200
        if ended and len(self._logout) > 1:
            self._logout.pop(0)


def _with_nasty_values(
    value: Any, data: st.DataObject, leaves: list[int], strings: list[str]
) -> Any:
    """``value`` with some of its first ``NASTY_LEAVES`` string and integer leaves replaced by
    one of ``strings`` / ``NASTY_INTEGERS`` (``leaves`` counts the leaves seen)."""
    if isinstance(value, dict):
        return {k: _with_nasty_values(item, data, leaves, strings) for k, item in value.items()}
    if isinstance(value, list):
        return [_with_nasty_values(item, data, leaves, strings) for item in value]
    nasty = strings if isinstance(value, str) else NASTY_INTEGERS
    if isinstance(value, bool) or not isinstance(value, str | int) or leaves[0] >= NASTY_LEAVES:
        return value
    leaves[0] += 1
    if data.draw(st.sampled_from(range(8))) != 7:  # about one leaf in twelve
        return value
    return data.draw(st.sampled_from(nasty))


async def test_api_conforms_to_the_spec_under_fuzzing(api: Api) -> None:
    # The Authorization header is the fuzz's to choose (AUTH_VARIANTS), not generated.
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    try:
        schema = schemathesis.openapi.from_dict(
            with_prose_rules(identity_api_document()), config=config
        )
        spec_operations(schema)
    except SpecError as e:
        pytest.fail(str(e))
    # The production listener (IdentityServer.serve), beside the test client's.
    host, port = await api.server.serve("127.0.0.1", 0)
    user_id, authorization = await _user(api, "fuzz")
    token = authorization.removeprefix("Bearer ")
    seeds = await _seeds(api, user_id, token)
    logout_users = [(await _user(api, f"fuzz-logout{i}"))[1] for i in range(LOGOUT_USERS)]

    fuzzer = Fuzzer(schema, f"http://{host}:{port}", authorization, seeds, logout_users)
    started = time.monotonic()
    await asyncio.to_thread(fuzzer.run)
    summary = "\n".join(f"{label}: {dict(counts)}" for label, counts in fuzzer.statuses.items())
    print(f"fuzz took {time.monotonic() - started:.1f}s; statuses per operation:\n{summary}")
    # The fuzz went past the first refusal everywhere: every operation of the spec was answered
    # with success at least once (the seeds keep it so).
    labels = {operation.label for operation in spec_operations(schema)}
    succeeded = {
        label
        for label, counts in fuzzer.statuses.items()
        if any(200 <= status < 400 for status in counts)
    }
    assert succeeded == labels, f"never successful: {sorted(labels - succeeded)}\n{summary}"
