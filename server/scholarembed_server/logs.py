"""Logging with request ids: text for people, JSON lines for log pipelines.

The id of the call being served lives in a context variable, so every log line written while serving
it carries it, in any module. It comes from the caller's `x-request-id` metadata when present (so a
caller can follow its request through the logs), or is made up here; either way the caller gets it back.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from typing import Any

REQUEST_ID_HEADER = "x-request-id"  # in and out: gRPC metadata (trailing, on the way out), HTTP headers
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def request_id_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return uuid.uuid4().hex[:16]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # FAISS logs, at INFO, each CPU instruction set it tries and the ModuleNotFoundError of each it lacks:
    # a newcomer reads them as errors. Its warnings and errors still show.
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.getLogger().level))
