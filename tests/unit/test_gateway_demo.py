"""The demo's script reproduces seed 000, and its summary says what happened."""

from __future__ import annotations

import pytest

from services.gateway.demo import SCRIPTS, summary

pytestmark = pytest.mark.unit

TOKEN_LIMIT = 10_000


def _tokens(steps: tuple[object, ...]) -> int:
    return sum(s.input_tokens + s.output_tokens for s in steps)  # type: ignore[attr-defined]


def test_the_script_is_seed_000() -> None:
    a, b, c = SCRIPTS
    assert (len(a.steps), _tokens(a.steps), a.finish) == (3, 8000, True)
    assert (len(b.steps), _tokens(b.steps), b.finish) == (2, 5000, False)
    assert [_tokens((s,)) for s in c.steps] == [500, 5000]
    assert c.denied_step is not None
    assert _tokens((c.denied_step,)) == 9500
    # Only run C's third step crosses the limit; every admitted step stays under it.
    for script in SCRIPTS:
        used = 0
        for step in script.steps:
            used += _tokens((step,))
            assert used <= TOKEN_LIMIT
    assert _tokens(c.steps) + _tokens((c.denied_step,)) > TOKEN_LIMIT


def test_summary_names_status_denial_incident_inflection_and_urls() -> None:
    run_ids = {"A": "demo-a-1", "B": "demo-b-1", "C": "demo-c-1"}
    runs = {
        "A": {"status": "completed", "last_step_index": 3, "tokens_used": 8000, "cost_usd": "0.03"},
        "B": {"status": "running", "last_step_index": 2, "tokens_used": 5000, "cost_usd": "0.02"},
        "C": {
            "status": "stopped_by_policy",
            "last_step_index": 2,
            "tokens_used": 5500,
            "cost_usd": None,
        },
    }
    denial = {
        "outcome": "deny",
        "reasons": [{"policy_id": "token_limit", "severity": "high", "message": "15000 > 10000"}],
    }
    incident = {"incident_id": "inc-1", "severity": "high", "status": "open",
                "policy_id": "token_limit"}  # fmt: skip
    trace = {"inflection_point": {"step_index": 3, "policy_id": "token_limit", "reason": "r"}}
    text = summary("http://gw", "mc_key", run_ids, runs, denial, incident, trace)
    assert "stopped_by_policy" in text and "completed" in text and "running" in text
    assert "token_limit (high): 15000 > 10000" in text
    assert "Incident inc-1: severity high" in text
    assert "Inflection point of run C: step 3 (token_limit" in text
    assert "unpriced" in text
    assert "curl -H 'Authorization: Bearer mc_key' http://gw/v1/runs" in text
