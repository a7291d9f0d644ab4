"""The report renderers: the same content in Markdown, HTML and PDF, text escaped, output
deterministic, every figure's event ids in the appendix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.audit_replay.reports.model import (
    BarChart,
    Figure,
    KeyFigures,
    Paragraph,
    Report,
    Section,
    Table,
)
from services.audit_replay.reports.render import APPENDIX, chart_png, to_html, to_markdown, to_pdf

pytestmark = pytest.mark.unit

HOSTILE = "<script>alert(1)</script> | *bold* & \x00[link](x)"


def report() -> Report:
    return Report(
        title="Evidence <T>",
        subtitle=("Tenant: acme",),
        sections=(
            Section(
                "CC6.1 Logical access",
                (
                    Paragraph(HOSTILE),
                    KeyFigures((Figure("Denials", "2", ("e-1", "e-2")), Figure("Keys", "0"))),
                    Table(("a", "b"), ((HOSTILE, "2"),), caption="records"),
                    BarChart("by policy", ("p1", "p2"), (2.0, 1.0), y_label="count"),
                ),
            ),
        ),
    )


def test_html_escapes_every_text() -> None:
    page = to_html(report())
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "\x00" not in page
    assert 'src="data:image/png;base64,' in page
    assert f"<h2>{APPENDIX}</h2>" in page and "e-1, e-2" in page


def test_markdown_escapes_markup_and_lists_event_ids() -> None:
    md = to_markdown(report())
    assert "\\<script\\>" in md and "\\*bold\\*" in md and "\\|" in md
    assert "- **Denials:** 2" in md
    assert "CC6.1 Logical access, Denials: e-1, e-2" in md
    assert "Keys:" not in md.split(APPENDIX)[1]  # a figure without ids is not in the appendix


def test_pdf_is_deterministic_and_readable(tmp_path: Path) -> None:
    pdf = to_pdf(report())
    assert pdf == to_pdf(report())
    path = tmp_path / "r.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout
    assert "CC6.1 Logical access" in text and "<script>alert(1)</script>" in text
    assert APPENDIX in text and "e-1, e-2" in text


def test_chart_png_is_deterministic() -> None:
    chart = BarChart("c", ("x",), (1.0,))
    png = chart_png(chart)
    assert png.startswith(b"\x89PNG") and png == chart_png(chart)
    assert chart_png(BarChart("empty", (), ())).startswith(b"\x89PNG")
