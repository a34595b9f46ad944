"""/metrics after real flows: each counter moves by exactly what happened (both databases).

The flows run through the public API with the real SMTP sink, the loopback Twilio and the fake
homeserver (onbind); every figure is read back from a scrape of the metrics listener over HTTP.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appservice.clock import FakeClock
from appservice.crypto.hashing import lookup_hash
from tests.api.test_bind import validated_session
from tests.api.test_invites import bind, stop_background_jobs, store_invite
from tests.support.api_server import Api

V2 = "/_matrix/identity/v2"
M = "matrix_identity_"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def config_yaml() -> str:
    """Small limits to run into, a static store to sync and a REST store that cannot answer."""
    return """
ratelimits:
  register_per_ip: {limit: 12, period: 1h}
stores:
  order: [static, rest]
  static:
    threepids: [{medium: email, address: carol@example.org, mxid: "@carol:hs.test"}]
  rest:
    base_url: http://127.0.0.1:9/nothing-listens-here
    listable: true
    timeout: 2s
"""


class Scraper:
    """Scrapes the metrics listener and compares with the previous scrape."""

    def __init__(self, url: str, clock: FakeClock) -> None:
        self.url = url
        self.clock = clock
        self.before: Samples = {}

    async def scrape(self) -> Samples:
        # Past the cache of the database gauges, so each scrape reads the tables again.
        self.clock.advance(16)
        async with aiohttp.ClientSession() as session, session.get(self.url) as response:
            assert response.status == 200
            text = await response.text()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def mark(self) -> None:
        """Remember the figures now, to compare the next ones with."""
        self.before = await self.scrape()

    async def deltas(self, prefix: str = M) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """What moved since :meth:`mark` (counters, histogram counts; not gauges' levels)."""
        after = await self.scrape()
        return {
            key: value - self.before.get(key, 0.0)
            for key, value in after.items()
            if key[0].startswith(prefix)
            and (key[0].endswith("_total") or key[0].endswith("_count"))
            and value != self.before.get(key, 0.0)
        }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """A sample key as :class:`Scraper` returns them."""
    return (M + name, frozenset(labels.items()))


@pytest.fixture
async def scraper(api: Api, clock: FakeClock) -> AsyncIterator[Scraper]:
    """The server's metrics listener on a free port, with background jobs stopped (the test
    runs them), scraped once before the test."""
    await stop_background_jobs(api)
    host, port = await api.server.serve_metrics(port=0)
    scraper = Scraper(f"http://{host}:{port}/metrics", clock)
    await scraper.mark()
    yield scraper


def without_http(deltas: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
    """The non-HTTP deltas, keyed by name and sorted labels (readable in assertion diffs)."""
    return {
        name.removeprefix(M) + "".join(f"{{{k}={v}}}" for k, v in sorted(labels)): value
        for (name, labels), value in deltas.items()
        if not name.startswith(M + "http_")
    }


async def test_validate_bind_lookup_and_invite_move_their_counters(
    api: Api, scraper: Scraper
) -> None:
    alice, token = await api.register("alice")
    await validated_session(api, token, "alice@example.com")  # mail + submitToken
    status, body = await api.request(
        "POST",
        f"{V2}/validate/msisdn/requestToken",
        token=token,
        json={
            "client_secret": "sms-secret",
            "country": "GB",
            "phone_number": "020 7946 0018",
            "send_attempt": 1,
        },
    )
    assert status == 200, body
    code = re.search(r"\b(\d{6})\b", api.twilio.messages[-1].body)
    assert code is not None
    status, _ = await api.request(
        "POST",
        f"{V2}/validate/msisdn/submitToken",
        token=token,
        json={"sid": body["sid"], "client_secret": "sms-secret", "token": "000000"},
    )
    assert status == 400  # a wrong code validates nothing
    for _ in range(2):  # the second submission of the right code validates nothing new
        status, _ = await api.request(
            "POST",
            f"{V2}/validate/msisdn/submitToken",
            token=token,
            json={"sid": body["sid"], "client_secret": "sms-secret", "token": code.group(1)},
        )
        assert status == 200

    _, details = await api.request("GET", f"{V2}/hash_details", token=token)
    pepper = details["lookup_pepper"]
    await api.add_binding("email", "dave@example.com", "@dave:hs.test")
    hashes = [
        lookup_hash(a, "email", pepper)
        for a in ("dave@example.com", "nobody@example.com", "nobody2@example.com")
    ]
    status, found = await api.request(
        "POST",
        f"{V2}/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": [*hashes, hashes[1]]},
    )
    assert status == 200 and len(found["mappings"]) == 1

    status, _ = await store_invite(api, token, alice, "bob@example.com")
    assert status == 200
    gauges = await scraper.scrape()
    assert gauges[key("invites", state="pending")] == 1
    assert gauges[key("invites", state="bound")] == 0

    await bind(api, "bob@example.com", "bob")  # another validation mail and session
    assert await api.server.resolution_job.run_once() == 0  # queued at bind already
    pending = await scraper.scrape()
    assert pending[key("onbind_pending")] == 1
    assert pending[key("invites", state="bound")] == 1
    assert await api.server.delivery_job.run_once() == 1
    await api.homeserver.wait_for_onbind(1)

    deltas = await scraper.deltas()
    assert without_http(deltas) == {
        "mails_sent_total{template=validation_email}": 2,
        "mails_sent_total{template=invite_email}": 1,
        "sms_sent_total{template=validation_sms}": 1,
        "validation_sessions_started_total{medium=email}": 2,
        "validation_sessions_started_total{medium=msisdn}": 1,
        "validation_sessions_validated_total{medium=email}": 2,
        "validation_sessions_validated_total{medium=msisdn}": 1,
        "lookup_requests_total": 1,
        "lookup_addresses_total": 3,
        "lookup_hits_total": 1,
        "lookup_misses_total": 2,
        "store_invites_total": 1,
        "onbind_attempts_total": 1,
        "onbind_delivered_total": 1,
    }
    routes = {
        (dict(labels)["route"], dict(labels)["status"]): value
        for (name, labels), value in deltas.items()
        if name == M + "http_requests_total"
    }
    assert routes[(f"{V2}/lookup", "200")] == 1
    assert routes[(f"{V2}/store-invite", "200")] == 1
    assert routes[(f"{V2}/validate/msisdn/submitToken", "400")] == 1
    assert routes[(f"{V2}/validate/msisdn/submitToken", "200")] == 2
    assert routes[(f"{V2}/account/register", "200")] == 2
    after = await scraper.scrape()
    assert after[key("onbind_pending")] == 0
    assert after[key("onbind_oldest_pending_age_seconds")] == 0
    if api.server.db.is_postgres:  # asyncpg's pool; SQLite has one connection and no pool
        assert after[key("db_pool_size")] >= 1
        assert 0 <= after[key("db_pool_in_use")] <= after[key("db_pool_size")]


async def test_the_oldest_pending_onbind_ages_between_scrapes(
    api: Api, scraper: Scraper, clock: FakeClock
) -> None:
    api.homeserver.onbind_statuses.append(503)  # retried later: stays pending
    alice, token = await api.register("alice")
    status, _ = await store_invite(api, token, alice, "bob@example.com")
    assert status == 200
    await bind(api, "bob@example.com", "bob")
    assert await api.server.delivery_job.run_once() == 0
    first = await scraper.scrape()
    assert first[key("onbind_pending")] == 1
    clock.advance(100)
    second = await scraper.scrape()  # each scrape moves the clock 16 s too
    age = second[key("onbind_oldest_pending_age_seconds")]
    assert age - first[key("onbind_oldest_pending_age_seconds")] == 116


async def test_failures_and_refusals_are_counted_by_template_and_limit(
    api: Api, scraper: Scraper, clock: FakeClock
) -> None:
    alice, token = await api.register("alice")
    api.smtp.rcpt_reply = "550 5.1.1 No such user"
    status, body = await api.request(
        "POST",
        f"{V2}/validate/email/requestToken",
        token=token,
        json={"client_secret": "s3cret", "email": "gone@example.com", "send_attempt": 1},
    )
    assert status == 400 and body["errcode"] == "M_EMAIL_SEND_ERROR"
    status, _ = await store_invite(api, token, alice, "gone@example.com")
    assert status == 400
    api.smtp.rcpt_reply = None
    api.twilio.invalid_numbers.add("+442079460999")
    status, body = await api.request(
        "POST",
        f"{V2}/validate/msisdn/requestToken",
        token=token,
        json={
            "client_secret": "s3cret",
            "country": "GB",
            "phone_number": "020 7946 0999",
            "send_attempt": 1,
        },
    )
    assert status == 400, body

    # An onbind the homeserver refuses for good.
    api.homeserver.onbind_statuses.append(403)
    status, _ = await store_invite(api, token, alice, "erin@example.com")
    assert status == 200
    await bind(api, "erin@example.com", "erin")
    assert await api.server.delivery_job.run_once() == 0

    clock.advance(301)  # the stores were synced at start: this is the next sync
    assert await api.server.store_sync_job.run_once() is not None

    # register_per_ip is 12 an hour here; alice and erin used two.
    statuses = [
        (await api.request("POST", f"{V2}/account/register", json=creds))[0]
        for creds in (
            api.homeserver.issue_openid_token(f"@u{i}:hs.test", f"openid-u{i}") for i in range(12)
        )
    ]
    assert statuses.count(429) == 2
    deltas = without_http(await scraper.deltas())
    assert deltas == {
        "mails_failed_total{template=validation_email}": 1,
        "mails_failed_total{template=invite_email}": 1,
        "sms_failed_total{template=validation_sms}": 1,
        "validation_sessions_started_total{medium=email}": 1,
        "validation_sessions_validated_total{medium=email}": 1,
        "mails_sent_total{template=validation_email}": 1,
        "mails_sent_total{template=invite_email}": 1,
        "store_invites_total": 1,
        "ratelimit_refusals_total{limit=register_per_ip}": 2,
        "onbind_attempts_total": 1,
        "onbind_failed_total": 1,
        "identity_store_syncs_total{store=static}": 1,
        "identity_store_sync_errors_total{store=rest}": 1,
    }
