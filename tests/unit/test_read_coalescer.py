"""ReadCoalescer: concurrent reads merged into one fetch per event-loop turn."""

from __future__ import annotations

import asyncio

import pytest

from appservice.db.coalesce import MAX_MERGED_REQUEST, ReadCoalescer

TABLE = {f"k{i}": f"v{i}" for i in range(10)}


class RecordingFetch:
    """A fetch over TABLE that records the key lists it was called with."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    async def __call__(self, keys: list[str]) -> dict[str, str]:
        self.calls.append(keys)
        await asyncio.sleep(0.01)
        if self.fail:
            raise ConnectionError("database gone")
        return {k: TABLE[k] for k in keys if k in TABLE}


async def test_concurrent_reads_are_one_fetch_and_each_gets_its_own_keys() -> None:
    fetch = RecordingFetch()
    reads = ReadCoalescer(fetch)
    asked = [["k1"], ["k2", "nope"], ["k1", "k3"], ["missing"]]
    answers = await asyncio.gather(*(reads.read(keys) for keys in asked))
    assert answers == [{"k1": "v1"}, {"k2": "v2"}, {"k1": "v1", "k3": "v3"}, {}]
    assert fetch.calls == [["k1", "k2", "nope", "k3", "missing"]]


async def test_reads_during_a_fetch_form_the_next_batch() -> None:
    fetch = RecordingFetch()
    reads = ReadCoalescer(fetch)
    first = asyncio.ensure_future(reads.read(["k1"]))
    await asyncio.sleep(0.001)  # the first fetch is under way
    second = await asyncio.gather(reads.read(["k2"]), reads.read(["k4"]))
    assert await first == {"k1": "v1"}
    assert second == [{"k2": "v2"}, {"k4": "v4"}]
    assert fetch.calls == [["k1"], ["k2", "k4"]]


async def test_a_long_request_is_read_on_its_own() -> None:
    fetch = RecordingFetch()
    reads = ReadCoalescer(fetch)
    long = [f"k{i % 10}" for i in range(MAX_MERGED_REQUEST + 1)]
    answers = await asyncio.gather(reads.read(long), reads.read(["k5"]))
    assert answers == [TABLE, {"k5": "v5"}]
    assert sorted(map(len, fetch.calls)) == [1, MAX_MERGED_REQUEST + 1]


async def test_a_failed_fetch_fails_every_read_of_its_batch() -> None:
    reads = ReadCoalescer(RecordingFetch(fail=True))
    results = await asyncio.gather(reads.read(["k1"]), reads.read(["k2"]), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]


async def test_a_cancelled_reader_does_not_disturb_the_others() -> None:
    fetch = RecordingFetch()
    reads = ReadCoalescer(fetch)
    cancelled = asyncio.ensure_future(reads.read(["k1"]))
    kept = asyncio.ensure_future(reads.read(["k2"]))
    await asyncio.sleep(0.001)
    cancelled.cancel()
    assert await kept == {"k2": "v2"}
    with pytest.raises(asyncio.CancelledError):
        await cancelled
