"""Delete what can no longer be used: expired validation sessions, finished rate-limit windows,
imported ephemeral keys whose imported invites are all resolved."""

from __future__ import annotations

import logging

from appservice.db.invites import InviteStore
from appservice.services.expired_invites import ExpiredInviteService
from appservice.services.ratelimits import RateLimiter
from appservice.services.sessions import SessionService

log = logging.getLogger(__name__)


async def purge_expired(
    sessions: SessionService,
    ratelimiter: RateLimiter,
    expired_invites: ExpiredInviteService,
    invites: InviteStore | None = None,
) -> int:
    """One purge run; returns the number of rows deleted. Safe on several instances at once."""
    removed_sessions = await sessions.purge_expired()
    removed_windows = await ratelimiter.purge()
    removed_windows += await expired_invites.purge()
    if invites is not None:
        removed_windows += await invites.purge_imported_keys()
    if removed_sessions:
        log.info("purged %d expired validation sessions", removed_sessions)
    return removed_sessions + removed_windows
