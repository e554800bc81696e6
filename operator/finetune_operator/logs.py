"""Logging set-up: one line per event, naming the job; JSON when FTO_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

LOGGER_NAME = "finetune_operator"


_ENCODER = json.JSONEncoder(default=str)  # json.dumps(out, default=str) without an encoder built per line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the structured fields passed as `extra={"job": ...}` become keys."""

    FIELDS = ("job", "namespace", "action", "phase", "reason", "result", "duration_s", "calls", "waited_seconds",
              "longest_seconds")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self.FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return _ENCODER.encode(out)


def configure(log_format: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kopf logs every handler run at INFO; keep its chatter at WARNING so our one-line logs stand out.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
