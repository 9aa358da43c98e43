"""``--log-format``: the root logger's lines as text (the default) or one JSON object a line.

A JSON line has ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, an ``exception``
when the record has one, and any fields the record carries in its ``json_fields`` extra (the
request log's request id, trace id, model, version, code and duration).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (``json.dumps`` escapes any newline in it)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict):
            entry.update((key, value) for key, value in fields.items() if key not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def use_log_format(name: str, root: logging.Logger | None = None) -> None:
    """With ``json``, give every handler of ``root`` (the root logger) the JSON formatter, adding a
    stderr handler if it has none; ``text`` leaves the handlers as `tlserve` configured them."""
    if name not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {name!r}")
    if name == "text":
        return
    root = root or logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
