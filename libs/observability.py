"""Structured JSON logs and W3C trace context.

Correlation ids and trace context travel in NATS headers (``Mc-Correlation-Id``, ``traceparent``,
``tracestate``); :func:`bind_from_headers` puts them into structlog's context variables so every
log line written while handling a message carries them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

_configured = False


def configure_logging(service: str, level: str = "info") -> None:
    """JSON logs on stderr with service name, level, timestamp and bound context."""
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
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
