"""structlog setup: JSON lines by default, a console renderer on a TTY or when asked.

The relay logs events (start, stop, connection open/close, auth failures, Redis trouble), never
individual frames. Records from the standard library's loggers (websockets, asyncio, redis) go
through the same renderer, and only at WARNING or above: websockets logs the handshake request
line and headers (which may carry `?token=` or `Authorization`) at DEBUG, and a line per
connection at INFO, and neither may reach the relay's output.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")
THIRD_PARTY_FLOOR = logging.WARNING
QUIET_LOGGERS = ("websockets", "asyncio", "redis")


class _RelayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure() installed, so a second call replaces it."""


def configure(level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None) -> None:
    """Set up structlog (and the stdlib root logger) to write to `stream` (default: stderr).

    `fmt`: "json" (one JSON object per line), "console" (human-readable), or "auto" (console
    when the stream is a TTY, JSON otherwise). `level`: debug, info, warning or error.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = sys.stderr if stream is None else stream
    tty = _isatty(out)
    levelno = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor
    if fmt == "console" or (fmt == "auto" and tty):
        renderer = structlog.dev.ConsoleRenderer(colors=tty)  # renders exceptions itself
        exceptions: list[structlog.typing.Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = [structlog.processors.format_exc_info]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    handler = _RelayHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exceptions,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    floor = max(levelno, THIRD_PARTY_FLOOR)
    root.setLevel(floor)
    for name in QUIET_LOGGERS:  # even if someone lowers the root logger's level later
        logging.getLogger(name).setLevel(floor)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
