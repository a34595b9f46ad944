"""Logging set-up: text or JSON lines, per-logger levels, an operator's dictConfig file, and the
request id that every line logged while a request is handled carries."""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from appservice.config import ConfigError, LoggingConfig

# The id of the request being handled (set by the HTTP middleware in the request's own task).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or from the
# record factory below) and goes into the JSON object as its own field.
_RECORD_ATTRIBUTES = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
        "message",
        "asctime",
        "request_id",
        "request_tag",
    }
)


def new_request_id() -> str:
    """A fresh request id: 16 hex digits, enough not to repeat in any log's lifetime."""
    return secrets.token_hex(8)


_default_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _default_factory(*args, **kwargs)
    record.request_id = REQUEST_ID.get()
    return record


def install_record_factory() -> None:
    """Give every log record a ``request_id`` attribute (None outside a request), so any
    formatter, also an operator's, can show it."""
    if logging.getLogRecordFactory() is not _record_with_request_id:
        logging.setLogRecordFactory(_record_with_request_id)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message``; the request id only during a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id`` during a request, every ``extra=`` field of the record (the access log's
    ``route``, ``method``, ``status``, ``duration_ms``), and a traceback as one ``exception``
    string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(config: LoggingConfig | None) -> None:
    """Configure the root logger to stderr from ``config`` (INFO text lines without one), or
    apply the operator's dictConfig file named by ``logging.config``.

    Raises :class:`ConfigError` (one line naming ``logging.config``) for a file that is missing
    or not a valid logging configuration.
    """
    install_record_factory()
    if config is not None and config.config is not None:
        _apply_dict_config(Path(config.config))
        return
    handler = logging.StreamHandler()
    json_lines = config is not None and config.format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    level = config.level.upper() if config is not None else "INFO"
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name, logger_level in (config.levels if config is not None else {}).items():
        logging.getLogger(name).setLevel(logger_level.upper())


def _apply_dict_config(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"logging.config: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"logging.config: {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"logging.config: {path} must be a mapping in Python's logging dictConfig schema"
        )
    data.setdefault("version", 1)
    # The module loggers exist already (made at import): disabling them, dictConfig's default,
    # would silence this server without a word.
    data.setdefault("disable_existing_loggers", False)
    root = logging.getLogger()
    previous = list(root.handlers)
    for handler in previous:
        root.removeHandler(handler)
    try:
        logging.config.dictConfig(data)
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        for handler in previous:
            root.addHandler(handler)
        reason = str(e)
        if e.__cause__ is not None:
            reason += f": {e.__cause__}"
        reason = " ".join(reason.split())
        raise ConfigError(
            f"logging.config: {path} is not a usable logging config: {reason}"
        ) from None
    for handler in previous:
        handler.close()
