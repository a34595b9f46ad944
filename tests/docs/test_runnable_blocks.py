"""The documentation runs: every shell block of README.md and docs/*.md marked
```` ```sh runnable ```` is executed, and every relative link points to a file (and heading) that
exists.

Convention (also in docs/development.md, "Tested documentation"):

- A fenced block whose info string is ``sh runnable`` (or ``bash runnable``) is run by this test.
  GitHub highlights it as ``sh`` (it reads only the first word).
- The marked blocks of one page run in order, each with ``bash -euo pipefail``, in one fresh empty
  directory per page, as if typed in one terminal: the variables a block exports are there for the
  next blocks. ``.venv/bin`` comes first on ``PATH`` (so ``matrix-identity-appservice`` is the
  checkout's), ``PORT`` is a free port for a server a block starts, and no ``APPSERVICE_*``
  variable of the caller leaks in. Each block must exit 0 within ``BLOCK_TIMEOUT_S``; whatever a
  page's blocks left running is killed at the end of the page.
- A shell block (``sh``, ``bash``, ``shell``, ``console``) that is not marked must be listed in
  ``UNMARKED`` by its page and first line, with the reason it cannot run here (systemctl, podman,
  nginx, /etc paths, a whole test suite); a new unmarked block fails the test until it is marked or
  listed. A page with shell blocks has at least one marked block unless it is in ``NO_RUNNABLE``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
BLOCK_TIMEOUT_S = 60.0
SHELLS = {"sh", "bash", "shell", "console", "zsh"}
MARKER = "runnable"

# Unmarked shell blocks, by page and the start of their first line: why each cannot run here.
UNMARKED: dict[tuple[str, str], str] = {
    ("README.md", "scripts/serve.sh"): "serves until stopped; docs/admin-cli.md runs `run`",
    ("README.md", "scripts/test.sh"): "the whole suite, which runs this test",
    ("README.md", "matrix-identity-appservice generate-config -c /etc/"): (
        "/etc paths and a server that does not stop; runnable in docs/admin-cli.md"
    ),
    ("docs/admin-cli.md", "matrix-identity-appservice generate-registration -c /etc/"): (
        "/etc paths on the Synapse host; the runnable form is just above it"
    ),
    ("docs/admin-cli.md", "matrix-identity-appservice invites show 5f0c2a"): (
        "needs an invite, which needs a homeserver's store-invite"
    ),
    ("docs/benchmarks.md", ".venv/bin/python bench/run.py --quick"): (
        "the smoke run is tests/bench; the full comparison takes many minutes"
    ),
    ("docs/benchmarks.md", ".venv/bin/python bench/import.py"): (
        "a million rows take minutes; tests/bench/test_import_bench.py runs a small one"
    ),
    ("docs/operator-guide.md", "python -m build"): (
        "tests/wheel_install builds the wheel and installs it in a fresh venv"
    ),
    ("docs/operator-guide.md", "sudo contrib/install.sh"): (
        "root and Debian packages: tests/service/test_install_chroot.py"
    ),
    ("docs/operator-guide.md", "sudo cp contrib/systemd/"): (
        "systemctl: tests/service/test_systemd_unit.py checks the unit"
    ),
    ("docs/operator-guide.md", "sudo -u matrix-identity-appservice"): (
        "/etc and /opt paths of an installed service"
    ),
    ("docs/operator-guide.md", "podman build"): (
        "podman: tests/service/test_container.py builds and runs the image"
    ),
    (
        "docs/operator-guide.md",
        "matrix-identity-appservice generate-registration -c config.yaml -r /etc/",
    ): ("/etc path on the Synapse host; the runnable walk-through follows the steps"),
    ("docs/operator-guide.md", "APPSERVICE_DATABASE_URL=postgres://identity:secret@db.internal/"): (
        "a PostgreSQL server on another host; tests/db runs instances on PostgreSQL"
    ),
    ("docs/upgrades-and-backups.md", "sudo contrib/install.sh path/to/"): (
        "root, systemctl: an installed service"
    ),
    ("docs/upgrades-and-backups.md", "pg_dump"): (
        "the deployment's PostgreSQL; the SQLite backup is run"
    ),
    ("docs/upgrades-and-backups.md", "sudo systemctl stop"): (
        "systemctl and the paths of an installed service; the restore above it is run"
    ),
}

# Pages with shell blocks but none that can run here.
NO_RUNNABLE: dict[str, str] = {
    "README.md": "its commands serve or run the whole suite; each page under docs/ runs its own",
    "docs/benchmarks.md": "bench/run.py runs from the checkout; tests/bench runs the smoke run",
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    info: str
    text: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runnable(self) -> bool:
        return self.language in SHELLS and MARKER in self.info.split()[1:]

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")


FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def fenced_blocks(page: Path, root: Path = ROOT) -> Iterator[Block]:
    """The fenced code blocks of a Markdown page (CommonMark fences, also indented in lists),
    named by the page's path under ``root``."""
    name = page.relative_to(root).as_posix()
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        yield Block(name, i + 1, opening["info"].strip(), "\n".join(body) + "\n")
        i = j + 1


def shell_blocks() -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page) if block.language in SHELLS]


def _listed(block: Block) -> list[tuple[str, str]]:
    return [
        (page, start)
        for page, start in UNMARKED
        if page == block.page and block.first_line.startswith(start)
    ]


def test_unmarked_shell_blocks_are_listed() -> None:
    """Every shell block is marked runnable or listed in UNMARKED with a reason; none is stale."""
    unmarked = [b for b in shell_blocks() if not b.runnable]
    new = [f"{b.page}:{b.line}: {b.first_line!r}" for b in unmarked if not _listed(b)]
    assert not new, (
        "shell blocks neither marked ```sh runnable nor listed in UNMARKED (mark them, or list "
        "them with the reason they cannot run here):\n" + "\n".join(new)
    )
    used = {entry for b in unmarked for entry in _listed(b)}
    stale = [f"{page}: {start!r}" for page, start in UNMARKED if (page, start) not in used]
    assert not stale, "UNMARKED lists blocks that no longer exist:\n" + "\n".join(stale)


def test_pages_with_commands_have_runnable_blocks() -> None:
    pages: dict[str, bool] = {}
    for block in shell_blocks():
        pages[block.page] = pages.get(block.page, False) or block.runnable
    missing = [page for page, any_runnable in pages.items() if not any_runnable]
    assert sorted(missing) == sorted(p for p in NO_RUNNABLE if p in pages), (
        f"pages with shell blocks but none marked runnable: {missing}"
    )


def _runnable_pages() -> list[str]:
    return sorted({b.page for b in shell_blocks() if b.runnable})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("APPSERVICE_")
        and name not in ("PYTHONPATH", "VIRTUAL_ENV", "PORT", "AS_PORT")
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PORT"] = str(_free_port())
    env["AS_PORT"] = str(_free_port())
    return env


# Before each block: the variables earlier blocks of the page exported; after it (also when it
# fails): save them for the next block.
PROLOGUE = """\
if [ -f "$DOCS_STATE" ]; then . "$DOCS_STATE"; fi
trap 'export -p | grep -Ev "^declare -x (DOCS_STATE|OLDPWD|PWD|SHLVL|_)=" > "$DOCS_STATE"' EXIT
"""


@pytest.mark.parametrize("page", _runnable_pages())
def test_runnable_blocks(page: str, tmp_path: Path) -> None:
    """The page's marked blocks, in order, in one empty directory: each exits 0."""
    assert (VENV_BIN / "matrix-identity-appservice").exists(), "scripts/bootstrap.sh makes .venv"
    blocks = [b for b in shell_blocks() if b.page == page and b.runnable]
    work = tmp_path / "work"
    work.mkdir()
    env = _environment()
    env["DOCS_STATE"] = str(tmp_path / "state.sh")
    groups: list[int] = []
    try:
        for number, block in enumerate(blocks):
            script = tmp_path / f"block{number}.sh"
            script.write_text(PROLOGUE + block.text, encoding="utf-8")
            output = tmp_path / f"block{number}.out"
            with output.open("wb") as out:
                # Output to a file, not a pipe: a server a block leaves running keeps its copy.
                process = subprocess.Popen(
                    ["bash", "-euo", "pipefail", str(script)],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                groups.append(process.pid)
                started = time.monotonic()
                try:
                    status = process.wait(timeout=BLOCK_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    status = None
            elapsed = time.monotonic() - started
            if status != 0:
                text = output.read_text(encoding="utf-8", errors="replace")
                what = "timed out" if status is None else f"exited with status {status}"
                pytest.fail(
                    f"{page}:{block.line}: the block {what} after {elapsed:.1f}s "
                    f"(PORT={env['PORT']}, run in {work}):\n"
                    f"{block.text}\n--- output ---\n{text[-6000:]}",
                    pytrace=False,
                )
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


# Links: [text](target) outside code; GitHub's heading anchors.
LINK = re.compile(r"\]\((?P<target>[^()\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")


def _prose_lines(page: Path, *, code_spans: bool = False) -> Iterator[tuple[int, str]]:
    """The page's lines outside fenced blocks; inline code removed unless ``code_spans``."""
    fenced: set[int] = set()
    for block in fenced_blocks(page, page.parent):
        # The opening line, the body and the closing line.
        fenced.update(range(block.line, block.line + block.text.count("\n") + 2))
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if number not in fenced:
            yield number, line if code_spans else CODE_SPAN.sub("", line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _prose_lines(page, code_spans=True):
        match = HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match["text"])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_github_slug() -> None:
    assert github_slug("3PID invites: the lifecycle") == "3pid-invites-the-lifecycle"
    assert github_slug("The `synapse` store") == "the-synapse-store"
    assert github_slug("Phone numbers (msisdn delegate)") == "phone-numbers-msisdn-delegate"
    assert github_slug("Email (SMTP)") == "email-smtp"


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page: str) -> None:
    """Every relative link names an existing file, and a heading of it when it has an anchor."""
    path = ROOT / page
    broken: list[str] = []
    for number, line in _prose_lines(path):
        for match in LINK.finditer(line):
            target = match["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{page}:{number}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page}:{number}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_maps_every_page() -> None:
    """The README's map links every page under docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {m["target"].partition("#")[0] for m in LINK.finditer(readme)}
    missing = [
        p.relative_to(ROOT).as_posix()
        for p in sorted((ROOT / "docs").glob("*.md"))
        if p.relative_to(ROOT).as_posix() not in linked
    ]
    assert not missing, f"README.md does not link {missing}"


def test_fenced_blocks_parser(tmp_path: Path) -> None:
    """Fences as CommonMark reads them: in list items, longer fences around shorter ones, tildes."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```sh runnable\n"
        "echo one\n"
        "```\n"
        "1. item\n"
        "   ```sh\n"
        "   echo two\n"
        "   ```\n"
        "````markdown\n"
        "```sh runnable\n"
        "echo not a block of its own\n"
        "```\n"
        "````\n"
        "~~~bash runnable\n"
        "echo three\n"
        "~~~\n",
        encoding="utf-8",
    )
    blocks = list(fenced_blocks(page, tmp_path))
    assert [(b.line, b.info, b.text, b.runnable) for b in blocks] == [
        (2, "sh runnable", "echo one\n", True),
        (6, "sh", "echo two\n", False),
        (9, "markdown", "```sh runnable\necho not a block of its own\n```\n", False),
        (14, "bash runnable", "echo three\n", True),
    ]
    assert [n for n, _ in _prose_lines(page)] == [1, 5]
