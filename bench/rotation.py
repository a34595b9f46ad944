"""Lookup latency while the pepper is rotated (issue 20).

For each backend: our server runs on a copy of the cached dataset of N bindings (see
``targets.py``); lookups of 100 hashes (90 bound, 10 not) run back to back from ``--concurrency``
clients, first for ``--before`` seconds, then while ``python -m appservice pepper rotate`` runs in
its own process (as an operator would start it) and until the server advertises the new pepper.
Every answer is checked: a wrong or missing mapping or a status other than 200 is counted.

    .venv/bin/python bench/rotation.py                          # SQLite and PostgreSQL, N=1,000,000
    .venv/bin/python bench/rotation.py --backends sqlite --size 10000 --before 2   # smoke run

Prints a markdown table (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import (
    REPO,
    OurServer,
    _clean_env,
    address,
    hash_of,
    mxid,
    prepare_ours,
    stop_process,
)

LOOKUP = "/_matrix/identity/v2/lookup"
HASH_DETAILS = "/_matrix/identity/v2/hash_details"
DEFAULT_POSTGRES = os.environ.get(
    "APPSERVICE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres"
)


@dataclass
class Phase:
    """Lookups of one phase."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    wrong: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000 if ordered else 0.0


@dataclass
class Outcome:
    """One backend's run."""

    backend: str
    n: int
    before: Phase
    during: Phase
    rotation_s: float
    rehash_s: float
    rows: int
    switch_seen_s: float


async def _lookups(
    session: aiohttp.ClientSession,
    base_url: str,
    token: str,
    n: int,
    pepper: list[str],
    phase: list[Phase],
    stop: asyncio.Event,
    seed: int,
) -> None:
    """Back-to-back lookups into ``phase[0]`` (swapped by the caller) until ``stop``."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    while not stop.is_set():
        used = pepper[0]
        picked = [rng.randrange(n) for _ in range(90)]
        expected = {hash_of(address(i), used): mxid(i) for i in picked}
        misses = [
            hash_of(f"nobody{rng.getrandbits(64):x}@nowhere.invalid", used) for _ in range(10)
        ]
        body = {"algorithm": "sha256", "pepper": used, "addresses": [*expected, *misses]}
        current = phase[0]
        started = time.perf_counter()
        async with session.post(base_url + LOOKUP, json=body, headers=headers) as response:
            answer = await response.json()
            took = time.perf_counter() - started
        if response.status == 400 and answer.get("errcode") == "M_INVALID_PEPPER":
            pepper[0] = answer["lookup_pepper"]  # as a client does: retry with the new one
            continue
        current.latencies.append(took)
        if response.status != 200:
            current.failures += 1
        elif answer["mappings"] != expected:
            current.wrong += 1


async def _pepper_of(session: aiohttp.ClientSession, base_url: str, token: str) -> str:
    async with session.get(
        base_url + HASH_DETAILS, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return str((await response.json())["lookup_pepper"])


async def run_backend(backend: str, args: argparse.Namespace, run_dir: Path) -> Outcome:
    dataset = await prepare_ours(backend, args.size, args.cache_dir, args.postgres)
    server = OurServer(dataset, run_dir, args.postgres, 25, 10)
    await server.create_database()
    running = await server.start()
    try:
        config = server.directory / "config.yaml"
        async with aiohttp.ClientSession() as session:
            first = await _pepper_of(session, running.base_url, dataset.token)
            pepper = [first]
            before, during = Phase(), Phase()
            phase = [before]
            stop = asyncio.Event()
            clients = [
                asyncio.create_task(
                    _lookups(
                        session,
                        running.base_url,
                        dataset.token,
                        args.size,
                        pepper,
                        phase,
                        stop,
                        seed,
                    )
                )
                for seed in range(args.concurrency)
            ]
            await asyncio.sleep(args.before)
            phase[0] = during
            started = time.perf_counter()
            rotate = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "appservice",
                "pepper",
                "rotate",
                "-c",
                str(config),
                cwd=REPO,
                env=_clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            output, _ = await rotate.communicate()
            rotation_s = time.perf_counter() - started
            text = output.decode(errors="replace")
            if rotate.returncode != 0:
                raise RuntimeError(f"pepper rotate failed:\n{text}")
            phase[0] = Phase()  # after the command: not counted
            reported = re.search(r"(\d+) rows rehashed in ([\d.]+) s", text)
            if reported is None:
                raise RuntimeError(f"pepper rotate said:\n{text}")
            rows, rehash_s = int(reported.group(1)), float(reported.group(2))
            finished = time.perf_counter()
            switch_seen_s = 0.0
            while await _pepper_of(session, running.base_url, dataset.token) == first:
                await asyncio.sleep(0.01)
                switch_seen_s = time.perf_counter() - finished
            stop.set()
            await asyncio.gather(*clients)
    finally:
        await asyncio.to_thread(stop_process, running.process)
        await server.drop_database(keep_files=False)
    return Outcome(backend, args.size, before, during, rotation_s, rehash_s, rows, switch_seen_s)


def render(outcomes: Sequence[Outcome], args: argparse.Namespace) -> str:
    lines = [
        "# Pepper rotation under lookup load "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{os.cpu_count()} cores; {args.concurrency} clients, each sending lookups of 100 hashes "
        "(90 bound, 10 not) back to back; `pepper rotate` in its own process; the server, the "
        "command, the database and the clients share the machine.",
        "",
        "`command` is the wall time of `pepper rotate` (start-up included), `rehash` what it "
        "reports (new pepper, every row rehashed, switch); `seen after` is how long after the "
        "command ended the server still advertised the old pepper.",
        "",
        "| backend | bindings | command (s) | rehash (s) | rows | phase | lookups | p50 (ms) | "
        "p99 (ms) | max (ms) | non-200 | wrong or missing | seen after (s) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        for name, phase in (("before", o.before), ("during", o.during)):
            lines.append(
                f"| {o.backend} | {o.n:,} | {o.rotation_s:.1f} | {o.rehash_s:.1f} | {o.rows:,} | "
                f"{name} | "
                f"{len(phase.latencies):,} | {phase.percentile(0.5):.1f} | "
                f"{phase.percentile(0.99):.1f} | {phase.percentile(1.0):.1f} | {phase.failures} | "
                f"{phase.wrong} | {o.switch_seen_s:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--size", type=int, default=1_000_000, help="bindings (default 1M)")
    parser.add_argument("--concurrency", type=int, default=4, help="lookup clients (default 4)")
    parser.add_argument(
        "--before", type=float, default=5.0, help="seconds of lookups before the rotation"
    )
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="maintenance database URL")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--output", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    async def run_all() -> list[Outcome]:
        with tempfile.TemporaryDirectory(prefix="bench-rotation-") as run_dir:
            return [
                await run_backend(backend, args, Path(run_dir))
                for backend in args.backends.split(",")
            ]

    report = render(asyncio.run(run_all()), args)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
