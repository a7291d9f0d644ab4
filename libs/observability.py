"""Structured JSON logs, with every secret redacted, and W3C trace context.

Every line a process logs passes :mod:`libs.redaction` first: structlog's through
:func:`redact_processor`, the standard library's (uvicorn, FastStream, nats, asyncio) through a
record factory installed by :func:`configure_logging`, and uncaught exceptions through
``sys.excepthook``. Tracebacks are logged without the frames' local variables, which would hold
request payloads and credentials.

Correlation ids and trace context travel in NATS headers (``Mc-Correlation-Id``, ``traceparent``,
``tracestate``); :func:`bind_from_headers` puts them into structlog's context variables so every
log line written while handling a message carries them.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import structlog
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, WrappedLogger

from libs.redaction import MASK, is_secret_key, redact_entry, redact_text

_configured = False

format_exception = ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
"""``exc_info`` as a structured traceback: frames, exception types and messages, never locals."""


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: every value of the event with its secrets hidden (last before the
    renderer, so it also sees the formatted traceback)."""
    return {key: redact_entry(key, value) for key, value in event_dict.items()}


def _redact_arg(arg: Any) -> Any:
    if arg is None or isinstance(arg, bool | int | float):
        return arg
    return redact_text(arg if isinstance(arg, str) else str(arg))


def redacting_record_factory(
    base: Callable[..., logging.LogRecord],
) -> Callable[..., logging.LogRecord]:
    """A ``logging`` record factory over ``base`` whose records carry no secret: message,
    arguments, traceback and stack text redacted when the record is made, before any handler or
    formatter of any library sees it."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        # getMessage() formats str(msg) % args, so the string form loses nothing.
        record.msg = redact_text(str(record.msg))
        if isinstance(record.args, Mapping):
            record.args = {
                k: MASK if is_secret_key(k) else _redact_arg(v) for k, v in record.args.items()
            }
        elif record.args:
            record.args = tuple(_redact_arg(a) for a in record.args)
        if record.exc_info and record.exc_info[1] is not None:
            # Formatters use exc_text when it is set: the standard library's traceback shows no
            # locals, only the messages need redacting.
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)))
            record.exc_text = record.exc_text.rstrip("\n")
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    return factory


def _redacting_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))


def install_stdlib_redaction() -> None:
    """Redact every standard-library log record and uncaught exception of this process."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "redacting", False):
        logging.setLogRecordFactory(redacting_record_factory(current))
    sys.excepthook = _redacting_excepthook


def configure_logging(service: str, level: str = "info") -> None:
    """JSON logs on stderr with service name, level, timestamp and bound context."""
    global _configured
    if _configured:
        return
    _configured = True
    install_stdlib_redaction()
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            format_exception,
            redact_processor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())


def tracer(name: str) -> trace.Tracer:
    """An OpenTelemetry tracer."""
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add the current span's ``traceparent``/``tracestate`` to ``headers``."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Any:
    """The OpenTelemetry context carried by ``headers``."""
    return propagate.extract(dict(headers or {}))


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id inside a ``traceparent`` header."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    return parts[1] if len(parts) >= 4 else None


def bind_from_headers(headers: Mapping[str, str] | None) -> None:
    """Bind correlation and trace ids from message headers to the logging context."""
    h = headers or {}
    structlog.contextvars.bind_contextvars(
        correlation_id=h.get("Mc-Correlation-Id"),
        trace_id=trace_id_of(h.get("traceparent")),
        event_type=h.get("Mc-Event-Type"),
    )
