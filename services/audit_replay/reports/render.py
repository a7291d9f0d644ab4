"""Renderers of a :class:`~services.audit_replay.reports.model.Report`: Markdown, HTML and PDF.

* Text is always escaped for the target (Markdown punctuation, HTML entities, reportlab's
  paragraph markup); control characters are dropped.
* Charts are drawn by matplotlib's ``Agg`` backend into PNGs without timestamps; the PDF is
  written by reportlab in its invariant mode (no creation date, a fixed document id), so the same
  report renders to the same bytes.
* Figures show their values; the event ids they were counted from are listed in an appendix
  ("Appendix: event ids"), figure by figure, so every number can be traced to the log.
"""

from __future__ import annotations

import base64
import html
import io
import re
from xml.sax.saxutils import escape as xml_escape

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.platypus import (
    Flowable,
    Image,
    PageBreak,
    SimpleDocTemplate,
    Spacer,
)
from reportlab.platypus import Paragraph as PdfParagraph
from reportlab.platypus import Table as PdfTable
from reportlab.platypus import TableStyle as PdfTableStyle

from services.audit_replay.reports.model import (
    BarChart,
    Block,
    Figure,
    KeyFigures,
    Paragraph,
    Report,
    Section,
    Table,
)

APPENDIX = "Appendix: event ids"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|<>~])")
_MD_LEADING = re.compile(r"^([#+\-=])")


def clean(text: str) -> str:
    """``text`` without control characters or lone surrogates."""
    return _CONTROL.sub("", text)


def _figures_with_ids(report: Report) -> list[tuple[str, Figure]]:
    out = []
    for s in report.sections:
        for b in s.blocks:
            if isinstance(b, KeyFigures):
                out += [(s.heading, f) for f in b.figures if f.event_ids]
    return out


def chart_png(chart: BarChart) -> bytes:
    """The chart as a PNG (no timestamp in its metadata)."""
    fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=100)
    try:
        labels = [clean(x) for x in chart.labels] or ["(none)"]
        values = list(chart.values) or [0.0]
        ax.bar(range(len(values)), values, color="#3b6ea5")
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20 if len(labels) > 4 else 0)
        ax.set_title(clean(chart.title), fontsize=10)
        if chart.y_label:
            ax.set_ylabel(clean(chart.y_label), fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)


# --- Markdown ------------------------------------------------------------------------------------


def md_escape(text: str) -> str:
    """``text`` with Markdown's punctuation escaped and newlines folded."""
    escaped = _MD_SPECIAL.sub(r"\\\1", clean(text)).replace("\n", " ")
    return _MD_LEADING.sub(r"\\\1", escaped)


def _md_table(columns: tuple[str, ...], rows: tuple[tuple[str, ...], ...]) -> list[str]:
    lines = ["| " + " | ".join(md_escape(c) for c in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [md_escape(block.text), ""]
    if isinstance(block, KeyFigures):
        return [f"- **{md_escape(f.label)}:** {md_escape(f.value)}" for f in block.figures] + [""]
    if isinstance(block, Table):
        caption = [f"*{md_escape(block.caption)}*", ""] if block.caption else []
        return [*caption, *_md_table(block.columns, block.rows), ""]
    rows = tuple((label, f"{v:g}") for label, v in zip(block.labels, block.values, strict=True))
    return [f"*{md_escape(block.title)}*", "", *_md_table(("", block.y_label or "value"), rows), ""]


def to_markdown(report: Report) -> str:
    """The report as CommonMark."""
    lines = [f"# {md_escape(report.title)}", ""]
    lines += [md_escape(s) + "  " for s in report.subtitle] + [""]
    for section in report.sections:
        lines += [f"## {md_escape(section.heading)}", ""]
        for block in section.blocks:
            lines += _md_block(block)
    ids = _figures_with_ids(report)
    if ids:
        lines += [f"## {APPENDIX}", ""]
        for heading, f in ids:
            lines.append(f"- {md_escape(heading)}, {md_escape(f.label)}: {', '.join(f.event_ids)}")
        lines.append("")
    return "\n".join(lines)


# --- HTML ----------------------------------------------------------------------------------------


def _h(text: str) -> str:
    return html.escape(clean(text), quote=True)


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_h(block.text)}</p>"
    if isinstance(block, KeyFigures):
        items = "".join(f"<dt>{_h(f.label)}</dt><dd>{_h(f.value)}</dd>" for f in block.figures)
        return f'<dl class="figures">{items}</dl>'
    if isinstance(block, Table):
        head = "".join(f"<th>{_h(c)}</th>" for c in block.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in block.rows
        )
        cap = f"<caption>{_h(block.caption)}</caption>" if block.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    png = base64.b64encode(chart_png(block)).decode()
    return f'<figure><img alt="{_h(block.title)}" src="data:image/png;base64,{png}"></figure>'


def to_html(report: Report) -> str:
    """The report as a standalone HTML page (charts embedded as data URIs)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_h(report.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
        "dl.figures{display:grid;grid-template-columns:max-content auto;gap:2px 1em}"
        "dd{margin:0}</style></head><body>",
        f"<h1>{_h(report.title)}</h1>",
        *(f'<p class="subtitle">{_h(s)}</p>' for s in report.subtitle),
    ]
    for section in report.sections:
        parts.append(f"<section><h2>{_h(section.heading)}</h2>")
        parts += [_html_block(b) for b in section.blocks]
        parts.append("</section>")
    ids = _figures_with_ids(report)
    if ids:
        items = "".join(
            f"<li>{_h(h)}, {_h(f.label)}: <code>{_h(', '.join(f.event_ids))}</code></li>"
            for h, f in ids
        )
        parts.append(f"<section><h2>{_h(APPENDIX)}</h2><ul>{items}</ul></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- PDF -----------------------------------------------------------------------------------------

_STYLES = getSampleStyleSheet()
_BODY = _STYLES["BodyText"]
_SMALL = ParagraphStyle("small", parent=_BODY, fontSize=7, leading=9)
_CELL = ParagraphStyle("cell", parent=_BODY, fontSize=8, leading=10)


def _p(text: str, style: ParagraphStyle = _BODY) -> PdfParagraph:
    return PdfParagraph(xml_escape(clean(text)), style)


def _pdf_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> PdfTable:
    data = [[_p(c, _CELL) for c in columns]] + [[_p(c, _CELL) for c in r] for r in rows]
    table = PdfTable(data, repeatRows=1, hAlign="LEFT")
    table.setStyle(
        PdfTableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.4, colors.grey),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e6ecf3")),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ]
        )
    )
    return table


def _pdf_block(block: Block) -> list[Flowable]:
    if isinstance(block, Paragraph):
        return [_p(block.text)]
    if isinstance(block, KeyFigures):
        return [_pdf_table(("Figure", "Value"), [(f.label, f.value) for f in block.figures])]
    if isinstance(block, Table):
        caption = [_p(block.caption, _SMALL)] if block.caption else []
        rows = list(block.rows) or [tuple("" for _ in block.columns)]
        return [*caption, _pdf_table(block.columns, rows)]
    png = chart_png(block)
    return [Image(io.BytesIO(png), width=16 * cm, height=7 * cm)]


def to_pdf(report: Report) -> bytes:
    """The report as a PDF (A4, invariant: the same report gives the same bytes)."""
    story: list[Flowable] = [_p(report.title, _STYLES["Title"])]
    story += [_p(s) for s in report.subtitle]
    for section in report.sections:
        story += [Spacer(1, 0.3 * cm), _p(section.heading, _STYLES["Heading2"])]
        for block in section.blocks:
            story += [*_pdf_block(block), Spacer(1, 0.2 * cm)]
    ids = _figures_with_ids(report)
    if ids:
        story += [PageBreak(), _p(APPENDIX, _STYLES["Heading2"])]
        for heading, f in ids:
            story.append(_p(f"{heading}, {f.label} ({len(f.event_ids)}):", _CELL))
            story.append(_p(", ".join(f.event_ids), _SMALL))
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        title=clean(report.title),
        author="Mission Control",
        invariant=1,
        leftMargin=2 * cm,
        rightMargin=2 * cm,
    )
    doc.build(story)
    return buf.getvalue()


def render(report: Report, fmt: str) -> bytes:
    """The report in ``fmt`` (md, html, pdf) as bytes."""
    if fmt == "pdf":
        return to_pdf(report)
    if fmt == "html":
        return to_html(report).encode()
    return to_markdown(report).encode()


__all__ = ["APPENDIX", "Section", "chart_png", "render", "to_html", "to_markdown", "to_pdf"]
