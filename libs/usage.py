"""A step's token usage, and how each provider's usage object maps onto it (pure, no I/O).

Mission Control counts usage in five fields, and every token lands in exactly one price bucket:

* ``input_tokens``: every prompt token, whether read from a cache, written to one, or neither;
* ``cached_input_tokens``: of those, the ones read from the provider's prompt cache;
* ``cache_write_tokens``: of those, the ones written to the provider's prompt cache;
* ``output_tokens``: every generated token, reasoning included;
* ``reasoning_tokens``: of those, the reasoning ("thinking") tokens.

So ``input_tokens + output_tokens`` is always the step's whole token count, and the uncached
input (``input_tokens - cached_input_tokens - cache_write_tokens``) is what the input price
applies to. Providers disagree on what their fields include, and that is where costs go wrong:

* OpenAI's ``prompt_tokens`` *includes* ``prompt_tokens_details.cached_tokens``, and
  ``completion_tokens`` includes ``completion_tokens_details.reasoning_tokens``;
* Anthropic's ``input_tokens`` *excludes* ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens`` (they are added here); its ``output_tokens`` include thinking;
* Gemini's ``promptTokenCount`` *includes* ``cachedContentTokenCount``, but its
  ``candidatesTokenCount`` *excludes* ``thoughtsTokenCount`` (added here).

The adapters below take the provider's response (or only its usage object) as parsed JSON, the
way the provider's HTTP API returns it; a streamed call passes its chunks to :func:`from_stream`,
which keeps the final usage the stream reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, TypeVar

Provider = Literal["openai", "anthropic", "gemini"]


class UsageCounts(Protocol):
    """Anything that carries the five usage counts (a step event, an API body)."""

    @property
    def input_tokens(self) -> int: ...

    @property
    def cached_input_tokens(self) -> int: ...

    @property
    def cache_write_tokens(self) -> int: ...

    @property
    def output_tokens(self) -> int: ...

    @property
    def reasoning_tokens(self) -> int: ...


C = TypeVar("C", bound=UsageCounts)


@dataclass(frozen=True)
class Usage:
    """The usage of one step (see the module docstring for what each field counts)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        problem = usage_problem(**asdict(self))
        if problem is not None:
            raise ValueError(problem)

    @property
    def uncached_input_tokens(self) -> int:
        """Prompt tokens neither read from nor written to a cache."""
        return self.input_tokens - self.cached_input_tokens - self.cache_write_tokens

    def fields(self) -> dict[str, int]:
        """The usage as the step fields of the API (``step.record(**usage.fields())``)."""
        return asdict(self)


def usage_problem(
    input_tokens: int,
    cached_input_tokens: int,
    cache_write_tokens: int,
    output_tokens: int,
    reasoning_tokens: int,
) -> str | None:
    """Why these counts cannot describe one step, or ``None`` when they can.

    A cached or reasoning count larger than the total it is part of is what a client sends when it
    took a provider field with the other meaning (Anthropic's ``input_tokens``, which leaves the
    cache out, as our ``input_tokens``): refusing it keeps a cost from being understated.
    """
    if cached_input_tokens + cache_write_tokens > input_tokens:
        return (
            f"cached_input_tokens + cache_write_tokens "
            f"({cached_input_tokens} + {cache_write_tokens}) exceed input_tokens "
            f"({input_tokens}): input_tokens counts every prompt token, cached or not"
        )
    if reasoning_tokens > output_tokens:
        return (
            f"reasoning_tokens ({reasoning_tokens}) exceed output_tokens ({output_tokens}): "
            "output_tokens counts every generated token, reasoning included"
        )
    return None


def require_consistent(counts: C) -> C:
    """``counts`` itself when its usage adds up; ``ValueError`` naming the problem otherwise
    (a pydantic ``model_validator`` turns it into a validation error, an API's 422)."""
    problem = usage_problem(
        counts.input_tokens,
        counts.cached_input_tokens,
        counts.cache_write_tokens,
        counts.output_tokens,
        counts.reasoning_tokens,
    )
    if problem is not None:
        raise ValueError(problem)
    return counts


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be an object, got {type(value).__name__}")
    return value


def _count(obj: Mapping[str, Any], *names: str) -> int:
    """The first of ``names`` present in ``obj`` (a missing or null count is 0)."""
    for name in names:
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"usage field {name} must be a non-negative integer, got {value!r}")
        return value
    return 0


def _usage_of(payload: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """The usage object of a response, or ``payload`` itself when it is the usage object."""
    for key in keys:
        if key in payload:
            return _object(payload[key], key)
    return payload


def from_openai(payload: Mapping[str, Any]) -> Usage:
    """OpenAI's usage: Chat Completions (``prompt_tokens``) or Responses (``input_tokens``).

    ``prompt_tokens`` already includes ``prompt_tokens_details.cached_tokens`` and
    ``completion_tokens`` already includes ``completion_tokens_details.reasoning_tokens``, so
    both map as they are; OpenAI charges nothing extra for writing its cache.
    """
    usage = _usage_of(payload, "usage")
    in_details = _object(
        usage.get("prompt_tokens_details", usage.get("input_tokens_details")), "input details"
    )
    out_details = _object(
        usage.get("completion_tokens_details", usage.get("output_tokens_details")),
        "output details",
    )
    return Usage(
        input_tokens=_count(usage, "prompt_tokens", "input_tokens"),
        cached_input_tokens=_count(in_details, "cached_tokens"),
        output_tokens=_count(usage, "completion_tokens", "output_tokens"),
        reasoning_tokens=_count(out_details, "reasoning_tokens"),
    )


def from_anthropic(payload: Mapping[str, Any]) -> Usage:
    """Anthropic's Messages usage.

    ``input_tokens`` counts only the prompt after the last cache breakpoint: cache reads
    (``cache_read_input_tokens``) and cache writes (``cache_creation_input_tokens``) come on top,
    so the three are summed. Thinking tokens are inside ``output_tokens`` and not reported apart.
    """
    usage = _usage_of(payload, "usage")
    uncached = _count(usage, "input_tokens")
    reads = _count(usage, "cache_read_input_tokens")
    writes = _count(usage, "cache_creation_input_tokens")
    return Usage(
        input_tokens=uncached + reads + writes,
        cached_input_tokens=reads,
        cache_write_tokens=writes,
        output_tokens=_count(usage, "output_tokens"),
    )


def from_gemini(payload: Mapping[str, Any]) -> Usage:
    """Gemini's ``usageMetadata`` (camelCase as the REST API sends it, or snake_case).

    ``promptTokenCount`` already includes ``cachedContentTokenCount``; tool-use prompt tokens are
    billed as input and added. ``candidatesTokenCount`` leaves out ``thoughtsTokenCount``, so the
    thoughts are added to the output. Gemini reports no cache writes (an explicit cache is
    billed for its storage, not per request).
    """
    usage = _usage_of(payload, "usageMetadata", "usage_metadata")
    thoughts = _count(usage, "thoughtsTokenCount", "thoughts_token_count")
    return Usage(
        input_tokens=_count(usage, "promptTokenCount", "prompt_token_count")
        + _count(usage, "toolUsePromptTokenCount", "tool_use_prompt_token_count"),
        cached_input_tokens=_count(usage, "cachedContentTokenCount", "cached_content_token_count"),
        output_tokens=_count(usage, "candidatesTokenCount", "candidates_token_count") + thoughts,
        reasoning_tokens=thoughts,
    )


ADAPTERS = {"openai": from_openai, "anthropic": from_anthropic, "gemini": from_gemini}


def _adapter(provider: str) -> Callable[[Mapping[str, Any]], Usage]:
    try:
        return ADAPTERS[provider]
    except KeyError:
        raise ValueError(f"unknown provider {provider!r}; known: {sorted(ADAPTERS)}") from None


def from_provider(provider: Provider, payload: Mapping[str, Any]) -> Usage:
    """The usage of one (non-streamed) response of ``provider``."""
    return _adapter(provider)(payload)


def from_stream(provider: Provider, chunks: Iterable[Mapping[str, Any]]) -> Usage:
    """The final usage of a streamed call, from its parsed chunks (server-sent event data).

    * OpenAI sends usage once, in the last chunk, and only when asked with
      ``stream_options: {"include_usage": true}``;
    * Anthropic sends the input counts in ``message_start`` and the cumulative ``output_tokens``
      in each ``message_delta``: the last value of every field wins;
    * Gemini sends ``usageMetadata`` with the chunks; the last one is the total.

    Raises ``ValueError`` when the stream carried no usage at all, so a stream is never priced
    at zero by mistake.
    """
    adapter = _adapter(provider)
    if provider == "anthropic":
        merged: dict[str, Any] = {}
        for chunk in chunks:
            if chunk.get("type") == "message_start":
                merged.update(
                    _object(_object(chunk.get("message"), "message").get("usage"), "usage")
                )
            elif chunk.get("type") == "message_delta":
                delta = _object(chunk.get("usage"), "usage")
                merged.update({k: v for k, v in delta.items() if v is not None})
        if not merged:
            raise ValueError("the stream carried no usage (no message_start or message_delta)")
        return from_anthropic(merged)
    keys = ("usage",) if provider == "openai" else ("usageMetadata", "usage_metadata")
    last: Mapping[str, Any] | None = None
    for chunk in chunks:
        if any(chunk.get(key) is not None for key in keys):
            last = chunk
    if last is None:
        hint = " (ask for it with stream_options.include_usage)" if provider == "openai" else ""
        raise ValueError(f"the stream carried no usage{hint}")
    return adapter(last)


__all__ = [
    "ADAPTERS",
    "Provider",
    "Usage",
    "UsageCounts",
    "from_anthropic",
    "from_gemini",
    "from_openai",
    "from_provider",
    "from_stream",
    "require_consistent",
    "usage_problem",
]
