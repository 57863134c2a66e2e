"""The self-contained HTML page every report is: header, sections of text, tables and plotly figures.

The page is a Jinja2 template with autoescaping, so every string from the model file, the
command line or a JSON file is escaped by default; the only markup passed through unescaped is
plotly's own figure ``<div>``/``<script>``, whose JSON plotly writes with ``<``, ``>`` and
``/`` as ``\\u`` escapes. Text drawn *inside* a figure (axis labels, hover text) goes through
``figure_text``: plotly renders a small subset of HTML in labels (``<b>``, ``<a href>``, ...),
so names are entity-escaped to be shown literally, never interpreted.

plotly.js is embedded once, in the page head (about 4.7 MB, so the file opens offline), or
linked from plotly's CDN with ``plotlyjs="cdn"`` for a small file that needs the network.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from functools import lru_cache

import jinja2
import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup

from dpplan import __version__
from dpplan.config import usable_bytes
from dpplan.errors import UsageError
from dpplan.reports.html_settings import PLOTLYJS_MODES
from dpplan.reports.units import GiB

FIGURE_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}
FONT = "system-ui, -apple-system, Segoe UI, Roboto, sans-serif"
# A colour per breakdown category, kept the same in every figure of a report.
CATEGORY_COLORS = {
    "params": "#3b6fb6",
    "grads": "#e08a2c",
    "optimizer": "#5a9e4b",
    "activations": "#c4473a",
    "other": "#8c7bb8",
}
# ... and its name in legends and tables.
CATEGORY_LABELS = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "other": "other (buffers, comm. buffers, CUDA context, allocator)",
}


BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def byte_unit(largest_bytes: float | None) -> tuple[str, int]:
    """The binary unit an axis reaching ``largest_bytes`` reads best in: (name, bytes per unit)."""
    for name, size in BYTE_UNITS:
        if largest_bytes and largest_bytes >= size:
            return name, size
    return "B", 1


def figure_text(value: object) -> str:
    """A user-supplied name made safe to show inside a plotly figure (shown literally).

    Only ``&``, ``<`` and ``>``: with no ``<`` left there is no tag for plotly to interpret, and
    plotly decodes exactly those entities back (it leaves ``&quot;`` as typed)."""
    return html.escape(str(value), quote=False)


@dataclass(frozen=True, kw_only=True)
class Text:
    text: str
    css: str = ""
    kind: str = "text"


@dataclass(frozen=True, kw_only=True)
class Heading:
    text: str
    kind: str = "heading"


@dataclass(frozen=True, kw_only=True)
class Callout:
    """A highlighted box of lines; ``css="bad"`` for a warning."""

    lines: list[str]
    css: str = ""
    kind: str = "callout"


@dataclass(frozen=True, kw_only=True)
class BulletList:
    items: list[str]
    css: str = ""
    kind: str = "list"


@dataclass(frozen=True, kw_only=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: frozenset[int] = frozenset()
    """Indices of right-aligned columns."""
    row_css: list[str] | None = None
    kind: str = "table"


@dataclass(frozen=True, kw_only=True)
class Figure:
    name: str
    """Stable identifier, also the figure's DOM id (``fig-<name>``): tests find figures by it."""
    figure: go.Figure
    caption: str = ""
    kind: str = "figure"


@dataclass(frozen=True, kw_only=True)
class Section:
    title: str
    anchor: str
    blocks: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Page:
    title: str
    model_name: str
    subtitle: str
    header_rows: list[tuple[str, str]]
    sections: list[Section]
    footer: str = ""


LEGEND_BELOW = {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "xanchor": "left", "x": 0}
"""The legend along the figure's bottom edge, under the axis labels: plotly.js reserves the
legend's height below the margins the axes push (its doAutoMargin adds a container-anchored
legend's ``_reservedMargin`` to them), so it meets neither the tick labels nor the modebar,
which plotly draws at the top right. A legend above the plot, as before, ran into the modebar
once its entries wrapped."""


RIGHT_MARGIN = 20
LEVEL_LABEL_MARGIN = 130
"""Pixels right of the plot for a level line's label ("host RAM per rank" over "11.8 GiB")."""


def style_figure(figure: go.Figure, *, height: int = 420) -> go.Figure:
    """The look shared by every figure: white, compact margins (wider on the right for a level
    line's label), legend at the bottom."""
    labelled = any(annotation.name == LEVEL_LABEL for annotation in figure.layout.annotations)
    figure.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": LEVEL_LABEL_MARGIN if labelled else RIGHT_MARGIN, "t": 40, "b": 50},
        font={"family": FONT, "size": 12},
        legend=LEGEND_BELOW,
        hoverlabel={"font": {"family": FONT}},
    )
    return figure


LEVEL_LABEL = "level-label"


def add_level(figure: go.Figure, y: float, label: str, *, color: str = "#b42318", dash: str = "dash") -> None:
    """A dashed line across the plot at ``y`` (the GPU's memory, a limit), labelled in the right
    margin beside its end: inside the plot the label sat on the bars or markers near it."""
    figure.add_hline(y=y, line_dash=dash, line_color=color)
    figure.add_annotation(text=label, name=LEVEL_LABEL, xref="paper", x=1, xanchor="left", xshift=6, y=y, yref="y",
                          yanchor="middle", align="left", showarrow=False, font={"color": color})


def stack_per_gpu_bars(figure: go.Figure, estimates, capacity_name: str) -> None:
    """Lay out a figure of per-GPU breakdown bars: stacked, on a GiB axis, with the capacity
    (and usable) lines when every estimate shares one capacity."""
    capacities = {(e.capacity_bytes, e.headroom_pct) for e in estimates if e.capacity_bytes}
    if len(capacities) == 1:
        add_capacity(figure, *capacities.pop(), capacity_name)
    figure.update_layout(barmode="stack", yaxis_title="per-GPU peak (GiB)", xaxis_tickangle=-45,
                         legend_traceorder="normal")


def add_capacity(figure: go.Figure, capacity_bytes: int, headroom_pct: float, capacity_name: str) -> None:
    """The capacity as a dashed level (GiB axis) and, with a headroom, what a plan may use of it
    as a dotted one: the two limits a per-GPU peak is judged against (config.usable_bytes)."""
    capacity = capacity_bytes / GiB
    add_level(figure, capacity, f"{capacity_name}<br>{capacity:.1f} GiB")
    if headroom_pct:
        usable = usable_bytes(capacity_bytes, headroom_pct) / GiB
        add_level(figure, usable, f"usable {usable:.1f} GiB<br>({headroom_pct:g}% headroom)", dash="dot")


LINE_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
MARKER_SYMBOLS = ("circle", "square-open", "diamond", "triangle-up-open", "x", "star-open", "triangle-down",
                  "pentagon-open", "cross", "hexagon-open", "star-diamond", "hourglass-open")
"""Per line of a figure, with its colour: lines that coincide stay told apart by their dashes
(the gaps show the line beneath) and markers (filled and open in turn, so one drawn over
another leaves both visible)."""


def line_style(index: int) -> dict:
    """The dash and marker of a figure's ``index``-th line (distinct for the first 12)."""
    return {"line": {"dash": LINE_DASHES[index % len(LINE_DASHES)]},
            "marker": {"symbol": MARKER_SYMBOLS[index % len(MARKER_SYMBOLS)], "size": 9}}


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("dpplan.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html")


def _figure_html(block: Figure) -> Markup:
    markup = pio.to_html(
        block.figure, full_html=False, include_plotlyjs=False, div_id=f"fig-{block.name}",
        config=FIGURE_CONFIG, validate=True,
    )
    return Markup(markup)  # plotly's JSON escapes <, > and / (see module doc)


@lru_cache(maxsize=len(PLOTLYJS_MODES))
def _plotly_script(mode: str) -> Markup:
    if mode not in PLOTLYJS_MODES:
        raise UsageError(f"--plotlyjs must be one of {', '.join(PLOTLYJS_MODES)} (got {mode!r})")
    # An empty figure's markup carries exactly the script tags plotly uses for the mode (a
    # PlotlyConfig line, then the library inline or a <script src> of the CDN with its
    # integrity hash), before the figure's own <div id=...>.
    marker = "dpplan-probe"
    markup = pio.to_html(go.Figure(), full_html=False, div_id=marker,
                         include_plotlyjs=True if mode == "inline" else "cdn")
    start = markup.index("<script")
    end = markup.index(f'<div id="{marker}"')
    return Markup(markup[start:end].strip())


def render_page(page: Page, *, plotlyjs: str = "inline") -> str:
    """The page as one HTML document."""
    sections = []
    for section in page.sections:
        blocks = []
        for block in section.blocks:
            if isinstance(block, Figure):
                blocks.append({"kind": "figure", "name": block.name, "html": _figure_html(block),
                               "caption": block.caption})
            else:
                blocks.append(block)
        sections.append({"title": section.title, "anchor": section.anchor, "blocks": blocks})
    return _template().render(
        title=page.title,
        model_name=page.model_name,
        subtitle=page.subtitle,
        header_rows=page.header_rows,
        sections=sections,
        footer=page.footer,
        version=__version__,
        plotly_script=_plotly_script(plotlyjs),
    )
