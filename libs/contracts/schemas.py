"""JSON Schemas of every event (type, version), exported to ``libs/contracts/schemas/``.

The checked-in files are the published contract. ``tests/unit/test_contracts.py`` fails when a
model's schema no longer matches its file: a change needs a new version, not an edit.
Regenerate after adding a version with ``python -m libs.contracts.schemas``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libs.contracts import events as _events  # noqa: F401 - registers every model
from libs.contracts.registry import all_models

SCHEMA_DIR = Path(__file__).parent / "schemas"


def schema_file_name(event_type: str, version: int) -> str:
    """``run.started`` v2 → ``run.started.v2.json``."""
    return f"{event_type}.v{version}.json"


def schema_for(model: Any) -> dict[str, Any]:
    """The JSON Schema of one event model, with its type and version pinned."""
    schema: dict[str, Any] = model.model_json_schema()
    schema["$id"] = f"urn:missioncontrol:event:{model.event_type}:v{model.schema_version}"
    schema["x-event-type"] = model.event_type
    schema["x-schema-version"] = model.schema_version
    return schema


def render(schema: dict[str, Any]) -> str:
    """Stable text form (sorted keys, trailing newline) so diffs are meaningful."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file; existing files are left untouched (published means frozen)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in all_models():
        path = directory / schema_file_name(model.event_type, model.schema_version)
        if not path.exists():
            path.write_text(render(schema_for(model)))
            written.append(path)
    return written


if __name__ == "__main__":
    for p in export():
        print(f"wrote {p}")
