"""Loading, compiling and evaluating the Rego policy bundle.

A bundle is a directory: Rego modules (``*.rego``, anywhere except ``tests/``) and one
``data.json``. It is compiled once, at load, into a regopy bundle with two entrypoints
(``missioncontrol/main/decision`` and ``missioncontrol/main/policies``); every decision then only
sets the input and runs the precompiled plan, which is 10-50x faster than a plain ``query`` (that
recompiles every module each time).

The digest is a sha256 over the sorted (relative path, content) pairs of the files that make the
bundle, so the same policies and data always have the same digest, wherever they are checked out.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from regopy import Interpreter, RegoError

from libs.contracts.events import PolicyInfo
from libs.errors import PermanentError
from libs.settings import Settings

DECISION_ENTRYPOINT = "missioncontrol/main/decision"
POLICIES_ENTRYPOINT = "missioncontrol/main/policies"
HOOK_ENTRYPOINTS: dict[str, str] = {
    hook: f"missioncontrol/hooks/{hook}/decision"
    for hook in (
        "on_create_attempt",
        "on_review_open",
        "on_promotion_attempt",
        "after_execute",
        "on_policy_update",
    )
}
"""The lifecycle hooks' entrypoints (``before_execute`` is admission's ``decision``). A bundle
that defines none of them still compiles: an undefined hook decides nothing."""
DATA_FILE = "data.json"
TESTS_DIR = "tests"

# The repository (or installed wheel) root holds ``policy-bundle/`` next to ``services/``.
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parents[2] / "policy-bundle"


class BundleError(PermanentError):
    """The policy bundle is missing, unreadable, or does not compile."""

    code = "bundle_invalid"


def bundle_dir_for(settings: Settings | None) -> Path:
    """``settings.policy_bundle_dir`` (``MC_POLICY_BUNDLE``) when set, else the repository's."""
    if settings is not None and settings.policy_bundle_dir is not None:
        return Path(settings.policy_bundle_dir)
    return DEFAULT_BUNDLE_DIR


def bundle_files(root: Path) -> list[tuple[str, str]]:
    """The (relative POSIX path, content) pairs that make the bundle, sorted by path.

    Every ``*.rego`` outside ``tests/`` and the top-level ``data.json``; tests and docs do not
    change what the bundle decides, so they do not change its digest.
    """
    if not root.is_dir():
        raise BundleError(f"policy bundle directory {str(root)!r} does not exist")
    files: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.rego")):
        rel = path.relative_to(root)
        if rel.parts[0] == TESTS_DIR or path.name.endswith("_test.rego"):
            continue
        files.append((rel.as_posix(), path.read_text(encoding="utf-8")))
    data = root / DATA_FILE
    if data.is_file():
        files.append((DATA_FILE, data.read_text(encoding="utf-8")))
    return sorted(files)


def digest_of(files: list[tuple[str, str]]) -> str:
    """``sha256:<hex>`` over the sorted (path, content) pairs.

    Each path and content is length-prefixed, so no two different file sets can hash the same
    bytes by moving text across a boundary.
    """
    h = hashlib.sha256()
    for rel, content in sorted(files):
        for part in (rel.encode(), content.encode()):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return f"sha256:{h.hexdigest()}"


HOOK_DIRS = frozenset({"rules", "hooks"})
"""Top-level directories of the lifecycle hooks' modules: compiled apart from admission's."""


class _Compiled:
    """One regopy interpreter and the plan of its entrypoints."""

    def __init__(
        self,
        root: Path,
        modules: list[tuple[str, str]],
        data_json: str | None,
        entrypoints: list[str],
    ) -> None:
        self.root = root
        self.interp = Interpreter()
        try:
            for rel, src in modules:
                self.interp.add_module(rel, src)
            if data_json is not None:
                self.interp.add_data_json(data_json)
            self.bundle = self.interp.build(None, entrypoints)
        except RegoError as exc:
            raise BundleError(f"policy bundle {str(root)!r} does not compile: {exc}") from exc
        if not self.bundle.ok():
            raise BundleError(f"policy bundle {str(root)!r} does not compile")

    def set_input(self, input_doc: dict[str, Any]) -> None:
        try:
            # JSON text, not ``set_input(dict)``: regopy's dict conversion stores strings
            # unescaped, so a quote in a model name would corrupt the decision's JSON.
            self.interp.set_input_term(orjson.dumps(input_doc).decode())
        except (RegoError, TypeError) as exc:
            raise BundleError(f"input is not a valid Rego document: {exc}") from exc

    def query(self, entrypoint: str) -> Any:
        """The entrypoint's value for the current input (``None`` when undefined)."""
        try:
            output = self.interp.query_bundle_entrypoint(self.bundle, entrypoint)
        except RegoError as exc:
            raise BundleError(f"evaluating {entrypoint} failed: {exc}") from exc
        except json.JSONDecodeError as exc:
            # regopy parses the engine's output string as it builds the Output; the engine
            # renders some computed strings unescaped (see the bundle README), so refuse clearly.
            raise BundleError(f"{entrypoint} produced malformed output: {exc}") from exc
        if not output.ok():
            raise BundleError(f"evaluating {entrypoint} failed: {output}")
        if not output.results or not output.results[0].expressions:
            return None
        return output.results[0].expressions[0]


class PolicyBundle:
    """One compiled bundle and the interpreters that run it.

    Admission's decision is compiled without the lifecycle hooks' modules (``rules/``,
    ``hooks/``): the embedded engine's cost per evaluation grows with every module it holds,
    related or not, and admission is the hot path. The hooks and the policy list are compiled
    from every module.

    Not thread-safe: an interpreter holds the current input. Decisions take well under a
    millisecond, so the service calls :meth:`evaluate` directly on the event loop thread, where
    calls cannot interleave.
    """

    def __init__(
        self, root: Path, files: list[tuple[str, str]], *, digest: str | None = None
    ) -> None:
        self.root = root
        self.digest = digest or digest_of(files)
        self.data: dict[str, Any] = {}
        modules = [(rel, src) for rel, src in files if rel.endswith(".rego")]
        if not modules:
            raise BundleError(f"policy bundle {str(root)!r} has no .rego modules")
        data_json = next((src for rel, src in files if rel == DATA_FILE), None)
        if data_json is not None:
            try:
                self.data = json.loads(data_json)
            except json.JSONDecodeError as exc:
                raise BundleError(f"policy bundle {str(root)!r} does not compile: {exc}") from exc
        admission = [(rel, src) for rel, src in modules if rel.split("/", 1)[0] not in HOOK_DIRS]
        self._admission = _Compiled(root, admission, data_json, [DECISION_ENTRYPOINT])
        self._hooks = _Compiled(
            root, modules, data_json, [POLICIES_ENTRYPOINT, *HOOK_ENTRYPOINTS.values()]
        )
        self.policies = self._load_policies()

    @classmethod
    def load(cls, root: Path) -> PolicyBundle:
        """Read, digest and compile the bundle under ``root``; :class:`BundleError` if invalid."""
        try:
            files = bundle_files(root)
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read policy bundle {str(root)!r}: {exc}") from exc
        return cls(root, files)

    def _load_policies(self) -> list[PolicyInfo]:
        self._hooks.set_input({})
        raw = self._hooks.query(POLICIES_ENTRYPOINT)
        if not isinstance(raw, list) or not raw:
            raise BundleError(f"{POLICIES_ENTRYPOINT} of {str(self.root)!r} lists no policies")
        out: list[PolicyInfo] = []
        for item in raw:
            if not isinstance(item, dict):
                raise BundleError(f"policy metadata {item!r} is not an object")
            try:
                out.append(
                    PolicyInfo(
                        policy_id=item.get("id"),
                        title=item.get("title"),
                        severity=item.get("severity"),
                        runbook_url=item.get("runbook_url"),
                        description=item.get("description"),
                    )
                )
            except ValidationError as exc:
                raise BundleError(f"policy metadata {item!r} is invalid: {exc}") from None
        ids = [p.policy_id for p in out]
        if len(set(ids)) != len(ids):
            raise BundleError(f"policy ids are not unique in {str(self.root)!r}: {sorted(ids)}")
        return sorted(out, key=lambda p: p.policy_id)

    def evaluate(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        """The ``decision`` document (``{"deny": [...], "warn": [...]}``) for one input."""
        self._admission.set_input(input_doc)
        value = self._admission.query(DECISION_ENTRYPOINT)
        if not isinstance(value, dict):
            # An undefined decision must not read as "nothing denied".
            raise BundleError(f"{DECISION_ENTRYPOINT} is undefined for this input")
        return value

    def evaluate_hook(self, hook: str, input_doc: dict[str, Any]) -> dict[str, Any] | None:
        """The lifecycle hook's ``decision`` document for one input; ``None`` when the bundle
        defines nothing for the hook (so it decides nothing)."""
        entrypoint = HOOK_ENTRYPOINTS.get(hook)
        if entrypoint is None:
            raise BundleError(f"no lifecycle hook {hook!r}")
        self._hooks.set_input(input_doc)
        value = self._hooks.query(entrypoint)
        if value is not None and not isinstance(value, dict):
            raise BundleError(f"{entrypoint} is not an object: {value!r}")
        return value


def load_bundle(settings: Settings | None = None, root: Path | None = None) -> PolicyBundle:
    """The bundle under ``root``, else the one ``settings`` names, else the repository's."""
    return PolicyBundle.load(root if root is not None else bundle_dir_for(settings))


BENCH_INPUT: dict[str, Any] = {
    "tenant_id": "bench",
    "run": {
        "run_id": "bench-run",
        "agent_id": "bench-agent",
        "status": "running",
        "steps_recorded": 3,
        "last_step_index": 3,
        "tokens_used": 1200,
        "cost_usd": 0.0123,
        "violated": [],
    },
    "step": {
        "index": 4,
        "kind": "llm_call",
        "model": "gpt-4o",
        "tool": None,
        "estimate": {"input_tokens": 500, "max_output_tokens": 500, "cost_usd": 0.00625},
    },
}


def bench_bare_evaluation(n: int, root: Path | None = None) -> list[float]:
    """Seconds per evaluation of ``n`` bare bundle evaluations (no I/O, no event folding).

    The floor admission latency cannot go below: set the input and run the precompiled decision
    plan of the repository's bundle (or the one under ``root``).
    """
    bundle = PolicyBundle.load(root or DEFAULT_BUNDLE_DIR)
    timings: list[float] = []
    for i in range(n):
        doc = {**BENCH_INPUT, "run": {**BENCH_INPUT["run"], "tokens_used": 1200 + i}}
        start = time.perf_counter()
        bundle.evaluate(doc)
        timings.append(time.perf_counter() - start)
    return timings
