"""Provider usage objects mapped to our usage fields, and priced, from recorded payloads.

The fixtures under ``tests/fixtures/usage/`` are responses (or stream chunks) shaped exactly as
OpenAI, Anthropic and Gemini return them, with the usage and cost each must come to. The last
tests pin the three ways cache tokens are commonly mispriced: cache writes not counted, cached
tokens counted twice, cache reads priced at $0.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.contracts.events import StepRecorded
from libs.pricing import builtin_price_table, price_step, with_overrides
from libs.usage import Usage, from_anthropic, from_openai, from_provider, from_stream
from services.cost.domain import decide_cost, parse_prices
from services.gateway.client import AsyncMissionControlClient
from services.gateway.worker import Step

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "usage"
AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
PER_MILLION = Decimal(1_000_000)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


RESPONSES = sorted(p.name for p in FIXTURES.glob("*.json") if "chunks" not in _load(p.name))
STREAMS = sorted(p.name for p in FIXTURES.glob("*.json") if "chunks" in _load(p.name))


def _usage(fixture: dict[str, Any]) -> Usage:
    if "chunks" in fixture:
        return from_stream(fixture["provider"], fixture["chunks"])
    return from_provider(fixture["provider"], fixture["response"])


def _cost(model: str, usage: Usage) -> Decimal:
    step = StepRecorded(run_id="r", agent_id="a", step_index=1, model=model, **usage.fields())
    cost = decide_cost(step, AT, builtin_price_table(), step_event_id=uuid.uuid4())
    assert cost.pricing_status == "priced"
    assert cost.total_cost_usd is not None
    return cost.total_cost_usd


def test_every_provider_has_recorded_payloads_with_cache_tokens() -> None:
    fixtures = [_load(n) for n in (*RESPONSES, *STREAMS)]
    assert {f["provider"] for f in fixtures} == {"openai", "anthropic", "gemini"}
    assert {f["provider"] for f in fixtures if "chunks" in f} == {"openai", "anthropic", "gemini"}
    for provider in ("openai", "anthropic", "gemini"):
        assert any(
            f["provider"] == provider and f["expected_usage"]["cached_input_tokens"] > 0
            for f in fixtures
        ), provider
    assert any(f["expected_usage"]["cache_write_tokens"] > 0 for f in fixtures)
    assert any(f["expected_usage"]["reasoning_tokens"] > 0 for f in fixtures)


@pytest.mark.parametrize("name", RESPONSES)
def test_a_recorded_response_maps_to_our_usage_and_cost(name: str) -> None:
    fixture = _load(name)
    usage = _usage(fixture)
    assert usage.fields() == fixture["expected_usage"]
    # Its usage object alone maps the same as the whole response.
    key = "usageMetadata" if fixture["provider"] == "gemini" else "usage"
    assert from_provider(fixture["provider"], fixture["response"][key]) == usage
    assert _cost(fixture["model"], usage) == Decimal(fixture["expected_cost_usd"])


@pytest.mark.parametrize("name", STREAMS)
def test_a_streamed_call_is_priced_from_its_final_usage(name: str) -> None:
    fixture = _load(name)
    usage = _usage(fixture)
    assert usage.fields() == fixture["expected_usage"]
    assert _cost(fixture["model"], usage) == Decimal(fixture["expected_cost_usd"])
    # Only the end of the stream counts: the first chunk's partial usage is less.
    first = fixture["chunks"][:1]
    if fixture["provider"] == "openai":
        with pytest.raises(ValueError, match="include_usage"):
            from_stream("openai", first)
    else:
        assert from_stream(fixture["provider"], first).output_tokens < usage.output_tokens


def test_a_stream_without_usage_is_refused_not_priced_at_zero() -> None:
    for provider in ("openai", "anthropic", "gemini"):
        with pytest.raises(ValueError, match="no usage"):
            from_stream(provider, [{"type": "ping", "choices": []}])


def test_gemini_snake_case_metadata_maps_like_camel_case() -> None:
    camel = _load("gemini_cached_thoughts.json")["response"]["usageMetadata"]
    snake = {
        "prompt_token_count": camel["promptTokenCount"],
        "cached_content_token_count": camel["cachedContentTokenCount"],
        "candidates_token_count": camel["candidatesTokenCount"],
        "thoughts_token_count": camel["thoughtsTokenCount"],
    }
    assert from_provider("gemini", {"usage_metadata": snake}) == from_provider("gemini", camel)


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"prompt_tokens": -1}, "non-negative"),
        ({"prompt_tokens": True}, "non-negative"),
        ({"prompt_tokens": "12"}, "non-negative"),
        ({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}}, "exceed"),
        ({"prompt_tokens_details": "cached"}, "must be an object"),
    ],
)
def test_a_malformed_usage_object_is_refused_naming_the_field(
    usage: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        from_openai({"usage": usage})


def test_counts_that_do_not_add_up_are_refused() -> None:
    with pytest.raises(ValueError, match="cached_input_tokens"):
        Usage(input_tokens=10, cached_input_tokens=8, cache_write_tokens=3)
    with pytest.raises(ValueError, match="reasoning_tokens"):
        Usage(output_tokens=5, reasoning_tokens=6)
    with pytest.raises(ValueError, match="exceed input_tokens"):
        StepRecorded(run_id="r", agent_id="a", step_index=1, input_tokens=5, cached_input_tokens=6)
    with pytest.raises(ValueError, match="exceed"):
        price_step(builtin_price_table(), "gpt-4o", 5, 0, AT, cached_input_tokens=6)


def test_an_unknown_provider_is_named() -> None:
    with pytest.raises(ValueError, match="unknown provider 'mistral'"):
        from_provider("mistral", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown provider 'mistral'"):
        from_stream("mistral", [{"usage": {"prompt_tokens": 1}}])  # type: ignore[arg-type]


# --- the three ways cache tokens get mispriced -------------------------------------------------


def _per_million(text: str) -> Decimal:
    return Decimal(text) / PER_MILLION


def test_cache_writes_are_counted_and_priced_at_the_write_price() -> None:
    """Anthropic leaves cache writes out of ``input_tokens``: dropping them understates cost."""
    response = _load("anthropic_cache_write.json")["response"]
    usage = from_anthropic(response)
    assert usage.input_tokens == 21 + 2048
    assert usage.cache_write_tokens == 2048
    step = StepRecorded(
        run_id="r", agent_id="a", step_index=1, model="claude-sonnet-4", **usage.fields()
    )
    cost = decide_cost(step, AT, builtin_price_table(), step_event_id=uuid.uuid4())
    # 2,048 tokens at $3.75/M (1.25 x input), not at $0 and not at the $3/M input price.
    assert cost.cache_write_cost_usd == 2048 * _per_million("3.75")
    assert cost.input_cost_usd == 21 * _per_million("3")
    assert cost.total_cost_usd == (
        21 * _per_million("3") + 2048 * _per_million("3.75") + 393 * _per_million("15")
    )
    without_writes = 21 * _per_million("3") + 393 * _per_million("15")
    assert cost.total_cost_usd is not None and cost.total_cost_usd > without_writes


def test_cached_tokens_are_counted_once() -> None:
    """OpenAI's ``prompt_tokens`` already include the cached ones: add them again and the bill
    doubles-counts them."""
    fixture = _load("openai_chat_cached_reasoning.json")
    usage = from_openai(fixture["response"])
    raw = fixture["response"]["usage"]
    # Every prompt token priced exactly once: uncached + cached = prompt_tokens.
    assert usage.uncached_input_tokens + usage.cached_input_tokens == raw["prompt_tokens"]
    assert usage.input_tokens + usage.output_tokens == raw["total_tokens"]
    price = price_step(
        builtin_price_table(),
        "o4-mini",
        usage.input_tokens,
        usage.output_tokens,
        AT,
        cached_input_tokens=usage.cached_input_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    assert price.input_cost_usd == 86 * _per_million("1.10")
    assert price.cached_input_cost_usd == 1920 * _per_million("0.275")
    # Reasoning is inside completion_tokens too: priced once, as reasoning.
    assert price.output_cost_usd == 108 * _per_million("4.40")
    assert price.reasoning_cost_usd == 192 * _per_million("4.40")
    assert price.total_cost_usd == Decimal(fixture["expected_cost_usd"])
    # Taking prompt_tokens as uncached *and* adding the cached tokens on top cannot be recorded:
    # the counts would not add up, and the step is refused rather than overbilled.
    with pytest.raises(ValueError, match="exceed input_tokens"):
        Usage(
            input_tokens=raw["prompt_tokens"] - 1920,
            cached_input_tokens=1920,
            cache_write_tokens=1920,
        )
    # Anthropic's fields are the other way round, and are summed, never double-counted.
    read = from_anthropic(_load("anthropic_cache_read.json")["response"])
    assert read.input_tokens == 25 + 2048
    assert read.uncached_input_tokens == 25


def test_cache_reads_are_never_priced_at_zero() -> None:
    """A cache read costs the provider's cached-input price; a price that names no cached price
    charges the input price, never $0."""
    for name, model, per_million in (
        ("anthropic_cache_read.json", "claude-sonnet-4", "0.30"),
        ("openai_responses_cached.json", "gpt-4.1", "0.50"),
        ("gemini_cached_thoughts.json", "gemini-2.5-flash", "0.03"),
    ):
        fixture = _load(name)
        usage = from_provider(fixture["provider"], fixture["response"])
        step = StepRecorded(run_id="r", agent_id="a", step_index=1, model=model, **usage.fields())
        cost = decide_cost(step, AT, builtin_price_table(), step_event_id=uuid.uuid4())
        assert cost.cached_input_tokens > 0
        assert cost.cached_input_cost_usd == usage.cached_input_tokens * _per_million(per_million)
        assert cost.cached_input_cost_usd is not None and cost.cached_input_cost_usd > 0, name
    # A tenant price with input and output only: cache reads fall back to the input price.
    (house,) = parse_prices([{"model": "house", "input_per_token": "0.000002",
                              "output_per_token": "0.000004"}])  # fmt: skip
    assert house.cached_input_per_token == Decimal("0.000002")
    table = with_overrides(builtin_price_table(), [house], 1)
    price = price_step(table, "house", 1000, 0, AT, cached_input_tokens=1000)
    assert price.cached_input_cost_usd == Decimal("0.002")


async def test_the_worker_sdk_records_a_streamed_calls_final_usage_in_full() -> None:
    sent: list[dict[str, Any]] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append({"path": request.url.path, **json.loads(request.content)})
        return httpx.Response(201, json={"recorded": 1, "positions": [7]})

    client = AsyncMissionControlClient(
        "http://gateway", "mc_key", transport=httpx.MockTransport(gateway)
    )
    step = Step(
        tenant_id="acme", execution_id="ex", workflow_id="wf", step_id="write", attempt=1,
        run_id="run-1", agent_id="writer", inputs={}, risk_tier="read_only",
        deadline_at=AT, _client=client,
    )  # fmt: skip
    fixture = _load("anthropic_stream.json")
    await step.record(
        model=fixture["model"],
        usage=from_stream("anthropic", fixture["chunks"]),
        provider_cost_usd="0.0088",
    )
    await client.aclose()
    (body,) = sent
    assert body["path"] == "/v1/runs/run-1/steps"
    assert {k: body[k] for k in fixture["expected_usage"]} == fixture["expected_usage"]
    assert (body["step_index"], body["provider_cost_usd"]) == (1, "0.0088")
