"""A profile (profile.json) as a terminal table, and the progress line while runs go (rich).

Draws only what a ProfileDocument holds; every number is computed by the profiler
(profiler/profile_results.py, profiler/recommend.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from rich import box
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.status import Status
from rich.table import Table
from rich.text import Text

from dpplan.profiler.profile_document import ProfileDocument
from dpplan.profiler.profile_results import Measured, RunResult
from dpplan.profiler.recommendation_results import Recommendations
from dpplan.reports.recommendation_text import (
    fastest_line,
    format_pct,
    format_rate,
    offload_line,
    recommendation_line,
)
from dpplan.reports.terminal_width import TableLayout, first_that_fits, print_layout, print_parts, report_console
from dpplan.reports.units import format_bytes

STATUS_STYLE = {"ok": "green", "oom": "bold red", "failed": "bold red", "skipped": "dim"}


NOT_MEASURED = Measured(summarized=False)
"""What a table row reads for a run that measured nothing (skipped)."""


class Pair(NamedTuple):
    """A measured peak and its estimate, in binary units; one cell of the table."""

    measured: int | None
    estimated: int | None

    def text(self, *, stacked: bool) -> str:
        """'measured / estimated'; ``stacked``: one above the other (the narrow table)."""
        if self.measured is None and self.estimated is None:
            return "-"
        return ("\n" if stacked else " / ").join((format_bytes(self.measured), format_bytes(self.estimated)))


class RunColumn(NamedTuple):
    """A column of the profile table: its header in a wide and a narrow terminal, and its cell."""

    header: str
    narrow_header: str
    cell: Callable[[RunResult], str | Text | Pair]
    justify: JustifyMethod = "right"


def _allocated(cuda: bool) -> RunColumn:
    def cell(run: RunResult) -> Pair:
        estimate = run.estimate
        estimated = (estimate.peak_allocated_bytes if cuda else estimate.peak_bytes) if estimate else None
        return Pair((run.measured or NOT_MEASURED).peak_allocated_bytes, estimated)

    return RunColumn("allocated meas / est", "allocated", cell) if cuda else (
        RunColumn("tensor bytes meas / est", "tensor bytes", cell))


def _step_ms(run: RunResult) -> str:
    step = (run.measured or NOT_MEASURED).step_time_s
    return "-" if step is None else f"{1000 * step:.1f}"


STRATEGY = RunColumn("strategy", "strategy", lambda run: run.settings.strategy, "left")
STATUS = RunColumn("status", "status", lambda run: Text(str(run.status), style=STATUS_STYLE.get(run.status, "")),
                   "left")
MEAS_EST = RunColumn("", "", lambda run: "meas\nest" if run.measured or run.estimate else "", "left")
"""The narrow table's labels of its stacked cells."""
ERROR = RunColumn("error", "error", lambda run: format_pct(run.error_pct))
RESERVED = RunColumn("reserved meas / est", "reserved", lambda run: Pair(
    (run.measured or NOT_MEASURED).peak_reserved_bytes, run.estimate.peak_reserved_bytes if run.estimate else None))
NVML_USED = RunColumn("NVML used meas / est", "NVML used", lambda run: Pair(
    (run.measured or NOT_MEASURED).peak_nvml_bytes, run.estimate.peak_bytes if run.estimate else None))
PEAK_RSS = RunColumn("peak RSS", "peak RSS", lambda run: format_bytes((run.measured or NOT_MEASURED).peak_rss_bytes))
SPEED = [
    RunColumn("step ms", "step ms", _step_ms),
    RunColumn("samples/s", "samples/s", lambda run: format_rate((run.measured or NOT_MEASURED).samples_per_s)),
    RunColumn("tokens/s", "tokens/s", lambda run: format_rate((run.measured or NOT_MEASURED).tokens_per_s)),
]


def run_layouts(runs: tuple[RunResult, ...], *, cuda: bool) -> list[TableLayout]:
    """The runs table's layouts, widest first (terminal_width.first_that_fits picks one): the
    full table, "measured / estimated" side by side; measured above estimated in each cell
    (two-line rows), two spaces between columns; the same with the speed in a table of its
    own; and that again folding a cell too wide for a very narrow terminal."""
    memory = [_allocated(cuda), ERROR, RESERVED, NVML_USED] if cuda else [_allocated(cuda), ERROR, PEAK_RSS]
    stacked = [STRATEGY, STATUS, MEAS_EST, *memory]
    return [
        TableLayout((_table(runs, [STRATEGY, STATUS, *memory, *SPEED], narrow=False),)),
        TableLayout((_table(runs, [*stacked, *SPEED], narrow=True),)),
        TableLayout((_table(runs, stacked, narrow=True), _table(runs, [STRATEGY, STATUS, *SPEED], narrow=True))),
        TableLayout((_table(runs, stacked, narrow=True, fold=True),
                     _table(runs, [STRATEGY, STATUS, *SPEED], narrow=True, fold=True))),
    ]


def _table(runs: tuple[RunResult, ...], columns: list[RunColumn], *, narrow: bool, fold: bool = False) -> Table:
    """One table of ``columns``, a row per run. ``narrow``: two spaces between columns (with
    MEAS_EST among them, measured above estimated in each cell); ``fold``: a cell wider than its column continues on the next line
    (rich would end it with an ellipsis)."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=narrow)
    for column in columns:
        table.add_column(column.narrow_header if narrow else column.header, justify=column.justify,
                         overflow="fold" if fold else "ellipsis")
    stacked = any(column is MEAS_EST for column in columns)  # measured above estimated, labelled
    for index, run in enumerate(runs):
        if stacked and index:
            table.add_section()  # a blank line between runs of two lines each
        cells = (column.cell(run) for column in columns)
        table.add_row(*(cell.text(stacked=stacked) if isinstance(cell, Pair) else cell for cell in cells))
    return table


def _model_parallel(config: dict) -> str:
    """``tensor parallel 2 + sequence parallel · `` for a tensor-parallel profile, ``expert
    parallel 2 · `` for an expert-parallel one, ``pipeline parallel 2 (1f1b) · `` for a
    pipeline, else nothing (a profile written before them has no tp, ep or pp)."""
    tp, ep, pp = config.get("tp") or 1, config.get("ep") or 1, config.get("pp") or 1
    text = f"tensor parallel {tp}{' + sequence parallel' if config.get('sequence_parallel') else ''} · " if tp > 1 else ""
    text += f"expert parallel {ep} · " if ep > 1 else ""
    return text + (f"pipeline parallel {pp} ({config.get('pp_schedule')}) · " if pp > 1 else "")


def render_profile(document: ProfileDocument, console: Console | None = None) -> None:
    if console is None:
        console = report_console()
    cuda = document.device.type == "cuda"
    config = document.config
    print_parts(
        console,
        f"[bold]{escape(document.model.name if document.model else 'model')}[/bold] on "
        f"{escape(document.device.description)} · "
        f"micro-batch {config['batch_size']} per rank · grad accum {config['grad_accum']} · {config['precision']} · "
        f"{config['optimizer']} · {_model_parallel(config)}{config['warmup_steps']} warm-up + {config['steps']} timed steps",
    )
    if document.recommendations:
        render_recommendations(document.recommendations, console)
    print_layout(console, first_that_fits(console, run_layouts(document.runs, cuda=cuda)))
    if cuda:
        console.print(
            "meas = largest per-rank peak over the timed steps; est = `dpplan estimate` for the same run; "
            "error = (est - meas) / meas of allocated bytes; GiB = 2^30 bytes.",
            style="dim", highlight=False,
        )
        for run in document.runs:
            measured = run.measured or NOT_MEASURED
            if run.status == "ok":
                console.print(
                    f"{run.settings.strategy}: allocator cache (reserved - allocated) up to "
                    f"{format_bytes(measured.allocator_cache_bytes)}; CUDA context, NCCL and other "
                    f"(NVML used - reserved) up to {format_bytes(measured.non_pytorch_bytes)}",
                    style="dim", highlight=False,
                )
    else:
        console.print(
            "CPU run (gloo): tensor bytes are exact live CPU tensor bytes, the largest per-rank peak over the "
            "timed steps, against `dpplan estimate --device cpu`; peak RSS is the whole process (Python, torch, "
            "libraries included); step times include the exact-memory recorder's overhead.",
            style="dim", highlight=False,
        )
    for run in document.runs:
        if run.error:
            style = "dim" if run.status == "skipped" else "red"
            console.print(f"{run.settings.strategy}: {escape(run.error)}", style=style, highlight=False)
    notes = []
    for run in document.runs:
        for note in run.notes:
            if note not in notes:
                notes.append(note)
    for note in notes:
        console.print(f"note: {escape(note)}", style="yellow", highlight=False)
    console.print(f"results: {escape(document.out_dir)}/profile.json", highlight=False)


TRIAL_STYLE = {"ok": "green", "over_limit": "yellow", "oom": "red", "failed": "red", "not_run": "dim"}


def render_recommendations(section: Recommendations, console: Console) -> None:
    console.print(
        f"[bold]Recommendations[/bold] · capacity {format_bytes(section.capacity_bytes)} per rank "
        f"({escape(section.capacity_source)}) · headroom {section.headroom_pct:g}%: "
        f"limit {format_bytes(section.limit_bytes)}",
        highlight=False,
    )
    for rec in section.strategies:
        console.print(escape(recommendation_line(rec, section)), highlight=False)
        line = offload_line(rec, section)
        if line:
            console.print(escape(line), highlight=False)
        trials = rec.search.trials if rec.search else ()
        if trials:
            parts = []
            for trial in trials:
                style = TRIAL_STYLE.get(trial.status, "")
                peak = f" {format_bytes(trial.peak_bytes)}" if trial.peak_bytes is not None else ""
                parts.append(f"b{trial.batch_size} [{style}]{trial.status.replace('_', ' ')}[/{style}]{peak}")
            console.print(f"  trials: {', '.join(parts)}", style="dim", highlight=False)
    if section.fastest:
        console.print(escape(fastest_line(section.fastest)), highlight=False)
    for note in section.notes:
        console.print(f"note: {escape(note)}", style="yellow", highlight=False)
    console.print()


class ProfileProgress:
    """A spinner on stderr naming the run in flight, and one line per finished run.
    Silent when stderr is not a terminal (CI logs keep only the final table)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal
        self._status: Status | None = None

    def start(self, strategy: str, index: int, count: int) -> None:
        if not self.enabled:
            return
        text = f"profiling {strategy} ({index + 1}/{count})..."
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def done(self, run: RunResult) -> None:
        if not self.enabled:
            return
        measured = run.measured or NOT_MEASURED
        detail = run.error or f"peak {format_bytes(measured.peak_allocated_bytes)}"
        style = STATUS_STYLE.get(run.status, "")
        self.console.print(f"{run.settings.strategy}: [{style}]{run.status}[/{style}] {escape(detail)}",
                           highlight=False)

    def trial(self, strategy: str, trial) -> None:
        """One batch-size trial finished (a batch_search.Trial)."""
        if not self.enabled:
            return
        style = TRIAL_STYLE.get(trial.status, "")
        detail = f"peak {format_bytes(trial.peak_bytes)}, limit {format_bytes(trial.limit_bytes)}"
        if trial.error and trial.status in ("oom", "failed", "not_run"):
            detail = trial.error
        self.console.print(
            f"{strategy}: trial batch {trial.batch_size} [{style}]{trial.status.replace('_', ' ')}[/{style}] "
            f"{escape(detail)} ({trial.seconds:.0f} s)", highlight=False,
        )

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def notice(self, text: str) -> None:
        self.console.print(f"note: {escape(text)}", style="yellow", highlight=False)
