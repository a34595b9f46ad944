#!/usr/bin/env python3
"""Summarise py-spy ``--format raw`` profiles (as ``bench/run.py --profile DIR`` writes them).

``python bench/profile_summary.py DIR/*.txt [--top 15]`` prints, for each file, the functions
with the largest share of samples: inclusive (the function or anything it called was running)
and self (the function itself was on top of the stack). Frames are named ``function (file)``,
with site-packages and the standard library shortened.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# Leaves where a thread waits rather than works (py-spy --nonblocking cannot always tell): the
# event loop's epoll, aiosqlite's worker blocked on its SimpleQueue (a C call, so the wait is
# attributed to the worker function itself).
IDLE_LEAVES = frozenset(
    {"EpollSelector.select (selectors.py)", "_connection_worker_thread (aiosqlite/core.py)"}
)
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def frame_name(frame: str) -> str:
    """``function (short/file.py)`` without the line number."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['function']} ({_short(match['file'])})"


def summarise(path: Path, top: int, busy_only: bool = False) -> str:
    """The report for one profile file (``busy_only``: without samples of waiting threads)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if busy_only and frames and frames[-1] in IDLE_LEAVES:
            continue
        # py-spy puts the thread name first; the innermost frame is last.
        total += count
        for name in set(frames[1:]):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    if not total:
        return f"## {path.name}\n\n(no samples)\n"
    lines = [f"## {path.name}: {total} samples", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path, help="py-spy raw files")
    parser.add_argument("--top", type=int, default=15, help="functions listed (default 15)")
    parser.add_argument(
        "--busy",
        action="store_true",
        help="leave out samples of threads waiting (epoll, aiosqlite's idle worker)",
    )
    args = parser.parse_args(argv)
    for path in args.files:
        print(summarise(path, args.top, args.busy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
