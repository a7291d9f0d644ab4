"""A small document model for reports: sections of paragraphs, key figures, tables and charts.

The evidence, debrief and attestation documents are built as a :class:`Report` and rendered by
:mod:`services.audit_replay.reports.render` to Markdown, HTML and PDF, so the three formats always
hold the same content. Every figure may name the event ids it was counted from.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    """Plain text (never markup: every renderer escapes it)."""

    text: str


@dataclass(frozen=True)
class Figure:
    """One key figure: a label, its value, and the event ids it was counted from."""

    label: str
    value: str
    event_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyFigures:
    """A block of key figures."""

    figures: tuple[Figure, ...]


@dataclass(frozen=True)
class Table:
    """A table of text cells."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class BarChart:
    """A bar chart of labelled values (rendered with matplotlib as a PNG)."""

    title: str
    labels: tuple[str, ...]
    values: tuple[float, ...]
    y_label: str = ""


Block = Paragraph | KeyFigures | Table | BarChart


@dataclass(frozen=True)
class Section:
    """A heading and its blocks."""

    heading: str
    blocks: tuple[Block, ...] = ()


@dataclass(frozen=True)
class Report:
    """A titled document: subtitle lines (tenant, period, ...) then sections."""

    title: str
    subtitle: tuple[str, ...] = ()
    sections: tuple[Section, ...] = field(default_factory=tuple)
