"""Exports with hash chains and checkpoint proofs, checked offline: each tampering named."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner, Result

from libs.contracts import envelope_for
from libs.contracts.envelope import EventEnvelope
from libs.eventbus.anchor import (
    CHECKPOINT_STREAM,
    HeadsAt,
    merkle_leaf,
    merkle_root,
    sign_checkpoint,
    signed_message,
)
from libs.eventbus.export import (
    HeadTree,
    end_record,
    event_record,
    header_record,
    line,
    merkle_levels,
    merkle_path,
    proof_records,
    root_from_path,
    verify_export,
)
from libs.eventbus.store import GENESIS, HASH_SCHEME, chain_hash_v2
from libs.runtime.cli import app

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
TENANT = "acme"
RUN = f"{TENANT}/run/r1"
COST = f"{TENANT}/cost/r1"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 9, 31, 100, 333])
def test_every_leafs_audit_path_proves_the_rfc_6962_root(n: int) -> None:
    leaves = [merkle_leaf(f"t/run/{i}", i + 1, bytes([i % 256]) * 32) for i in range(n)]
    root = merkle_root(leaves)
    levels = merkle_levels(leaves)
    assert levels[-1] == [root]
    for i in range(n):
        path = merkle_path(leaves, i)
        assert merkle_path(leaves, i, levels) == path
        assert root_from_path(leaves[i], i, n, path) == root
        if n > 1:
            assert root_from_path(leaves[i], (i + 1) % n, n, path) != root
            assert root_from_path(b"\x00" * 32, i, n, path) != root
    assert root_from_path(leaves[0], n, n, merkle_path(leaves, 0)) is None


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100])
def test_the_head_tree_has_the_checkpoints_root_and_the_same_proofs(n: int) -> None:
    heads = {f"t/run/{i}": (i + 1, bytes([i % 256]) * 32) for i in range(n)}
    tree = HeadTree.of(heads)
    assert tree.root() == HeadsAt(1, heads).root()
    wanted = [*heads, "t/run/absent"]
    assert proof_records(tree, wanted) == proof_records(heads, wanted)


def _stored(stream: str, version: int, position: int, payload: dict[str, Any]) -> EventEnvelope:
    return EventEnvelope(
        event_type="step.recorded",
        schema_version=2,
        tenant_id=stream.split("/")[0],
        stream_id=stream,
        stream_version=version,
        position=position,
        occurred_at=T0 + timedelta(seconds=position),
        recorded_at=T0 + timedelta(seconds=position, microseconds=123),
        correlation_id="c1",
        actor="agent:a1",
        payload=payload,
    )


def _chained(
    plan: list[tuple[str, dict[str, Any]]],
) -> tuple[list[tuple[EventEnvelope, bytes, bytes]], dict[str, tuple[int, bytes]]]:
    """Events of ``plan`` (stream, payload) stored in order, with their links."""
    out = []
    tails: dict[str, tuple[int, bytes]] = {}
    for position, (stream, payload) in enumerate(plan, start=1):
        version, prev = tails.get(stream, (0, GENESIS))
        env = _stored(stream, version + 1, position * 10, payload)
        h = chain_hash_v2(prev, env)
        out.append((env, prev, h))
        tails[stream] = (version + 1, h)
    return out, tails


KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()


def _export(key: Ed25519PrivateKey = KEY, *, late_stream: bool = False) -> list[bytes]:
    """A run's export: 5 run events and 3 cost events, checkpointed after the first 6."""
    plan = [(RUN if i % 3 else COST, {"step_index": i, "text": f"s{i}"}) for i in range(8)]
    events, tails = _chained(plan)
    # The checkpoint covers both streams at their state after the 6th event, plus other streams.
    at_cp: dict[str, tuple[int, bytes]] = {}
    for env, _, h in events[:6]:
        at_cp[env.stream_id] = (env.stream_version, h)
    heads = {**at_cp, **{f"other/run/{i}": (i + 1, bytes([i]) * 32) for i in range(6)}}
    streams = [RUN, COST]
    if late_stream:
        streams.append(f"{TENANT}/incident/i1")
        late, _ = _chained([(f"{TENANT}/incident/i1", {"n": 1})])
        env, prev, h = late[0]
        late_env = env.model_copy(update={"position": 1000})
        h = chain_hash_v2(prev, late_env)
        events.append((late_env, prev, h))
        tails[late_env.stream_id] = (1, h)
    cp = sign_checkpoint(key, 4, HeadsAt(99, heads))
    cp_env = envelope_for(
        cp, tenant_id="system", stream_id=CHECKPOINT_STREAM, correlation_id="anchor-4", actor="a"
    ).model_copy(
        update={"stream_version": 4, "position": 65, "recorded_at": T0 + timedelta(seconds=65)}
    )
    cp_prev = b"\x07" * 32
    lines = [line(header_record("run", "r1", TENANT, T0.isoformat(), streams))]
    lines += [line(event_record(env, prev, h, HASH_SCHEME)) for env, prev, h in events]
    lines.append(
        line(event_record(cp_env, cp_prev, chain_hash_v2(cp_prev, cp_env), 2, "checkpoint"))
    )
    lines += [line(p) for p in proof_records(heads, streams)]
    lines.append(line(end_record(len(events), tails)))
    return lines


def _kinds(lines: list[bytes], key: Ed25519PrivateKey = KEY) -> set[str]:
    return {f.kind for f in verify_export(lines, key.public_key()).findings}


def _rec(b: bytes) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(b)
    return out


def _edit(lines: list[bytes], i: int, change: Callable[[dict[str, Any]], None]) -> list[bytes]:
    rec = _rec(lines[i])
    change(rec)
    return [*lines[:i], line(rec), *lines[i + 1 :]]


def test_an_untouched_export_verifies_with_every_stream_anchored() -> None:
    report = verify_export(_export(), KEY.public_key())
    assert report.ok, report.findings
    assert (report.events, report.streams, report.anchored_streams) == (8, 2, 2)
    assert report.checkpoint_seq == 4


def _set_payload(rec: dict[str, Any]) -> None:
    rec["event"]["payload"]["text"] = "changed"


def _set_actor(rec: dict[str, Any]) -> None:
    rec["event"]["actor"] = "user:mallory"


def _bad_signature(rec: dict[str, Any]) -> None:
    rec["event"]["payload"]["merkle_root"] = "00" * 32


def _bad_path(rec: dict[str, Any]) -> None:
    rec["path"][0] = "ff" * 32


def _bad_index(rec: dict[str, Any]) -> None:
    rec["leaf_index"] = (rec["leaf_index"] + 1) % rec["tree_size"]


def _bad_size(rec: dict[str, Any]) -> None:
    rec["tree_size"] += 1


def _bad_head(rec: dict[str, Any]) -> None:
    rec["head_hash"] = "ab" * 32


def _unanchor(rec: dict[str, Any]) -> None:
    rec.clear()
    rec.update({"kind": "proof", "stream_id": RUN, "anchored": False})


TAMPERS: dict[str, tuple[Callable[[list[bytes]], list[bytes]], str]] = {
    "edited payload": (lambda ls: _edit(ls, 3, _set_payload), "edited_event"),
    "edited actor": (lambda ls: _edit(ls, 5, _set_actor), "edited_event"),
    "edited event after the checkpoint": (lambda ls: _edit(ls, 8, _set_payload), "edited_event"),
    "removed middle event": (lambda ls: [*ls[:3], *ls[4:]], "removed_event"),
    "removed last event": (lambda ls: [*ls[:8], *ls[9:]], "removed_event"),
    "removed checkpointed head": (lambda ls: [*ls[:6], *ls[7:]], "removed_event"),
    "swapped events": (lambda ls: [ls[0], ls[1], ls[3], ls[2], *ls[4:]], "reordered_events"),
    "moved event to the end": (lambda ls: [ls[0], *ls[2:9], ls[1], *ls[9:]], "reordered_events"),
    "removed checkpoint": (lambda ls: [*ls[:9], *ls[10:]], "checkpoint_missing"),
    "forged checkpoint root": (lambda ls: _edit(ls, 9, _bad_signature), "checkpoint_signature"),
    "broken audit path": (lambda ls: _edit(ls, 10, _bad_path), "inclusion_proof"),
    "wrong leaf index": (lambda ls: _edit(ls, 10, _bad_index), "inclusion_proof"),
    "wrong tree size": (lambda ls: _edit(ls, 11, _bad_size), "inclusion_proof"),
    "changed head hash": (lambda ls: _edit(ls, 10, _bad_head), "inclusion_proof"),
    "proof dropped to unanchored": (lambda ls: _edit(ls, 10, _unanchor), "unanchored"),
    "missing end record": (lambda ls: ls[:-1], "truncated"),
    "cut mid-record": (lambda ls: [*ls[:5], ls[5][: len(ls[5]) // 2]], "truncated"),
    "not an export": (lambda ls: ls[1:], "malformed"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_each_kind_of_tampering_is_detected_and_named(name: str) -> None:
    tamper, kind = TAMPERS[name]
    lines = _export()
    # The indices in TAMPERS assume this layout; fail loudly if it moves.
    assert [_rec(x)["kind"] for x in lines] == [
        "header",
        *["event"] * 8,
        "checkpoint",
        "proof",
        "proof",
        "end",
    ]
    assert _rec(lines[10])["stream_id"] == RUN
    assert kind in _kinds(tamper(lines)), name


def test_a_chain_rewritten_from_the_edit_on_is_caught_by_the_signed_head() -> None:
    """Recompute every hash after an edit: the chain holds, the checkpoint's head does not."""
    lines = _export()
    records = [_rec(x) for x in lines]
    prev = GENESIS
    for rec in records[1:9]:
        if rec["event"]["stream_id"] != RUN:
            continue
        if rec["event"]["stream_version"] == 2:
            rec["event"]["payload"]["text"] = "rewritten"
        env = EventEnvelope.model_validate(rec["event"])
        rec["prev_hash"] = prev.hex()
        prev = chain_hash_v2(prev, env)
        rec["hash"] = prev.hex()
    records[-1]["streams"][RUN]["hash"] = prev.hex()
    kinds = _kinds([line(r) for r in records])
    assert kinds == {"edited_event"}
    found = verify_export([line(r) for r in records], KEY.public_key()).findings
    assert any("rewritten" in f.detail for f in found)


def test_a_checkpoint_signed_by_another_key_is_named() -> None:
    found = verify_export(_export(OTHER_KEY), KEY.public_key()).findings
    assert [f.kind for f in found] == ["checkpoint_signature"]
    assert "not the trusted key" in found[0].detail


def test_a_stream_newer_than_the_checkpoint_is_reported_unanchored() -> None:
    report = verify_export(_export(late_stream=True), KEY.public_key())
    assert [f.kind for f in report.findings] == ["unanchored"]
    assert report.anchored_streams == 2


def test_mctl_verify_export_exits_1_naming_the_tampering_and_0_on_the_intact_file(
    tmp_path: Path,
) -> None:
    pub = tmp_path / "signing.pub"
    pub.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    runner = CliRunner()

    def run(lines: list[bytes], *extra: str) -> Result:
        path = tmp_path / "export.ndjson"
        path.write_bytes(b"".join(lines))
        return runner.invoke(app, ["verify-export", str(path), "--public-key", str(pub), *extra])

    ok = run(_export())
    assert ok.exit_code == 0, ok.output
    assert "8 events in 2 streams" in ok.output
    for name, (tamper, kind) in TAMPERS.items():
        got = run(tamper(_export()))
        assert got.exit_code == 1, name
        assert f"BROKEN: {kind}" in got.output, (name, got.output)
    late = _export(late_stream=True)
    assert run(late).exit_code == 1
    allowed = run(late, "--allow-unanchored")
    assert allowed.exit_code == 0, allowed.output
    assert "warning: unanchored" in allowed.output
    no_key = runner.invoke(
        app,
        ["verify-export", str(tmp_path / "export.ndjson"), "--data-dir", str(tmp_path / "none")],
        env={"MC_ANCHOR_PUBLIC_KEY": ""},
    )
    assert no_key.exit_code != 0
    assert "no public key" in no_key.output


def _wide_export(streams: int = 5, events: int = 60, anchored: int = 40) -> list[bytes]:
    """``events`` events over ``streams`` streams, checkpointed after the first ``anchored``."""
    ids = [f"{TENANT}/run/w{i}" for i in range(streams)]
    plan = [(ids[(i * 7) % streams], {"i": i, "text": f"e{i}"}) for i in range(events)]
    chained, tails = _chained(plan)
    heads = {env.stream_id: (env.stream_version, h) for env, _, h in chained[:anchored]}
    heads.update({f"other/run/{i}": (1, bytes([i]) * 32) for i in range(9)})
    cp = sign_checkpoint(KEY, 7, HeadsAt(500, heads))
    cp_env = envelope_for(
        cp, tenant_id="system", stream_id=CHECKPOINT_STREAM, correlation_id="anchor-7", actor="a"
    ).model_copy(
        update={"stream_version": 7, "position": 9999, "recorded_at": T0 + timedelta(hours=1)}
    )
    out = [line(header_record("run", "w", TENANT, T0.isoformat(), ids))]
    out += [line(event_record(env, prev, h, HASH_SCHEME)) for env, prev, h in chained]
    out.append(line(event_record(cp_env, GENESIS, chain_hash_v2(GENESIS, cp_env), 2, "checkpoint")))
    out += [line(p) for p in proof_records(heads, ids)]
    out.append(line(end_record(len(chained), tails)))
    return out


def test_a_battery_of_random_tamperings_is_each_detected_and_named() -> None:
    """300 tamperings of 10 kinds at random places of a 60-event, 5-stream export."""
    rng = random.Random(10)
    base = _wide_export()
    assert verify_export(base, KEY.public_key()).ok
    first_event, n_events = 1, 60
    proofs = range(first_event + n_events + 1, len(base) - 1)

    def any_event() -> int:
        return rng.randrange(first_event, first_event + n_events)

    def edit_field(ls: list[bytes]) -> list[bytes]:
        field = rng.choice(["payload", "actor", "occurred_at", "correlation_id"])

        def change(rec: dict[str, Any]) -> None:
            if field == "payload":
                rec["event"]["payload"]["text"] += "!"
            elif field == "occurred_at":
                rec["event"]["occurred_at"] = "2020-01-01T00:00:00Z"
            else:
                rec["event"][field] = "x" + rec["event"][field]

        return _edit(ls, any_event(), change)

    def swap(ls: list[bytes]) -> list[bytes]:
        i = any_event()
        j = i + 1 if i + 1 < first_event + n_events else i - 1
        out = list(ls)
        out[i], out[j] = out[j], out[i]
        return out

    def drop(ls: list[bytes]) -> list[bytes]:
        i = any_event()
        return [*ls[:i], *ls[i + 1 :]]

    def cut(ls: list[bytes]) -> list[bytes]:
        data = b"".join(ls)
        at = rng.randrange(len(ls[0]) + 1, len(data) - 2)
        kept = data[:at]
        return [x + b"\n" for x in kept.split(b"\n")[:-1]] + [kept.split(b"\n")[-1]]

    def forge(ls: list[bytes]) -> list[bytes]:
        key = rng.choice(["merkle_root", "events", "streams", "horizon_xid"])

        def change(rec: dict[str, Any]) -> None:
            p = rec["event"]["payload"]
            p[key] = (
                "00" * 32
                if key == "merkle_root"
                else (str(int(p[key]) + 1) if key == "horizon_xid" else p[key] + 1)
            )

        return _edit(ls, first_event + n_events, change)

    def proof_path(ls: list[bytes]) -> list[bytes]:
        def change(rec: dict[str, Any]) -> None:
            k = rng.randrange(len(rec["path"]))
            rec["path"][k] = f"{rng.getrandbits(256):064x}"

        return _edit(ls, rng.choice(proofs), change)

    def proof_index(ls: list[bytes]) -> list[bytes]:
        def change(rec: dict[str, Any]) -> None:
            rec["leaf_index"] = (rec["leaf_index"] + rng.randrange(1, rec["tree_size"])) % rec[
                "tree_size"
            ]

        return _edit(ls, rng.choice(proofs), change)

    def wrong_key(ls: list[bytes]) -> list[bytes]:
        def change(rec: dict[str, Any]) -> None:
            p = rec["event"]["payload"]
            p["signature"] = OTHER_KEY.sign(signed_message(p)).hex()

        return _edit(ls, first_event + n_events, change)

    def drop_checkpoint(ls: list[bytes]) -> list[bytes]:
        i = first_event + n_events
        return [*ls[:i], *ls[i + 1 :]]

    battery: dict[str, tuple[Callable[[list[bytes]], list[bytes]], set[str]]] = {
        "edit": (edit_field, {"edited_event"}),
        "swap": (swap, {"reordered_events"}),
        "drop": (drop, {"removed_event"}),
        "cut": (cut, {"truncated"}),
        "forge": (forge, {"checkpoint_signature"}),
        "path": (proof_path, {"inclusion_proof"}),
        "index": (proof_index, {"inclusion_proof"}),
        "wrong_key": (wrong_key, {"checkpoint_signature"}),
        "no_checkpoint": (drop_checkpoint, {"checkpoint_missing"}),
        "reorder_far": (
            lambda ls: [ls[0], *ls[2 : 1 + n_events], ls[1], *ls[1 + n_events :]],
            {"reordered_events"},
        ),
    }
    tried = detected = named = 0
    for round_ in range(30):
        for name, (tamper, kinds) in battery.items():
            tampered = tamper(base)
            if tampered == base:
                continue
            tried += 1
            found = {f.kind for f in verify_export(tampered, KEY.public_key()).findings}
            detected += bool(found)
            named += bool(found & kinds)
            assert found & kinds, (round_, name, found)
    print(f"export tampering: {tried} tried, {detected} detected, {named} named")
    assert tried == detected == named == 300


@pytest.mark.parametrize("command", ["status", "download"])
def test_mctl_export_refuses_what_is_no_job_id_before_asking_the_gateway(
    command: str, tmp_path: Path
) -> None:
    """``..`` in a job id would reach another route (``/v1/exports/../runs`` is ``/v1/runs``)."""
    out = tmp_path / "out.ndjson"
    extra = ["-o", str(out)] if command == "download" else []
    got = CliRunner().invoke(
        app,
        ["export", command, "../runs", *extra, "--url", "http://127.0.0.1:9", "--api-key", "k"],
    )
    assert got.exit_code == 1, got.output
    assert "'../runs' is not an export job id" in got.output
    assert not out.exists()


def _download_from_one_line_peer(
    tmp_path: Path, then: Callable[[socket.socket], None], join_s: float
) -> Result:
    """``mctl export download`` from a peer that announces 100,000 bytes, sends one line of 19
    and then does ``then`` with the connection (closes it when ``then`` returns)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b'Content-Length: 100000\r\n\r\n{"kind": "header"}\n'
            )
            then(conn)

    server = threading.Thread(target=serve)
    server.start()
    job_id = "0193e1a0-0000-7000-8000-000000000000"
    out = tmp_path / "out.ndjson"
    url = f"http://127.0.0.1:{port}"
    try:
        return CliRunner().invoke(
            app, ["export", "download", job_id, "-o", str(out), "--url", url, "--api-key", "k"]
        )
    finally:
        server.join(timeout=join_s)
        listener.close()


def test_a_download_cut_short_leaves_neither_the_file_nor_its_partial(tmp_path: Path) -> None:
    """A peer that closes the connection before the length it announced has been sent."""
    got = _download_from_one_line_peer(tmp_path, lambda conn: None, join_s=10)
    assert got.exit_code == 1, got.output
    assert "error:" in got.output
    assert list(tmp_path.iterdir()) == []


def test_a_download_from_a_gateway_gone_silent_ends_with_an_error_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer sends the headers and a first line, then holds the connection open, sending
    nothing, until the command has given up."""
    from services.gateway import export_cli

    monkeypatch.setattr(export_cli, "DOWNLOAD_IDLE_S", 0.5)
    client_gone = threading.Event()

    def stay_silent(conn: socket.socket) -> None:
        # Silent until the client closes its side (recv answers b"" then), with a deadline so
        # that a client that never gives up fails the test instead of hanging it.
        conn.settimeout(30)
        try:
            if conn.recv(1) == b"":
                client_gone.set()
        except TimeoutError:
            pass

    got = _download_from_one_line_peer(tmp_path, stay_silent, join_s=40)
    assert client_gone.is_set(), "the command held the connection for 30 s"
    assert got.exit_code == 1, got.output
    assert "the gateway sent nothing for 0.5 s after 19 bytes" in got.output
    assert list(tmp_path.iterdir()) == []
