"""Diffs of two documents or two bundles: rows, order, marks, hash, views and pages
(``libs/diffing.py``), and the acknowledgement decision (``services/policy_admission/diffs.py``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import rfc8785

from libs import diffing
from libs.errors import InvalidInput, TooLarge
from libs.policy_bundles import directory_files
from services.policy_admission.diffs import Acknowledgements, acknowledge

REPO = Path(__file__).resolve().parents[2]
OLD_SPEC = {
    "identity": {"name": "billing-bot", "role": "support"},
    "limits": {"max_tokens": 10_000, "max_cost_usd": 2.5},
    "tools": ["search", "email"],
    "model": {"provider": "openai", "name": "gpt-4o"},
    "memory": {"enabled": True},
}
NEW_SPEC = {
    "identity": {"name": "billing-bot", "role": "support"},
    "limits": {"max_tokens": 20_000},
    "tools": ["crm", "search", "email"],
    "model": {"provider": "openai", "name": "gpt-4.1"},
    "memory": {"enabled": 1},
    "triggers": [{"type": "manual"}],
}
D0, D1 = "sha256:" + "0" * 64, "sha256:" + "1" * 64


def rows_of(diff: diffing.Diff) -> list[tuple[str, str, object, object]]:
    return [(r.path, r.change, r.old, r.new) for r in diff.rows]


def test_documents_give_one_row_per_changed_path_in_stable_order() -> None:
    diff = diffing.diff_documents(OLD_SPEC, NEW_SPEC)
    assert rows_of(diff) == [
        ("/limits/max_cost_usd", "removed", 2.5, None),
        ("/limits/max_tokens", "changed", 10_000, 20_000),
        # JSON true is not 1.
        ("/memory/enabled", "changed", True, 1),
        ("/model/name", "changed", "gpt-4o", "gpt-4.1"),
        # One insertion at the front: one row, not every element shifted into a change.
        ("/tools/0", "added", None, "crm"),
        ("/triggers", "added", None, [{"type": "manual"}]),
    ]
    assert [r.section for r in diff.rows] == [
        "limits",
        "limits",
        "memory",
        "model",
        "tools",
        "triggers",
    ]
    assert diff.summary() == {
        "rows": 6,
        "added": 2,
        "removed": 1,
        "changed": 3,
        "locked": 0,
        "enforced": 0,
    }


def test_identical_documents_have_no_rows_and_key_order_does_not_matter() -> None:
    shuffled = dict(reversed(list(OLD_SPEC.items())))
    diff = diffing.diff_documents(OLD_SPEC, shuffled)
    assert diff.rows == ()
    assert diff.old == diff.new
    assert diffing.diff_documents(OLD_SPEC, NEW_SPEC).diff_hash == (
        diffing.diff_documents(shuffled, NEW_SPEC).diff_hash
    )


def test_locked_and_enforced_fields_mark_rows_at_under_and_above_them() -> None:
    diff = diffing.diff_documents(
        OLD_SPEC,
        NEW_SPEC,
        locked_fields=["limits.max_tokens", "/triggers/0/type"],
        enforced_fields=["/model"],
    )
    marks = {r.path: (r.locked, r.enforced, r.notes) for r in diff.rows}
    assert marks["/limits/max_tokens"] == (True, False, ("locked: limits.max_tokens",))
    # The whole triggers list was added: it holds the locked /triggers/0/type.
    assert marks["/triggers"] == (True, False, ("locked: /triggers/0/type",))
    assert marks["/model/name"] == (False, True, ("enforced: /model",))
    assert marks["/limits/max_cost_usd"] == (False, False, ())
    assert diff.summary()["locked"] == 2
    assert diff.summary()["enforced"] == 1
    # The marks are part of the hash: locking a field is a different diff.
    assert diff.diff_hash != diffing.diff_documents(OLD_SPEC, NEW_SPEC).diff_hash


def test_hash_is_sha256_of_the_rfc8785_json_of_identities_and_rows() -> None:
    diff = diffing.diff_documents(OLD_SPEC, NEW_SPEC, locked_fields=["limits"])
    doc = {
        "format": diffing.FORMAT,
        "kind": "documents",
        "old": {"document": "sha256:" + hashlib.sha256(rfc8785.dumps(OLD_SPEC)).hexdigest()},
        "new": {"document": "sha256:" + hashlib.sha256(rfc8785.dumps(NEW_SPEC)).hexdigest()},
        "rows": [r.as_dict() for r in diff.rows],
    }
    assert diff.diff_hash == "sha256:" + hashlib.sha256(rfc8785.dumps(doc)).hexdigest()


def test_bundle_hash_is_sha256_of_the_rfc8785_json_too() -> None:
    old = {"a.rego": 'x\n\u00e9\U0001f600 "q"\n'.encode(), "data.json": b'{"k": 0.1, "n": 1e300}'}
    new = {"a.rego": b"y\n", "data.json": b'{"k": 0.2, "n": 2}'}
    diff = diffing.diff_bundles(old, new, old_digest=D0, new_digest=D1)
    doc = {
        "format": diffing.FORMAT,
        "kind": "bundles",
        "old": {"bundle_digest": D0},
        "new": {"bundle_digest": D1},
        "rows": [r.as_dict() for r in diff.rows],
    }
    assert diff.diff_hash == "sha256:" + hashlib.sha256(rfc8785.dumps(doc)).hexdigest()


def test_numbers_compare_by_value_and_equal_subtrees_give_no_rows() -> None:
    diff = diffing.diff_documents(
        {"a": 1, "b": {"c": [1, {"d": 2}]}}, {"a": 1.0, "b": {"c": [1, {"d": 2}]}}
    )
    assert diff.rows == ()
    diff = diffing.diff_documents([1, 2, 3], [1, 3])
    assert rows_of(diff) == [("/1", "removed", 2, None)]
    diff = diffing.diff_documents({"a": {"b": 1}}, {"a": [1]})
    assert rows_of(diff) == [("/a", "changed", {"b": 1}, [1])]


def test_hash_is_the_same_in_another_process() -> None:
    code = (
        "from tests.unit.test_diffing import OLD_SPEC, NEW_SPEC\n"
        "from libs.diffing import diff_documents\n"
        "print(diff_documents(OLD_SPEC, NEW_SPEC, locked_fields=['limits']).diff_hash)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)},
    )
    here = diffing.diff_documents(OLD_SPEC, NEW_SPEC, locked_fields=["limits"]).diff_hash
    assert out.stdout.strip() == here


def test_a_value_json_cannot_carry_exactly_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match="diff_value_unsupported"):
        diffing.diff_documents({"a": 1}, {"a": 2**60})


def _bundle() -> dict[str, bytes]:
    return directory_files(REPO / "policy-bundle", revision="1")


def test_bundles_diff_files_lines_and_data_with_policy_notes() -> None:
    old = _bundle()
    new = dict(old)
    token = new["policies/token_limit.rego"]
    new["policies/token_limit.rego"] = token.replace(b"10000)", b"20000)") + b"# new line\n"
    new["data.json"] = b'{"missioncontrol": {"config": {"defaults": {"max_tokens_per_run": 5}}}}'
    new["tests/extra_test.rego"] = b"package x\n\ntest_x if true\n"
    new["runbooks/blob.bin"] = b"\xff\xfe\x00"
    del new["runbooks/run_state.md"]
    new["lib/config.rego"] = old["lib/config.rego"] + b"# lib\n"
    diff = diffing.diff_bundles(old, new, old_digest=D0, new_digest=D1, locked=["token_limit"])

    files = [(r.section, r.change) for r in diff.rows if r.kind == "file"]
    assert files == [
        ("data.json", "changed"),
        ("lib/config.rego", "changed"),
        ("policies/token_limit.rego", "changed"),
        ("runbooks/blob.bin", "added"),
        ("runbooks/run_state.md", "removed"),
        ("tests/extra_test.rego", "added"),
    ]
    token_rows = [r for r in diff.rows if r.section == "policies/token_limit.rego"]
    assert [(r.kind, r.change, r.old_line, r.new_line, r.new) for r in token_rows[1:]] == [
        ("line", "changed", 30, 30, 'limit := config.setting("max_tokens_per_run", 20000)'),
        ("line", "added", None, 49, "# new line"),
    ]
    assert all(r.policies == ("token_limit",) and r.enforced and r.locked for r in token_rows)
    assert "defines policies: token_limit" in token_rows[0].notes
    assert "locked: token_limit" in token_rows[0].notes

    data = [r for r in diff.rows if r.section == "data.json" and r.kind == "value"]
    assert [(r.path, r.change) for r in data] == [
        ("/missioncontrol/config/defaults/admission_required", "removed"),
        ("/missioncontrol/config/defaults/max_cost_usd_per_run", "removed"),
        ("/missioncontrol/config/defaults/max_tokens_per_run", "changed"),
        ("/missioncontrol/config/defaults/model_allowlist", "removed"),
        ("/missioncontrol/config/defaults/tool_allowlist", "removed"),
        ("/missioncontrol/config/tenants", "removed"),
    ]
    assert all(r.enforced and not r.locked for r in data)
    lib = [r for r in diff.rows if r.section == "lib/config.rego"]
    assert lib[0].enforced and lib[0].notes == ("library module: missioncontrol.lib.config",)
    test_rows = [r for r in diff.rows if r.section == "tests/extra_test.rego"]
    assert not any(r.enforced for r in test_rows)
    assert [r.kind for r in diff.rows if r.section == "runbooks/blob.bin"] == ["file"]
    removed = [r for r in diff.rows if r.section == "runbooks/run_state.md"]
    assert {r.change for r in removed} == {"removed"} and len(removed) > 5
    assert diff.summary()["files"] == {"added": 2, "removed": 1, "changed": 3}
    assert diff.old == {"bundle_digest": D0} and diff.new == {"bundle_digest": D1}


def test_policy_ids_come_from_metadata_and_the_metadata_rule() -> None:
    text = _bundle()["policies/cost_cap.rego"].decode()
    assert diffing.policy_ids(text) == ("cost_cap",)
    assert diffing.policy_ids("package x\n") == ()


def test_side_by_side_renders_left_and_right_cells() -> None:
    old = {"a.rego": b"one\ntwo\nthree\n", "v.json": b'{"k": [1, 2]}'}
    new = {"a.rego": b"one\n2\nthree\nfour\n", "v.json": b'{"k": [1, 3]}'}
    diff = diffing.diff_bundles(old, new, old_digest=D0, new_digest=D1)
    shown = [diffing.render(r, i, "side-by-side") for i, r in enumerate(diff.rows)]
    cells = [(s["kind"], s["change"], s["left"], s["right"]) for s in shown]
    assert cells[1] == (
        "line",
        "changed",
        {"line": 2, "text": "two", "truncated": False},
        {"line": 2, "text": "2", "truncated": False},
    )
    assert cells[2] == ("line", "added", None, {"line": 4, "text": "four", "truncated": False})
    assert cells[4] == (
        "value",
        "changed",
        {"line": None, "text": "2", "truncated": False},
        {"line": None, "text": "3", "truncated": False},
    )
    structured = diffing.render(diff.rows[4], 4, "structured")
    assert (structured["path"], structured["old"], structured["new"]) == ("/k/1", 2, 3)


def test_a_huge_value_is_shown_by_size_and_hash() -> None:
    big = {"blob": "x" * 100_000}
    diff = diffing.diff_documents({}, big)
    row = diffing.render(diff.rows[0], 0, "structured")
    assert row["truncated"] is True
    assert row["new"]["$truncated"]["bytes"] == 100_002
    side = diffing.render(diff.rows[0], 0, "side-by-side")
    assert side["right"] == {"line": None, "text": None, "truncated": True}


def _wide(n: int) -> diffing.Diff:
    return diffing.diff_documents({f"k{i:05d}": i for i in range(n)}, {})


def test_pages_cover_every_row_once_in_order_across_views() -> None:
    diff = _wide(250)
    seen: list[int] = []
    cursor = None
    views = ["structured", "side-by-side"]
    for n in range(10):
        page = diffing.page(diff, cursor=cursor, limit=100, view=views[n % 2])  # type: ignore[arg-type]
        assert page["total"] == 250 and page["offset"] == len(seen)
        seen += [r["index"] for r in page["rows"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(250))
    assert n == 2


def test_page_boundaries() -> None:
    diff = _wide(100)
    exact = diffing.page(diff, cursor=None, limit=100, view="structured")
    assert len(exact["rows"]) == 100 and exact["next_cursor"] is None
    first = diffing.page(diff, cursor=None, limit=99, view="structured")
    last = diffing.page(diff, cursor=first["next_cursor"], limit=99, view="structured")
    assert [r["index"] for r in last["rows"]] == [99] and last["next_cursor"] is None
    one = diffing.page(diff, cursor=None, limit=1, view="structured")
    assert [r["index"] for r in one["rows"]] == [0]
    empty = diffing.diff_documents({"a": 1}, {"a": 1})
    nothing = diffing.page(empty, cursor=None, limit=10, view="structured")
    assert nothing["rows"] == [] and nothing["next_cursor"] is None


def test_a_page_stops_at_its_byte_budget() -> None:
    diff = diffing.diff_documents({}, {f"k{i}": "y" * 4000 for i in range(1000)})
    page = diffing.page(diff, cursor=None, limit=1000, view="structured")
    assert 200 < len(page["rows"]) < 1000
    assert page["next_cursor"] is not None


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64!",
        diffing.encode_cursor("sha256:" + "f" * 64, 3),  # another diff's
        diffing.encode_cursor("", 5).replace("A", "B"),
        "x" * 65,
    ],
)
def test_a_bad_cursor_is_refused_by_name(cursor: str) -> None:
    diff = _wide(10)
    with pytest.raises(InvalidInput, match="diff_cursor_invalid"):
        diffing.page(diff, cursor=cursor, limit=5, view="structured")


def test_a_cursor_past_the_end_and_a_bad_limit_are_refused() -> None:
    diff = _wide(10)
    with pytest.raises(InvalidInput, match="diff_cursor_invalid"):
        diffing.page(
            diff, cursor=diffing.encode_cursor(diff.diff_hash, 11), limit=5, view="structured"
        )
    with pytest.raises(InvalidInput, match="diff_limit_invalid"):
        diffing.page(diff, cursor=None, limit=0, view="structured")
    with pytest.raises(InvalidInput, match="diff_limit_invalid"):
        diffing.page(diff, cursor=None, limit=diffing.MAX_LIMIT + 1, view="structured")


def test_too_many_rows_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diffing, "MAX_ROWS", 50)
    with pytest.raises(TooLarge, match="diff_too_large"):
        _wide(51)
    assert len(_wide(50).rows) == 50


def test_ten_thousand_rows_diff_and_page() -> None:
    old = {f"k{i:05d}": {"v": i} for i in range(10_000)}
    new = {f"k{i:05d}": {"v": i + 1} for i in range(10_000)}
    diff = diffing.diff_documents(old, new)
    assert len(diff.rows) == 10_000
    last = diffing.page(
        diff, cursor=diffing.encode_cursor(diff.diff_hash, 9_990), limit=100, view="side-by-side"
    )
    assert [r["index"] for r in last["rows"]] == list(range(9_990, 10_000))
    assert last["rows"][-1]["path"] == "/k09999/v"


def test_an_acknowledgement_is_recorded_once_per_person() -> None:
    diff = diffing.diff_documents(OLD_SPEC, NEW_SPEC)
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    events = acknowledge(Acknowledgements(), diff, "user:alice", now)
    assert len(events) == 1
    event = events[0]
    assert event.event_type == "policy.diff_acknowledged"
    assert event.model_dump()["diff_hash"] == diff.diff_hash
    state = Acknowledgements((("user:alice", now),))
    assert acknowledge(state, diff, "user:alice", now) == []
    assert len(acknowledge(state, diff, "user:bob", now)) == 1
    assert state.by("user:alice") == now and state.by("user:bob") is None
