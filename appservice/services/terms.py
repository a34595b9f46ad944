"""Terms of service: what must be accepted, and whether a user did."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appservice.clock import Clock
from appservice.config import TermsConfig
from appservice.db.terms import TermsStore
from appservice.errors import MatrixError

_CACHE_LIMIT = 50_000


class TermsService:
    """Policies from the config, acceptances in the database.

    A policy counts as accepted when any language's URL of its current version was accepted;
    each version has its own URLs (the spec requires it), so a new version asks again.
    """

    def __init__(self, config: TermsConfig, store: TermsStore, clock: Clock) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._urls_by_policy = {
            policy_id: {doc.url for doc in policy.languages.values()}
            for policy_id, policy in config.policies.items()
        }
        self._known_urls = set().union(*self._urls_by_policy.values())
        # Acceptance only grows, so a user found compliant stays compliant for this config.
        self._compliant: set[str] = set()

    def policies(self) -> dict[str, Any]:
        """The ``GET /terms`` body."""
        return {
            "policies": {
                policy_id: {
                    "version": policy.version,
                    **{
                        lang: {"name": doc.name, "url": doc.url}
                        for lang, doc in policy.languages.items()
                    },
                }
                for policy_id, policy in self._config.policies.items()
            }
        }

    async def accept(self, user_id: str, urls: Iterable[str]) -> None:
        """Record acceptance of the given policy URLs (URLs of no current policy are ignored)."""
        known = [url for url in urls if url in self._known_urls]
        if known:
            await self._store.accept(user_id, known, self._clock.now_ms())

    async def require_accepted(self, user_id: str) -> None:
        """Raise 403 M_TERMS_NOT_SIGNED unless every current policy is accepted."""
        if not self._urls_by_policy or user_id in self._compliant:
            return
        accepted = await self._store.accepted_urls(user_id)
        missing = [pid for pid, urls in self._urls_by_policy.items() if not urls & accepted]
        if missing:
            raise MatrixError(
                403,
                "M_TERMS_NOT_SIGNED",
                "Terms of service not accepted: " + ", ".join(sorted(missing)),
            )
        if len(self._compliant) >= _CACHE_LIMIT:
            self._compliant.clear()
        self._compliant.add(user_id)
