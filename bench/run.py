#!/usr/bin/env python3
"""Benchmark of issue 6: our identity server (SQLite, PostgreSQL) against the raw database and
sydent 2.6.1, printed as a markdown table (and written to ``bench/results/latest.md``).

For each N (number of bindings) it loads a cached dataset into a fresh copy of the database,
starts the server as a subprocess (this process is the load generator), and measures, at each
concurrency, ``POST /v2/lookup`` (sha256; 1, 100 and 1,000 hashes, half hits), ``GET
/v2/hash_details``, ``POST /v2/store-invite`` and ``POST /v2/validate/email/requestToken`` (mail
to a loopback SMTP sink in its own process, delivered mails counted). It also issues the same
lookups straight to the database ("limit") and, with ``--with-sydent``, measures sydent on the
same associations, interleaved (ours, sydent, ours, ... per repetition). Each number is the
median of the repetitions.

Run it with the project's venv, e.g. ``.venv/bin/python bench/run.py --quick`` (about half a
minute) or ``.venv/bin/python bench/run.py --with-sydent`` (the full run; see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]
from loadgen import RunStats, Workload, run_load
from targets import (
    REPO,
    ROOM_ID,
    USER_ID,
    Dataset,
    OurServer,
    Running,
    SydentServer,
    address,
    hash_of,
    prepare_ours,
    prepare_sydent,
    process_cpu_seconds,
    stop_process,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO / ".cache" / "bench"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.md"
DEFAULT_POSTGRES = os.environ.get(
    "APPSERVICE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres"
)
LOOKUP_BATCHES = (1, 100, 1000)
MAIL_WORKLOADS = ("store-invite", "requestToken")
# The limit's SQLite query: one parameter per hash (no padding, no JSON), its best form.
SQLITE_LOOKUP_SQL = "SELECT lookup_hash, mxid FROM bindings WHERE lookup_hash IN ({})"
# What our server runs on SQLite (AppDatabase.select_by_keys): measured too, as "limit join",
# so the report shows how much of the margin over the IN form is the query's.
SQLITE_JOIN_LOOKUP_SQL = (
    "SELECT bindings.lookup_hash, bindings.mxid FROM json_each(?) AS wanted"
    " CROSS JOIN bindings ON bindings.lookup_hash = wanted.value"
)
POSTGRES_LOOKUP_SQL = "SELECT lookup_hash, mxid FROM bindings WHERE lookup_hash = ANY($1::text[])"


def log(message: str) -> None:
    """Progress on stderr (stdout is the report)."""
    print(f"# {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(v.replace("_", "")) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a comma-separated list of numbers"
        ) from e
    if not numbers or any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError(f"{value!r}: give positive numbers")
    return numbers


def _backends(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = set(names) - {"sqlite", "postgres"}
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{value!r}: choose among sqlite,postgres")
    return names


ALL_WORKLOADS = ("lookup", "hash_details", *MAIL_WORKLOADS)


def _workloads(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = set(names) - set(ALL_WORKLOADS)
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{value!r}: choose among {','.join(ALL_WORKLOADS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` documents every option)."""
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark our identity server (and optionally sydent 2.6.1) on loopback; "
        "prints a markdown table and writes it to --output.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: N=1000, SQLite only, 1 repetition, 1 s per row, no sydent "
        "(overrides --sizes/--backends/--repetitions/--duration/--max-requests)",
    )
    p.add_argument(
        "--with-sydent",
        action="store_true",
        help="also install matrix-sydent 2.6.1 into its own venv (<cache>/sydent-venv), load the "
        "same associations and measure it interleaved with ours",
    )
    p.add_argument(
        "--backends",
        type=_backends,
        default=["sqlite", "postgres"],
        help="databases for our server, comma-separated (default sqlite,postgres)",
    )
    p.add_argument(
        "--sizes",
        type=_int_list,
        default=[10_000, 1_000_000],
        help="numbers of bindings N, comma-separated (default 10000,1000000)",
    )
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds of load per row (default 5)"
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=50_000,
        help="request cap per row, whichever of it and --duration comes first (default 50000)",
    )
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 32],
        help="concurrent connections, comma-separated (default 1,32)",
    )
    p.add_argument(
        "--repetitions",
        type=int,
        default=3,
        help="repetitions; every number is their median (default 3)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where to write the markdown report (default {DEFAULT_OUTPUT.relative_to(REPO)})",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="datasets and sydent's venv are cached here (default .cache/bench)",
    )
    p.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        help="PostgreSQL maintenance database URL (default $APPSERVICE_TEST_POSTGRES or "
        "postgres://postgres@127.0.0.1:5432/postgres)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=10,
        help="our server's PostgreSQL pool size, also the limit's (default 10)",
    )
    p.add_argument(
        "--workloads",
        type=_workloads,
        default=list(ALL_WORKLOADS),
        help="rows to measure, comma-separated (default lookup,hash_details,store-invite,"
        "requestToken; 'lookup' is the 1-, 100- and 1,000-hash rows)",
    )
    p.add_argument(
        "--no-limit", action="store_true", help="skip the direct-database ('limit') rows"
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each of our rows with py-spy (collapsed stacks, one file per row) into DIR; "
        "py-spy comes from PATH or <cache>/tools-venv (pip install py-spy there)",
    )
    p.add_argument(
        "--sink",
        choices=("lean", "aiosmtpd"),
        default="lean",
        help="SMTP sink implementation (default lean, on asyncio.Protocol; aiosmtpd handles DATA "
        "line by line in Python, ~0.8 ms CPU per 5 KB mail on the same cores as the servers)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the run directory (configs, server logs) under the cache dir for inspection",
    )
    return p


@dataclass(frozen=True)
class Settings:
    """The options after --quick is applied."""

    sizes: list[int]
    backends: list[str]
    with_sydent: bool
    duration: float
    max_requests: int
    concurrency: list[int]
    repetitions: int
    output: Path
    cache_dir: Path
    postgres: str
    max_connections: int
    limit: bool
    quick: bool
    keep: bool = False
    profile: Path | None = None
    workloads: tuple[str, ...] = ALL_WORKLOADS
    sink: str = "lean"
    # Distinct request bodies prepared per lookup batch size.
    pool_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def drain(self) -> float:
        """Seconds requests in flight at the deadline may take to finish."""
        return 3.0 if self.quick else max(10.0, self.duration)

    @property
    def warmup(self) -> float:
        """Seconds of unmeasured warm-up per row."""
        return 0.2 if self.quick else 0.5


def settings_from(args: argparse.Namespace) -> Settings:
    """Resolve --quick and the defaults."""
    if args.quick:
        return Settings(
            sizes=[1000],
            backends=["sqlite"],
            with_sydent=False,
            duration=1.0,
            max_requests=300,
            concurrency=args.concurrency,
            repetitions=1,
            output=args.output,
            cache_dir=args.cache_dir,
            postgres=args.postgres,
            max_connections=args.max_connections,
            limit=not args.no_limit,
            quick=True,
            keep=args.keep,
            profile=args.profile,
            workloads=tuple(args.workloads),
            sink=args.sink,
            pool_sizes={1: 64, 100: 32, 1000: 8},
        )
    return Settings(
        sizes=args.sizes,
        backends=args.backends,
        with_sydent=args.with_sydent,
        duration=args.duration,
        max_requests=args.max_requests,
        concurrency=args.concurrency,
        repetitions=max(1, args.repetitions),
        output=args.output,
        cache_dir=args.cache_dir,
        postgres=args.postgres,
        max_connections=args.max_connections,
        limit=not args.no_limit,
        quick=False,
        keep=args.keep,
        profile=args.profile,
        workloads=tuple(args.workloads),
        sink=args.sink,
        pool_sizes={1: 2048, 100: 512, 1000: 128},
    )


# --------------------------------------------------------------------------------------------
# The SMTP sink (its own process)
# --------------------------------------------------------------------------------------------


class SinkProcess:
    """``bench/smtp_sink.py`` as a subprocess, asked for counts over a pipe."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, impl: str = "lean") -> SinkProcess:
        """Start it (``--impl``: ``lean`` or ``aiosmtpd``) and read its port."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH_DIR / "smtp_sink.py"),
            "--impl",
            impl,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        word, _, port = line.decode().partition(" ")
        if word != "port":
            process.kill()
            await process.wait()
            raise RuntimeError(f"SMTP sink did not start: {line!r}")
        return cls(process, int(port))

    async def _ask(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        async with self._lock:
            self.process.stdin.write(command.encode() + b"\n")
            await self.process.stdin.drain()
            return (await asyncio.wait_for(self.process.stdout.readline(), 30)).decode().strip()

    async def count(self, prefix: str) -> int:
        """Delivered recipients starting with ``prefix``."""
        return int(await self._ask(f"count {prefix}"))

    async def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the sink process has used so far."""
        return float(await self._ask("cpu"))

    async def wait_for(self, prefix: str, expected: int, within: float) -> int:
        """Wait (bounded) until ``expected`` recipients with ``prefix`` arrived; their count."""
        limit = time.monotonic() + within
        count = await self.count(prefix)
        while count < expected and time.monotonic() < limit:
            await asyncio.sleep(0.1)
            count = await self.count(prefix)
        return count

    async def stop(self) -> None:
        """Stop the sink (bounded), killing it if it does not answer."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ask("quit"), 5)
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


def lookup_batches(n: int, batch: int, count: int, pepper: str) -> list[list[str]]:
    """``count`` hash lists of ``batch`` hashes, half of bound addresses and half unknown.

    The sample is seeded, so every server (and the limit) gets the same addresses.
    """
    rng = random.Random(f"lookup-{n}-{batch}")
    batches = []
    for k in range(count):
        hits = (1 - k % 2) if batch == 1 else batch // 2
        hashes = [hash_of(address(rng.randrange(n)), pepper) for _ in range(hits)]
        hashes += [
            hash_of(f"nobody{rng.getrandbits(64):x}@nowhere.invalid", pepper)
            for _ in range(batch - hits)
        ]
        rng.shuffle(hashes)
        batches.append(hashes)
    return batches


def _cycle(bodies: Sequence[bytes]) -> Callable[[int], bytes]:
    return lambda i: bodies[i % len(bodies)]


@dataclass(frozen=True)
class Row:
    """A workload with what its mail check needs (``mail_prefix`` for mailing workloads)."""

    workload: Workload
    batch: int = 0


def workloads(dataset: Dataset, settings: Settings) -> list[Row]:
    """The rows measured against one server."""
    rows = []
    for batch in LOOKUP_BATCHES if "lookup" in settings.workloads else ():
        hash_lists = lookup_batches(dataset.n, batch, settings.pool_sizes[batch], dataset.pepper)
        bodies = [
            json.dumps(
                {"algorithm": "sha256", "pepper": dataset.pepper, "addresses": hashes}
            ).encode()
            for hashes in hash_lists
        ]
        rows.append(
            Row(
                Workload(
                    f"lookup {batch}",
                    "POST",
                    "/_matrix/identity/v2/lookup",
                    _cycle(bodies),
                    addresses_per_request=batch,
                ),
                batch,
            )
        )
    if "hash_details" in settings.workloads:
        rows.append(Row(Workload("hash_details", "GET", "/_matrix/identity/v2/hash_details", None)))
    return rows


def mail_workload(name: str, prefix: str) -> Workload:
    """store-invite or requestToken with a unique address (``<prefix><i>@bench.example``)."""
    if name == "store-invite":

        def invite(i: int) -> bytes:
            return json.dumps(
                {
                    "medium": "email",
                    "address": f"{prefix}{i}@bench.example",
                    "room_id": ROOM_ID,
                    "sender": USER_ID,
                }
            ).encode()

        return Workload(name, "POST", "/_matrix/identity/v2/store-invite", invite)

    def request_token(i: int) -> bytes:
        return json.dumps(
            {
                "client_secret": f"cs{prefix}{i}",
                "email": f"{prefix}{i}@bench.example",
                "send_attempt": 1,
            }
        ).encode()

    return Workload(name, "POST", "/_matrix/identity/v2/validate/email/requestToken", request_token)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


class Server(Protocol):
    """What OurServer and SydentServer have in common."""

    dataset: Dataset

    @property
    def label(self) -> str: ...

    async def start(self) -> Running: ...


@dataclass
class Results:
    """Every measurement of the run, one dict per row and repetition."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class PgBackends:
    """CPU of the PostgreSQL backends serving one database (they are not in our server's pid)."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.admin_url = admin_url
        self.database = database

    async def snapshot(self) -> dict[int, float]:
        """CPU seconds of each backend connected to the database now."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            pids = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database
            )
        finally:
            await conn.close()
        return {r["pid"]: process_cpu_seconds(r["pid"]) for r in pids}

    @staticmethod
    def used(before: dict[int, float], after: dict[int, float]) -> float:
        """CPU used between two snapshots."""
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


class Session:
    """One server process measured through all its rows (restarted if it gets stuck)."""

    def __init__(
        self,
        server: Server,
        settings: Settings,
        sink: SinkProcess,
        results: Results,
        rep: int,
        tag: str,
        pg: PgBackends | None,
    ) -> None:
        self.server = server
        self.settings = settings
        self.sink = sink
        self.results = results
        self.rep = rep
        self.tag = tag
        self.pg = pg
        self.running: Running | None = None
        self.peak_rss_kib = 0
        self.restarts = 0
        self._seq = 0

    def _prefix(self) -> str:
        self._seq += 1
        return f"{self.tag}{self._seq}x"

    async def _ensure_running(self) -> Running:
        if self.running is not None and self.running.alive():
            return self.running
        if self.running is not None:
            self.results.problems.append(
                f"{self.server.label}: process exited ({self.running.process.returncode});"
                f" restarted. Log:\n{self.running.log_tail()}"
            )
            self.restarts += 1
        self.running = await self.server.start()
        return self.running

    async def _retire(self) -> None:
        if self.running is not None:
            self.peak_rss_kib = max(self.peak_rss_kib, self.running.peak_rss_kib())
            await asyncio.to_thread(stop_process, self.running.process, 5)
            self.running = None

    async def run(self) -> None:
        """Start, measure start-up and idle memory, run every row, stop."""
        dataset = self.server.dataset
        try:
            running = await self._ensure_running()
            startup = running.startup_s
            await asyncio.sleep(1.0)
            idle_rss = running.rss_kib()
            log(
                f"{self.server.label}/{dataset.backend} N={dataset.n} rep {self.rep + 1}: "
                f"start-up {startup * 1000:.0f} ms, idle RSS {idle_rss / 1024:.1f} MiB"
            )
            rows = workloads(dataset, self.settings)
            for row in rows:
                for c in self.settings.concurrency:
                    await self._measure(row.workload, c, dataset, None)
            for name in MAIL_WORKLOADS:
                if name not in self.settings.workloads:
                    continue
                for c in self.settings.concurrency:
                    prefix = self._prefix()
                    await self._measure(mail_workload(name, prefix), c, dataset, prefix)
            if self.running is not None:
                self.peak_rss_kib = max(self.peak_rss_kib, self.running.peak_rss_kib())
            self.results.processes.append(
                {
                    "n": dataset.n,
                    "backend": dataset.backend,
                    "server": self.server.label,
                    "rep": self.rep,
                    "startup_s": startup,
                    "idle_rss_mib": idle_rss / 1024,
                    "peak_rss_mib": self.peak_rss_kib / 1024,
                    "restarts": self.restarts,
                }
            )
        finally:
            await self._retire()

    async def _warm_up(self, workload: Workload, running: Running) -> None:
        if workload.name in MAIL_WORKLOADS:
            workload = mail_workload(workload.name, self._prefix() + "w")
        stats = await run_load(
            running.base_url,
            workload,
            concurrency=1,
            duration=self.settings.warmup,
            max_requests=20,
            token=self.server.dataset.token,
            drain=self.settings.drain,
            first_index=10_000_000,
        )
        if stats.abandoned:
            await self._restart("warm-up", workload.name, stats)

    def _start_profiler(
        self, running: Running, workload: Workload, concurrency: int
    ) -> subprocess.Popen[bytes] | None:
        """py-spy recording our server during a row (``--profile``), or None."""
        directory = self.settings.profile
        if directory is None or self.server.label != "ours":
            return None
        py_spy = shutil.which("py-spy") or str(self.settings.cache_dir / "tools-venv/bin/py-spy")
        dataset = self.server.dataset
        name = f"{dataset.backend}-{dataset.n}-{workload.name.replace(' ', '')}-c{concurrency}"
        directory.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(running.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--output",
                str(directory / f"{name}-r{self.rep}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def _restart(self, phase: str, name: str, stats: RunStats) -> None:
        log(
            f"{self.server.label}: {stats.abandoned} {name} requests still unanswered after the "
            f"{phase} drain; restarting it"
        )
        await self._retire()
        self.restarts += 1

    async def _measure(
        self, workload: Workload, concurrency: int, dataset: Dataset, mail_prefix: str | None
    ) -> None:
        running = await self._ensure_running()
        await self._warm_up(workload, running)
        running = await self._ensure_running()
        cpu_before = running.cpu_seconds()
        sink_before = await self.sink.cpu_seconds() if mail_prefix is not None else 0.0
        db_before = await self.pg.snapshot() if self.pg else {}
        profiler = self._start_profiler(running, workload, concurrency)
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        stats = await run_load(
            running.base_url,
            workload,
            concurrency=concurrency,
            duration=self.settings.duration,
            max_requests=self.settings.max_requests,
            token=dataset.token,
            drain=self.settings.drain,
        )
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = running.cpu_seconds() - cpu_before
        if profiler is not None:
            await asyncio.to_thread(_stop_profiler, profiler)
        db_cpu = PgBackends.used(db_before, await self.pg.snapshot()) if self.pg else None
        client_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
            usage_after.ru_stime - usage_before.ru_stime
        )
        delivered = sink_cpu_ms_mail = None
        if mail_prefix is not None:
            delivered = await self.sink.wait_for(mail_prefix, stats.ok, within=15)
            sink_cpu = await self.sink.cpu_seconds() - sink_before
            sink_cpu_ms_mail = sink_cpu * 1000 / delivered if delivered else float("nan")
            if delivered < stats.ok:
                self.results.problems.append(
                    f"{self.server.label}/{dataset.backend} N={dataset.n} {workload.name} "
                    f"c={concurrency}: {stats.ok} requests succeeded but only {delivered} mails "
                    "reached the sink"
                )
        if stats.errors:
            self.results.problems.append(
                f"{self.server.label}/{dataset.backend} N={dataset.n} {workload.name} "
                f"c={concurrency}: {stats.error_summary}"
            )
        record = {
            "n": dataset.n,
            "backend": dataset.backend,
            "server": self.server.label,
            "workload": workload.name,
            "c": concurrency,
            "rep": self.rep,
            "ok": stats.ok,
            "req_s": stats.requests_per_s,
            "addr_s": stats.requests_per_s * workload.addresses_per_request,
            "p50_ms": stats.percentile(0.5) * 1000,
            "p99_ms": stats.percentile(0.99) * 1000,
            "cpu_s": cpu,
            "cpu_ms_req": cpu * 1000 / stats.ok if stats.ok else float("nan"),
            "db_cpu_s": db_cpu,
            "client_cpu_pct": 100 * client_cpu / stats.elapsed if stats.elapsed else float("nan"),
            "errors": sum(stats.errors.values()) + stats.abandoned,
            "error_summary": stats.error_summary,
            "delivered": delivered,
            "sink_cpu_ms_mail": sink_cpu_ms_mail,
        }
        self.results.rows.append(record)
        log(
            f"  {workload.name:<13} c={concurrency:<3} {stats.requests_per_s:9.1f} req/s  "
            f"p50 {record['p50_ms']:8.2f} ms  p99 {record['p99_ms']:8.2f} ms  "
            f"cpu {cpu:5.2f} s"
            + (f"  mails {delivered}/{stats.ok}" if delivered is not None else "")
            + (f"  sink {sink_cpu_ms_mail:.3f} ms/mail" if sink_cpu_ms_mail is not None else "")
            + (f"  errors: {stats.error_summary}" if stats.errors or stats.abandoned else "")
        )
        if stats.abandoned or not running.alive():
            await self._restart("row", workload.name, stats)


def _stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """Ask py-spy to write its file (SIGINT), bounded."""
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(timeout=20)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# The limit: the same lookups straight to the database
# --------------------------------------------------------------------------------------------


def _limit_record(
    dataset: Dataset,
    batch: int,
    c: int,
    rep: int,
    latencies: list[float],
    elapsed: float,
    server: str = "limit",
) -> dict[str, Any]:
    stats = RunStats(ok=len(latencies), latencies=latencies, elapsed=elapsed)
    return {
        "n": dataset.n,
        "backend": dataset.backend,
        "server": server,
        "workload": f"lookup {batch}",
        "c": c,
        "rep": rep,
        "ok": stats.ok,
        "req_s": stats.requests_per_s,
        "addr_s": stats.requests_per_s * batch,
        "p50_ms": stats.percentile(0.5) * 1000,
        "p99_ms": stats.percentile(0.99) * 1000,
        "cpu_s": None,
        "cpu_ms_req": None,
        "db_cpu_s": None,
        "client_cpu_pct": None,
        "errors": 0,
        "error_summary": "",
        "delivered": None,
        "sink_cpu_ms_mail": None,
    }


def _sqlite_limit(
    path: Path, hash_lists: list[list[str]], duration: float, cap: int, join: bool = False
) -> tuple[list[float], float]:
    """Sequential lookups on one connection, as our server's single SQLite connection does:
    ``IN (?, …)`` (the issue's limit) or, with ``join``, our server's ``json_each`` join."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + duration
        i = 0
        while time.perf_counter() < deadline and i < cap:
            hashes = hash_lists[i % len(hash_lists)]
            sent = time.perf_counter()
            if join:
                rows = conn.execute(SQLITE_JOIN_LOOKUP_SQL, (json.dumps(hashes),)).fetchall()
            else:
                sql = SQLITE_LOOKUP_SQL.format(", ".join("?" * len(hashes)))
                rows = conn.execute(sql, hashes).fetchall()
            found = {h: m for h, m in rows}
            assert len(found) <= len(hashes)
            latencies.append(time.perf_counter() - sent)
            i += 1
        return latencies, time.perf_counter() - start
    finally:
        conn.close()


async def _rollback_if_in_transaction(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _postgres_limit(
    url: str, hash_lists: list[list[str]], c: int, pool_size: int, duration: float, cap: int
) -> tuple[list[float], float]:
    """``c`` workers sharing a pool of ``pool_size`` connections, like our server's pool."""
    latencies: list[float] = []
    # Released connections skip asyncpg's reset round trip, as in our server's pool.
    pool = await asyncpg.create_pool(
        url, min_size=pool_size, max_size=pool_size, reset=_rollback_if_in_transaction
    )
    try:
        counter = 0
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline and counter < cap:
                hashes = hash_lists[counter % len(hash_lists)]
                counter += 1
                sent = time.perf_counter()
                async with pool.acquire() as conn:
                    rows = await conn.fetch(POSTGRES_LOOKUP_SQL, hashes)
                found = {r["lookup_hash"]: r["mxid"] for r in rows}
                assert len(found) <= len(hashes)
                latencies.append(time.perf_counter() - sent)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(c))), timeout=duration + 60)
        return latencies, time.perf_counter() - start
    finally:
        await pool.close()


async def measure_limit(server: OurServer, settings: Settings, results: Results, rep: int) -> None:
    """The limit rows for one of our databases."""
    dataset = server.dataset
    for batch in LOOKUP_BATCHES:
        hash_lists = lookup_batches(dataset.n, batch, settings.pool_sizes[batch], dataset.pepper)
        if dataset.backend == "sqlite":
            # One connection, one query at a time: the same for every client concurrency.
            for join, label in ((False, "limit"), (True, "limit join")):
                latencies, elapsed = await asyncio.to_thread(
                    _sqlite_limit,
                    server.sqlite_path,
                    hash_lists,
                    settings.duration,
                    settings.max_requests,
                    join,
                )
                results.rows.append(
                    _limit_record(dataset, batch, 1, rep, latencies, elapsed, label)
                )
        else:
            for c in settings.concurrency:
                latencies, elapsed = await _postgres_limit(
                    server.database_url,
                    hash_lists,
                    c,
                    min(c, settings.max_connections),
                    settings.duration,
                    settings.max_requests,
                )
                results.rows.append(_limit_record(dataset, batch, c, rep, latencies, elapsed))
        log(f"  limit {dataset.backend} lookup {batch}: done")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None and v == v]
    return statistics.median(present) if present else None


def aggregate(
    records: list[dict[str, Any]], keys: Sequence[str]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Median of every numeric field over the repetitions of each key; errors are summed."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[tuple(record[k] for k in keys)].append(record)
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, group in groups.items():
        merged: dict[str, Any] = dict(zip(keys, key, strict=True))
        for name in group[0]:
            if name in keys or name == "rep":
                continue
            values = [r[name] for r in group]
            if name in ("errors", "ok", "restarts"):
                merged[name] = sum(v for v in values if v is not None)
            elif name == "delivered":
                merged[name] = None if values[0] is None else sum(values)
            elif name == "error_summary":
                merged[name] = "; ".join(v for v in values if v)
            else:
                merged[name] = _median(values)
        merged["reps"] = len(group)
        out[key] = merged
    return out


def _num(value: Any, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _size(n: int) -> str:
    return f"{n:,}"


def _server_order(server: str) -> int:
    return {"ours": 0, "limit": 2, "limit join": 3}.get(server, 1)


def render(results: Results, settings: Settings, started: datetime, elapsed: float) -> str:
    """The markdown report."""
    rows = aggregate(results.rows, ("n", "backend", "server", "workload", "c"))
    procs = aggregate(results.processes, ("n", "backend", "server"))
    workload_order = [f"lookup {b}" for b in LOOKUP_BATCHES] + ["hash_details", *MAIL_WORKLOADS]
    sydent = {k: v for k, v in rows.items() if k[2].startswith("sydent")}

    def limit_of(n: int, backend: str, workload: str, c: int) -> dict[str, Any] | None:
        if backend == "sqlite":
            return rows.get((n, backend, "limit", workload, 1))
        return rows.get((n, backend, "limit", workload, c))

    def sydent_of(n: int, workload: str, c: int) -> dict[str, Any] | None:
        return next(
            (v for k, v in sydent.items() if k[0] == n and k[3] == workload and k[4] == c), None
        )

    out = [
        "# Benchmark (issue 6)",
        "",
        _header(settings, started, elapsed),
        "",
        "## Requests",
        "",
        "Medians over the repetitions. *c*: concurrent connections. *srv CPU*: user+sys seconds of "
        "the server process over the row (PostgreSQL's own backends in *DB CPU*). *mails*: "
        "delivered to the SMTP sink / successful requests. *sink CPU ms/mail*: user+sys CPU of "
        f"the SMTP sink process ({settings.sink} sink) over the row per delivered mail; it stands "
        "in for the MTA and shares the servers' cores. *vs limit*: our addresses/s as a "
        "fraction of the same lookups issued straight to the database (SQLite: one connection, "
        "sequential, like our server's; *limit join* rows: the `json_each` join our server "
        "runs on SQLite, issued the same way). *vs sydent*: our requests/s divided by sydent's.",
        "",
        "| N | DB | server | request | c | req/s | addresses/s | p50 ms | p99 ms | srv CPU s "
        "| CPU ms/req | DB CPU s | client CPU % | errors | mails | sink CPU ms/mail | vs limit "
        "| vs sydent |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(
        rows.values(),
        key=lambda r: (
            r["n"],
            0 if r["server"].startswith("sydent") else 1,
            r["backend"],
            workload_order.index(r["workload"]),
            r["c"],
            _server_order(r["server"]),
        ),
    )
    for r in ordered:
        vs_limit = vs_sydent = ""
        if r["server"] == "ours" and r["workload"].startswith("lookup"):
            limit = limit_of(r["n"], r["backend"], r["workload"], r["c"])
            if limit and limit["addr_s"]:
                vs_limit = f"{100 * r['addr_s'] / limit['addr_s']:.0f} %"
        if r["server"] == "ours":
            other = sydent_of(r["n"], r["workload"], r["c"])
            if other and other["req_s"]:
                vs_sydent = f"{r['req_s'] / other['req_s']:,.1f}x"
            elif other:
                vs_sydent = "∞"
        mails = "" if r["delivered"] is None else f"{r['delivered']}/{r['ok']}"
        db = "sqlite" if r["server"].startswith("sydent") else r["backend"]
        cells = [
            _size(r["n"]),
            db,
            r["server"],
            r["workload"],
            str(r["c"]),
            _num(r["req_s"]),
            _num(r["addr_s"]) if r["workload"].startswith("lookup") else "",
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            _num(r["cpu_s"], 2),
            _num(r["cpu_ms_req"], 3),
            _num(r["db_cpu_s"], 2),
            _num(r["client_cpu_pct"], 0),
            str(r["errors"] or ""),
            mails,
            "" if r["delivered"] is None else _num(r["sink_cpu_ms_mail"], 3),
            vs_limit,
            vs_sydent,
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "## Processes",
        "",
        "Start-up: from spawning the process to the first `200` on `GET /_matrix/identity/v2`. "
        "Idle RSS: 1 s after start-up, before any load. Peak RSS: VmHWM at the end.",
        "",
        "| N | DB | server | start-up s | idle RSS MiB | peak RSS MiB | restarts |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for p in sorted(procs.values(), key=lambda p: (p["n"], p["backend"], p["server"])):
        out.append(
            f"| {_size(p['n'])} | {p['backend']} | {p['server']} | {_num(p['startup_s'], 2)} "
            f"| {_num(p['idle_rss_mib'])} | {_num(p['peak_rss_mib'])} | {p['restarts'] or ''} |"
        )
    out += ["", "## Targets of issue 6", "", *_targets(rows, procs, settings), ""]
    if results.problems:
        out += ["## Problems seen", ""]
        out += [f"- {p}" for p in results.problems]
        out.append("")
    return "\n".join(out)


def _targets(
    rows: dict[tuple[Any, ...], dict[str, Any]],
    procs: dict[tuple[Any, ...], dict[str, Any]],
    settings: Settings,
) -> list[str]:
    """One line per target of the issue that this run can judge."""
    lines: list[str] = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    big, small = max(settings.sizes), min(settings.sizes)
    for backend in settings.backends:
        single1 = rows.get((big, backend, "ours", "lookup 1", 1))
        if single1 and 1 in settings.concurrency:
            lines.append(
                f"- {backend}, N={_size(big)}: single-hash p50 at c=1 "
                f"{_num(single1['p50_ms'], 2)} ms (< 2 ms): {verdict(single1['p50_ms'] < 2)}"
            )
        single32 = rows.get((big, backend, "ours", "lookup 1", max(settings.concurrency)))
        if single32:
            lines.append(
                f"- {backend}, N={_size(big)}: single-hash at c={max(settings.concurrency)} "
                f"{_num(single32['req_s'])} req/s (≥ 2,000): {verdict(single32['req_s'] >= 2000)}"
            )
        if big != small:
            for c in settings.concurrency:
                a = rows.get((big, backend, "ours", "lookup 1", c))
                b = rows.get((small, backend, "ours", "lookup 1", c))
                if a and b and b["req_s"]:
                    ratio = a["req_s"] / b["req_s"]
                    lines.append(
                        f"- {backend}, single-hash c={c}: N={_size(big)} runs at "
                        f"{100 * ratio:.0f} % of N={_size(small)} (≥ 80 %): {verdict(ratio >= 0.8)}"
                    )
        for n in settings.sizes:
            for c in settings.concurrency:
                ours = rows.get((n, backend, "ours", "lookup 1000", c))
                limit = rows.get(
                    (n, backend, "limit", "lookup 1000", 1 if backend == "sqlite" else c)
                )
                if ours and limit and limit["addr_s"]:
                    ratio = ours["addr_s"] / limit["addr_s"]
                    join = rows.get((n, backend, "limit join", "lookup 1000", 1))
                    also = (
                        f" ({100 * ours['addr_s'] / join['addr_s']:.0f} % of our own json_each "
                        "join issued straight, not a target)"
                        if join and join["addr_s"]
                        else ""
                    )
                    lines.append(
                        f"- {backend}, N={_size(n)}, 1,000-hash lookups c={c}: {100 * ratio:.0f} % "
                        f"of the database limit (≥ 50 %): {verdict(ratio >= 0.5)}{also}"
                    )
        for n in settings.sizes:
            for workload in MAIL_WORKLOADS:
                for c in settings.concurrency:
                    ours = rows.get((n, backend, "ours", workload, c))
                    other = next(
                        (
                            v
                            for k, v in rows.items()
                            if k[0] == n
                            and k[2].startswith("sydent")
                            and k[3] == workload
                            and k[4] == c
                        ),
                        None,
                    )
                    if ours and other and other["req_s"]:
                        ratio = ours["req_s"] / other["req_s"]
                        lost = ours["delivered"] is not None and ours["delivered"] < ours["ok"]
                        lines.append(
                            f"- {backend}, N={_size(n)}, {workload} c={c}: {ratio:.1f}x sydent "
                            f"(>= 10x), mails {ours['delivered']}/{ours['ok']}: "
                            f"{verdict(ratio >= 10 and not lost)}"
                        )
        for n in settings.sizes:
            ours_p = procs.get((n, backend, "ours"))
            if not ours_p:
                continue
            lines.append(
                f"- {backend}, N={_size(n)}: start-up {_num(ours_p['startup_s'], 2)} s (< 1 s): "
                f"{verdict(ours_p['startup_s'] < 1)}"
            )
            syd = next(
                (v for k, v in procs.items() if k[0] == n and k[2].startswith("sydent")), None
            )
            if syd:
                lines.append(
                    f"- {backend}, N={_size(n)}: idle RSS {_num(ours_p['idle_rss_mib'])} MiB vs "
                    f"sydent's {_num(syd['idle_rss_mib'])} MiB (no higher): "
                    f"{verdict(ours_p['idle_rss_mib'] <= syd['idle_rss_mib'])}"
                )
    return lines or ["- (nothing this run can judge)"]


def _header(settings: Settings, started: datetime, elapsed: float) -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    mode = " (--quick)" if settings.quick else ""
    return (
        f"Run{mode} {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min, on "
        f"{os.cpu_count()} cores ({cpu}); "
        f"commit {commit}{' + local changes' if dirty else ''}. Sizes N = "
        f"{', '.join(_size(n) for n in settings.sizes)}; databases: {', '.join(settings.backends)}"
        f"{'; sydent 2.6.1 on SQLite, interleaved' if settings.with_sydent else ''}. "
        f"Each row: {settings.duration:g} s or {settings.max_requests:,} requests, after a short "
        f"unmeasured warm-up; {settings.repetitions} repetition(s). SMTP sink: {settings.sink} "
        "(bench/smtp_sink.py, its own process). Load generator: this process "
        "(aiohttp, one session, connector limit = c), servers in their own processes, all on "
        "127.0.0.1; the machine is shared, so numbers are noisy."
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


async def run(settings: Settings) -> str:
    """Prepare the datasets, measure everything, return the report."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    venv = settings.cache_dir / "sydent-venv"
    results = Results()
    tag = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    sink = await SinkProcess.start(settings.sink)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=settings.cache_dir))
    try:
        for n in settings.sizes:
            ours = []
            for backend in settings.backends:
                dataset = await prepare_ours(backend, n, settings.cache_dir, settings.postgres)
                ours.append(
                    OurServer(
                        dataset, run_dir, settings.postgres, sink.port, settings.max_connections
                    )
                )
            sydent = None
            if settings.with_sydent:
                sydent_data = await prepare_sydent(n, settings.cache_dir, venv)
                sydent = SydentServer(sydent_data, run_dir, venv, sink.port)
            servers: list[OurServer | SydentServer] = [*ours, *([sydent] if sydent else [])]
            try:
                for server in servers:
                    await server.create_database()
                for rep in range(settings.repetitions):
                    # Interleaved: ours (first backend), sydent, ours (next backend), ...
                    order: list[OurServer | SydentServer] = [
                        *ours[:1],
                        *([sydent] if sydent else []),
                        *ours[1:],
                    ]
                    for server in order:
                        pg = (
                            PgBackends(settings.postgres, server.database_name)
                            if isinstance(server, OurServer)
                            and server.dataset.backend == "postgres"
                            else None
                        )
                        await Session(
                            server,
                            settings,
                            sink,
                            results,
                            rep,
                            f"{tag}{rep}{order.index(server)}n{n}y",
                            pg,
                        ).run()
                    if settings.limit and "lookup" in settings.workloads:
                        for server in ours:
                            await measure_limit(server, settings, results, rep)
            finally:
                for server in servers:
                    await server.drop_database(keep_files=settings.keep)
    finally:
        await sink.stop()
        if settings.keep:
            log(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return render(results, settings, started_at, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    settings = settings_from(build_parser().parse_args(argv))
    report = asyncio.run(run(settings))
    print(report)
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(report + "\n")
    log(f"report written to {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
