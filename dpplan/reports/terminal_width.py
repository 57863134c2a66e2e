"""Fitting the terminal tables to the terminal's width, never by cutting what they say.

rich shrinks a table wider than the console by wrapping, then by ellipsising every column
alike ("fsd…", "opti…"), so at 80 columns the strategy names and peaks were cut. The tables
here are offered as a list of layouts, widest first (the full table, then tighter spacing and
two-line headers, then fewer or split tables), and the first whose natural width fits is
printed; no cell is ever shortened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.text import Text

TABLE_WIDTH = 120
"""The least width of the tables when the output is not a terminal (a pipe, a file, a test's
CliRunner), where rich would assume 80 or take an exported COLUMNS: such output stays as it
was, whatever the environment exports."""
UNBOUNDED_WIDTH = 10_000
"""A width no table reaches: measuring at it gives a table's natural (unwrapped) width."""
PART_SEPARATOR = " · "


def report_console() -> Console:
    """The console the tables print to: a terminal's width (rich reads COLUMNS, else asks the
    terminal); at least TABLE_WIDTH for a pipe or a file."""
    console = Console()
    if not console.is_terminal and console.width < TABLE_WIDTH:
        console = Console(width=TABLE_WIDTH)
    return console


def natural_width(console: Console, renderable: RenderableType) -> int:
    """The width ``renderable`` takes when nothing constrains it (cells on one line)."""
    return Measurement.get(console, console.options.update_width(UNBOUNDED_WIDTH), renderable).maximum


class TableLayout(NamedTuple):
    """One way to print a table: as one or more tables one after the other, and a line that
    says what this way leaves out (None: nothing)."""

    tables: tuple[RenderableType, ...]
    note: str | None = None


def first_that_fits(console: Console, layouts: Sequence[TableLayout]) -> TableLayout:
    """The first layout whose every table fits the console's width; the last one (the
    narrowest) when none does."""
    for layout in layouts:
        if all(natural_width(console, table) <= console.width for table in layout.tables):
            return layout
    return layouts[-1]


def print_layout(console: Console, layout: TableLayout) -> None:
    for table in layout.tables:
        console.print(table)
    if layout.note:
        console.print(layout.note, style="dim", highlight=False)


def pack_parts(line: str, width: int, separator: str = PART_SEPARATOR) -> list[str]:
    """``a · b · c`` (rich markup) as lines of at most ``width`` cells, broken only between
    parts, so that no part ("tensor parallel 2 + sequence parallel") is split across lines. A
    part wider than ``width`` keeps a line of its own (rich then wraps it at its spaces)."""
    ending = separator.rstrip()  # a broken line ends in " ·": the line goes on
    parts = line.split(separator)
    lines: list[str] = []
    current = ""
    for index, part in enumerate(parts):
        candidate = f"{current}{separator}{part}" if current else part
        room = width - (0 if index == len(parts) - 1 else len(ending))
        if current and Text.from_markup(candidate).cell_len > room:
            lines.append(current + ending)
            candidate = part
        current = candidate
    lines.append(current)
    return lines


def print_parts(console: Console, line: str) -> None:
    """One header line of `` · ``-separated parts, broken between parts to fit the console."""
    for piece in pack_parts(line, console.width):
        console.print(piece, highlight=False)
