"""Secrets never reach a log line: every shape the redaction knows, through structlog and through
the standard library's logging, and tracebacks without locals."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog
from pydantic import BaseModel, Field, ValidationError

from libs import observability
from libs.redaction import redact_text, redact_url, redact_value
from services.gateway.domain import generate_key

pytestmark = pytest.mark.unit

API_KEY = generate_key().token
KEY_SECRET = API_KEY.split("_", 2)[2]
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTl9."
    "c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
)
PASSWORD = "pa55-w0rd-xyzzy"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {API_KEY}", KEY_SECRET),
        (f"authorization=Bearer {JWT}", "eyJhbGci"),
        (f"X-API-Key: {API_KEY}", KEY_SECRET),
        (f"{{'x-api-key': '{API_KEY}', 'accept': '*/*'}}", KEY_SECRET),
        (f'{{"X-Admin-Token": "{PASSWORD}"}}', PASSWORD),
        (f"HTTPAuthorizationCredentials(scheme='Bearer', credentials='{API_KEY}')", KEY_SECRET),
        (f"unknown key {API_KEY} refused", KEY_SECRET),
        (f"token {JWT} expired", "eyJhbGci"),
        (f"Bearer {PASSWORD}", PASSWORD),
        (f"password={PASSWORD} dbname=mc", PASSWORD),
        (f"password = '{PASSWORD}'", PASSWORD),
        (f'{{"password": "{PASSWORD}", "user": "mc"}}', PASSWORD),
        (f"{{'password': '{PASSWORD}'}}", PASSWORD),
        (f"connecting to postgresql://mc:{PASSWORD}@db:5432/mc failed", PASSWORD),
        (f"nats://svc:{PASSWORD}@127.0.0.1:4222", PASSWORD),
        (f"postgresql://mc@db/mc?sslmode=require&password={PASSWORD}", PASSWORD),
        (f"postgresql://mc:p@{PASSWORD}@db/mc", PASSWORD),
        (f"client_secret: {PASSWORD}", PASSWORD),
    ],
)
def test_every_secret_shape_is_redacted(text: str, secret: str) -> None:
    shown = redact_text(text)
    assert secret not in shown
    assert "***" in shown


def test_an_api_key_keeps_its_key_id_which_names_it() -> None:
    key_id = API_KEY.split("_")[1]
    assert redact_text(f"key {API_KEY}") == f"key mc_{key_id}_***"


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://mc_service@127.0.0.1:5432/missioncontrol",
        "nats://127.0.0.1:4222",
        "run r-1 step 3 denied: token_limit exceeded (input_tokens=9500)",
        "api-key:abcdefghijkl",
        "mc_api_key_revoked",
        "tokens_used=12000 max_output_tokens: 800",
    ],
)
def test_what_is_no_secret_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql://mc:s3cret@db:5432/mc?sslmode=require") == (
        "postgresql://mc:***@db:5432/mc?sslmode=require"
    )


def test_a_validation_error_does_not_copy_the_payload() -> None:
    class Body(BaseModel):
        actor: str = Field(max_length=5)

    with pytest.raises(ValidationError) as info:
        Body(actor="payload-body-text")
    assert "payload-body-text" in str(info.value)
    shown = redact_text(str(info.value))
    assert "payload-body-text" not in shown
    assert "string_too_long" in shown


def test_nested_values_and_secret_named_entries_are_redacted() -> None:
    value = {
        "headers": {"Authorization": f"Bearer {API_KEY}", "X-Api-Key": "anything-at-all"},
        "items": [f"postgresql://u:{PASSWORD}@h/db", ("password", PASSWORD)],
        "password": 12345,
        "database_url": f"postgresql://mc:{PASSWORD}@db/mc",
        "count": 3,
    }
    shown = json.dumps(redact_value(value))
    for secret in (KEY_SECRET, "anything-at-all", PASSWORD, "12345"):
        assert secret not in shown
    assert '"count": 3' in shown
    assert "postgresql://mc:***@db/mc" in shown


@pytest.fixture
def structlog_to_buffer() -> Iterator[io.StringIO]:
    """The project's structlog chain, writing to a buffer."""
    buffer = io.StringIO()
    old = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            observability.format_exception,
            observability.redact_processor,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(buffer),
        cache_logger_on_first_use=False,
    )
    yield buffer
    structlog.configure(**old)


def test_structlog_lines_carry_no_secret(structlog_to_buffer: io.StringIO) -> None:
    log = structlog.get_logger("t")
    log.info(
        "request.seen",
        authorization=f"Bearer {API_KEY}",
        url=f"nats://svc:{PASSWORD}@n:4222",
        note=f"sent {JWT}",
        run_id="r-1",
    )
    line = json.loads(structlog_to_buffer.getvalue())
    assert line["authorization"] == "***"
    assert line["url"] == "nats://svc:***@n:4222"
    assert JWT not in line["note"]
    assert line["run_id"] == "r-1"


def _fail_with_secrets_in_locals(credentials: str) -> None:
    payload = {"input": "a very private prompt", "key": credentials}
    raise RuntimeError(f"handler failed for {len(payload)} fields")


def test_tracebacks_are_logged_without_locals(structlog_to_buffer: io.StringIO) -> None:
    try:
        _fail_with_secrets_in_locals(API_KEY)
    except RuntimeError:
        structlog.get_logger("t").exception("handler.failed")
    out = structlog_to_buffer.getvalue()
    line = json.loads(out)
    frames = line["exception"][0]["frames"]
    assert any(f["name"] == "_fail_with_secrets_in_locals" for f in frames)
    assert all("locals" not in f for f in frames)
    assert KEY_SECRET not in out and "very private prompt" not in out


def test_an_exception_message_with_a_secret_is_redacted(structlog_to_buffer: io.StringIO) -> None:
    try:
        raise ConnectionError(f"cannot connect to postgresql://mc:{PASSWORD}@db/mc")
    except ConnectionError:
        structlog.get_logger("t").exception("db.failed")
    assert PASSWORD not in structlog_to_buffer.getvalue()


@pytest.fixture
def stdlib_to_buffer() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A standard-library logger (like uvicorn's) under the redacting record factory."""
    buffer = io.StringIO()
    old_factory = logging.getLogRecordFactory()
    old_hook = sys.excepthook
    observability.install_stdlib_redaction()
    logger = logging.getLogger("mc.redaction-test")
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)
    logging.setLogRecordFactory(old_factory)
    sys.excepthook = old_hook


def test_stdlib_records_are_redacted(stdlib_to_buffer: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = stdlib_to_buffer
    logger.warning("headers %s", {"authorization": f"Bearer {API_KEY}"})
    logger.warning("connect %s:%d", f"nats://svc:{PASSWORD}@n", 4222)
    logger.warning(f"key {API_KEY}")
    try:
        raise ValueError(f"password={PASSWORD}")
    except ValueError:
        logger.exception("failed")
    out = buffer.getvalue()
    assert KEY_SECRET not in out and PASSWORD not in out
    assert "connect nats://svc:***@n:4222" in out
    assert "ValueError: password=***" in out


def test_the_record_factory_is_installed_once() -> None:
    old = logging.getLogRecordFactory()
    try:
        observability.install_stdlib_redaction()
        once = logging.getLogRecordFactory()
        observability.install_stdlib_redaction()
        assert logging.getLogRecordFactory() is once
    finally:
        logging.setLogRecordFactory(old)


def test_uncaught_exceptions_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    old_factory, old_hook = logging.getLogRecordFactory(), sys.excepthook
    try:
        observability.install_stdlib_redaction()
        try:
            raise RuntimeError(f"Authorization: Bearer {API_KEY}")
        except RuntimeError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    finally:
        logging.setLogRecordFactory(old_factory)
        sys.excepthook = old_hook
    err = capsys.readouterr().err
    assert "RuntimeError" in err and KEY_SECRET not in err
