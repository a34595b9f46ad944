"""A bounded closed-loop HTTP load generator (aiohttp), and the statistics of one run.

``concurrency`` workers share one ``ClientSession`` whose connector allows exactly
``concurrency`` connections. Each worker sends a request, waits for the whole answer and sends the
next, until the run's duration is over or ``max_requests`` requests were started. Requests still in
flight at the deadline may finish during a bounded drain; after it they are abandoned (counted, and
the caller may restart a server that is still chewing on them).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Workload:
    """What one benchmark row sends."""

    name: str
    method: str
    path: str
    # The body of the i-th request (None: no body).
    body: Callable[[int], bytes] | None
    # Addresses carried by each request (lookups), for addresses/s; 0 otherwise.
    addresses_per_request: int = 0


@dataclass
class RunStats:
    """What a run measured."""

    started: int = 0
    ok: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    abandoned: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    # Indices of the requests that succeeded (to check their mail).
    ok_indices: list[int] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        """Successful requests per second of wall time (including the drain)."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of successful requests' latency in seconds (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    @property
    def error_summary(self) -> str:
        """``status errcode xcount`` for each kind of failure, most frequent first."""
        parts = [f"{kind} x{n}" for kind, n in self.errors.most_common(4)]
        if self.abandoned:
            parts.append(f"abandoned x{self.abandoned}")
        return ", ".join(parts)


def _describe_failure(status: int, body: bytes) -> str:
    try:
        errcode = json.loads(body).get("errcode", "")
    except (ValueError, AttributeError):
        errcode = ""
    return f"{status} {errcode}".strip()


async def run_load(
    base_url: str,
    workload: Workload,
    *,
    concurrency: int,
    duration: float,
    max_requests: int,
    token: str,
    drain: float,
    first_index: int = 0,
) -> RunStats:
    """Run ``workload`` against ``base_url`` and measure it.

    Request indices start at ``first_index`` (so warm-ups and measured runs use different
    addresses). The run lasts ``duration`` seconds or ``max_requests`` requests, whichever comes
    first, plus at most ``drain`` seconds for requests still in flight.
    """
    stats = RunStats()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = base_url + workload.path
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=duration + drain + 5)
    next_index = first_index
    last_index = first_index + max_requests
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration
        last_done = start

        async def worker() -> None:
            nonlocal next_index, last_done
            while time.perf_counter() < deadline and next_index < last_index:
                index = next_index
                next_index += 1
                stats.started += 1
                body = workload.body(index) if workload.body is not None else None
                sent = time.perf_counter()
                try:
                    async with session.request(
                        workload.method, url, data=body, headers=headers
                    ) as response:
                        payload = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    stats.errors[type(e).__name__] += 1
                    last_done = time.perf_counter()
                    continue
                done = time.perf_counter()
                last_done = done
                if 200 <= status < 300:
                    stats.ok += 1
                    stats.latencies.append(done - sent)
                    stats.ok_indices.append(index)
                else:
                    stats.errors[_describe_failure(status, payload)] += 1

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=duration + drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        stats.abandoned = stats.started - stats.ok - sum(stats.errors.values())
        stats.elapsed = last_done - start
    return stats
