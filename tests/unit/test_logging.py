"""Logging: text and JSON lines, request ids, per-logger levels, an operator's dictConfig file,
the redacting access log in both formats, and what a shutdown reports."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appservice.api.http import RedactingAccessLogger, RequestTracker, matrix_middleware
from appservice.app import IdentityServer
from appservice.cli import main
from appservice.config import ConfigError, LoggingConfig, load_config_text
from appservice.logs import (
    REQUEST_ID,
    JsonFormatter,
    TextFormatter,
    install_record_factory,
    setup_logging,
)
from tests.api.test_invites import stop_background_jobs
from tests.jobs.test_onbind_delivery import queued_onbind
from tests.support.api_server import Api

TRIED_LOGGERS = ("appservice.federation", "aiohttp.access", "test.logging")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back what setup_logging changes: the root logger's handlers and level, and levels."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in TRIED_LOGGERS}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, logger_level in levels.items():
            logging.getLogger(name).setLevel(logger_level)


def _record(message: str = "hello %s", *args: Any, **kwargs: Any) -> logging.LogRecord:
    install_record_factory()
    return logging.getLogger("test.logging").makeRecord(
        "test.logging", logging.WARNING, __file__, 1, message, args or ("world",), None, **kwargs
    )


def test_json_line_has_time_level_logger_message_and_request_id() -> None:
    token = REQUEST_ID.set("abc123")
    try:
        record = _record()
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry.pop("time").endswith("Z")
    assert entry == {
        "level": "WARNING",
        "logger": "test.logging",
        "message": "hello world",
        "request_id": "abc123",
    }


def test_json_line_has_extra_fields_and_the_exception_in_one_field() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record(extra={"route": "/x/{id}", "status": 500})
    record.exc_info = exc_info
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "request_id" not in entry  # logged outside a request
    assert (entry["route"], entry["status"]) == ("/x/{id}", 500)
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: bad\nvalue")


def test_text_line_shows_the_request_id_only_during_a_request() -> None:
    formatter = TextFormatter()
    assert " test.logging: hello world" in formatter.format(_record())
    token = REQUEST_ID.set("abc123")
    try:
        line = formatter.format(_record())
    finally:
        REQUEST_ID.reset(token)
    assert " WARNING test.logging [abc123]: hello world" in line


@pytest.mark.usefixtures("restore_logging")
def test_setup_writes_json_lines_and_sets_levels_per_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging(
        LoggingConfig(
            level="INFO",
            format="json",
            levels={"appservice.federation": "DEBUG", "aiohttp.access": "WARNING"},
        )
    )
    assert logging.getLogger("appservice.federation").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("appservice.federation.client").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO)
    assert not logging.getLogger("appservice.app").isEnabledFor(logging.DEBUG)
    logging.getLogger("test.logging").info("one %s", "line")
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "one line"


@pytest.mark.usefixtures("restore_logging")
def test_dict_config_file_replaces_the_built_in_setup(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    config_file = tmp_path / "log.yaml"
    config_file.write_text(
        f"""
formatters:
  plain: {{format: "%(levelname)s %(request_id)s %(name)s %(message)s"}}
  json: {{"()": appservice.logs.JsonFormatter}}
handlers:
  file: {{class: logging.FileHandler, filename: "{log_file}", formatter: plain}}
  json_file: {{class: logging.FileHandler, filename: "{log_file}.json", formatter: json}}
root: {{level: WARNING, handlers: [file, json_file]}}
loggers:
  test.logging: {{level: INFO}}
"""
    )
    existing = logging.getLogger("appservice.app")  # made before: it must stay enabled
    config = load_config_text(f"logging: {{config: {config_file.name}}}", tmp_path, environ={})
    setup_logging(config.logging)
    token = REQUEST_ID.set("r1")
    try:
        logging.getLogger("test.logging").info("from a request")
    finally:
        REQUEST_ID.reset(token)
    existing.warning("still here")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert log_file.read_text().splitlines() == [
        "INFO r1 test.logging from a request",
        "WARNING None appservice.app still here",
    ]
    first = json.loads(log_file.with_name("server.log.json").read_text().splitlines()[0])
    assert (first["request_id"], first["message"]) == ("r1", "from a request")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "logging.config: cannot read {path}: No such file or directory"),
        ("handlers: [unclosed", "logging.config: {path} is not valid YAML at line 1"),
        ("- a list", "logging.config: {path} must be a mapping in Python's logging dictConfig"),
        (
            "handlers: {h: {class: no.such.Handler}}\nroot: {handlers: [h]}",
            "logging.config: {path} is not a usable logging config: Unable to configure "
            "handler 'h'",
        ),
    ],
)
@pytest.mark.usefixtures("restore_logging")
def test_unusable_dict_config_file_is_a_one_line_config_error(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "log.yaml"
    if text is not None:
        path.write_text(text)
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(ConfigError) as e:
        setup_logging(LoggingConfig(config=str(path)))
    assert str(e.value).startswith(message.format(path=path))
    assert "\n" not in str(e.value)
    assert logging.getLogger().handlers == handlers  # the logging that was set up stays


def test_missing_dict_config_file_stops_start_up_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"database: {{url: 'sqlite:{tmp_path}/db'}}\nlogging: {{config: log.yaml}}\n")
    assert main(["migrate", "-c", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"config error: logging.config: cannot read {tmp_path / 'log.yaml'}: "
        "No such file or directory"
    ]
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("logging: {format: xml}", 'logging.format: "xml" is not text or json'),
        (
            "logging: {levels: {appservice.federation: LOUD}}",
            'logging.levels.appservice.federation: "LOUD" is not one of DEBUG, INFO, WARNING, '
            "ERROR",
        ),
        ("logging: {levels: [a]}", "logging.levels: expected a mapping, got a list"),
        ("logging: {config: ''}", "logging.config: must not be empty"),
    ],
)
def test_logging_config_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_text(text, tmp_path, environ={})
    assert str(e.value).startswith(message)


def test_levels_can_come_from_the_environment(tmp_path: Path) -> None:
    config = load_config_text(
        "", tmp_path, environ={"APPSERVICE_LOGGING_LEVELS": "{aiohttp.access: WARNING}"}
    )
    assert config.logging.levels == {"aiohttp.access": "WARNING"}


class _Lines(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
async def test_access_log_redacts_secrets_and_carries_the_request_id(
    formatter: logging.Formatter,
) -> None:
    handler_log = logging.getLogger("test.logging")

    async def handler(request: web.Request) -> web.Response:
        handler_log.warning("handling %s", request.match_info["id"])
        return web.json_response({})

    tracker = RequestTracker()
    app = web.Application(middlewares=[tracker.middleware, matrix_middleware])
    app.router.add_get("/things/{id}", handler)
    access = logging.getLogger("test.access")
    access.setLevel(logging.INFO)
    lines = _Lines(formatter)
    access.addHandler(lines)
    handler_log.addHandler(lines)
    runner = web.AppRunner(app, access_log_class=RedactingAccessLogger, access_log=access)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://{host}:{port}/things/42?access_token=s3cret&client_secret=hush&x=1"
            async with session.get(url) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-ID"]
            async with session.get(f"http://{host}:{port}/nothing?token=s3cret") as response:
                assert response.status == 404
                other_id = response.headers["X-Request-ID"]
        for _ in range(100):  # the access line is written after the response is sent
            if len(lines.lines) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
        access.removeHandler(lines)
        handler_log.removeHandler(lines)
    assert len(lines.lines) == 3
    assert request_id != other_id
    text = "\n".join(lines.lines)
    assert "s3cret" not in text
    assert "hush" not in text
    handled, accessed, not_found = lines.lines
    if isinstance(formatter, JsonFormatter):
        assert json.loads(handled)["request_id"] == request_id
        entry = json.loads(accessed)
        assert entry["path"] == "/things/42?access_token=<redacted>&client_secret=<redacted>&x=1"
        assert entry["route"] == "/things/{id}"
        assert (entry["method"], entry["status"], entry["request_id"]) == (
            "GET",
            200,
            request_id,
        )
        assert isinstance(entry["duration_ms"], float)
        entry = json.loads(not_found)
        assert (entry["route"], entry["status"], entry["request_id"]) == (None, 404, other_id)
    else:
        assert f"[{request_id}]: handling 42" in handled
        assert f"[{request_id}]: 127.0.0.1 GET /things/42?access_token=<redacted>&" in accessed
        assert f"[{other_id}]: 127.0.0.1 GET /nothing?token=<redacted> 404 " in not_found


async def test_shutdown_logs_what_it_finished_and_what_it_left(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "appservice.app")
    # An onbind notification queued and not due yet: the next start delivers it.
    await stop_background_jobs(api)
    await queued_onbind(api)
    await api.server.db.execute(
        "UPDATE onbind_outbox SET next_attempt_ts = $1", api.server.clock.now_ms() + 86_400_000
    )
    server = IdentityServer(api.server.config, clock=api.server.clock)
    await server.start()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_readiness() -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"status": "ok"}

    server.health_check.readiness = slow_readiness  # type: ignore[method-assign]
    host, port = await server.serve("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        probe = asyncio.create_task(session.get(f"http://{host}:{port}/health"))
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waits for the request in flight
        release.set()
        await asyncio.wait_for(stopping, 10)
        response = await probe
        assert response.status == 200
        response.release()
    messages = [r.getMessage() for r in caplog.records if r.name == "appservice.app"]
    assert "stopping: no new connections; 1 request(s) in flight" in messages
    (line,) = [m for m in messages if m.startswith("stopped:")]
    assert line.startswith("stopped: 1 request(s) in flight finished; background jobs stopped: ")
    assert "onbind-delivery" in line
    assert line.endswith("; 1 onbind notification(s) still pending for the next start")


def test_access_log_off_when_its_logger_is_above_info() -> None:
    access = logging.getLogger("test.access.quiet")
    access.setLevel(logging.WARNING)
    assert not RedactingAccessLogger(access, "").enabled
    access.setLevel(logging.INFO)
    assert RedactingAccessLogger(access, "").enabled
