"""A profile (profile.json) as a terminal table, and the progress line while runs go (rich).

Draws only what a ProfileDocument holds; every number is computed by the profiler
(profiler/profile_results.py, profiler/recommend.py).
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table
from rich.text import Text

from dpplan.profiler.profile_document import ProfileDocument
from dpplan.profiler.profile_results import Measured, RunResult
from dpplan.profiler.recommendation_results import Recommendations
from dpplan.reports.plan_table import TABLE_WIDTH
from dpplan.reports.recommendation_text import (
    fastest_line,
    format_pct,
    format_rate,
    offload_line,
    recommendation_line,
)
from dpplan.reports.units import format_bytes

STATUS_STYLE = {"ok": "green", "oom": "bold red", "failed": "bold red", "skipped": "dim"}


def _pair(measured: int | None, estimated: int | None) -> str:
    """'measured / estimated' in binary units."""
    if measured is None and estimated is None:
        return "-"
    return f"{format_bytes(measured)} / {format_bytes(estimated)}"


NOT_MEASURED = Measured(summarized=False)
"""What a table row reads for a run that measured nothing (skipped)."""


def _tensor_parallel(config: dict) -> str:
    """``tensor parallel 2 + sequence parallel · `` for a tensor-parallel profile, else nothing
    (a profile written before tensor parallelism has no tp)."""
    tp = config.get("tp") or 1
    if tp == 1:
        return ""
    return f"tensor parallel {tp}{' + sequence parallel' if config.get('sequence_parallel') else ''} · "


def render_profile(document: ProfileDocument, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal and console.width < TABLE_WIDTH:
            console = Console(width=TABLE_WIDTH)
    cuda = document.device.type == "cuda"
    config = document.config
    console.print(
        f"[bold]{escape(document.model.name if document.model else 'model')}[/bold] on "
        f"{escape(document.device.description)} · "
        f"micro-batch {config['batch_size']} per rank · grad accum {config['grad_accum']} · {config['precision']} · "
        f"{config['optimizer']} · {_tensor_parallel(config)}{config['warmup_steps']} warm-up + {config['steps']} timed steps",
        highlight=False,
    )
    if document.recommendations:
        render_recommendations(document.recommendations, console)
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("strategy")
    table.add_column("status")
    table.add_column("allocated meas / est" if cuda else "tensor bytes meas / est", justify="right")
    table.add_column("error", justify="right")
    if cuda:
        table.add_column("reserved meas / est", justify="right")
        table.add_column("NVML used meas / est", justify="right")
    else:
        table.add_column("peak RSS", justify="right")
    table.add_column("step ms", justify="right")
    table.add_column("samples/s", justify="right")
    table.add_column("tokens/s", justify="right")
    for run in document.runs:
        measured = run.measured or NOT_MEASURED
        estimate = run.estimate
        status = Text(str(run.status), style=STATUS_STYLE.get(run.status, ""))
        allocated_estimate = (estimate.peak_allocated_bytes if cuda else estimate.peak_bytes) if estimate else None
        row: list[str | Text] = [run.settings.strategy, status, _pair(measured.peak_allocated_bytes, allocated_estimate),
               format_pct(run.error_pct)]
        if cuda:
            row += [
                _pair(measured.peak_reserved_bytes, estimate.peak_reserved_bytes if estimate else None),
                _pair(measured.peak_nvml_bytes, estimate.peak_bytes if estimate else None),
            ]
        else:
            row.append(format_bytes(measured.peak_rss_bytes))
        step = measured.step_time_s
        row += [
            "-" if step is None else f"{1000 * step:.1f}",
            format_rate(measured.samples_per_s),
            format_rate(measured.tokens_per_s),
        ]
        table.add_row(*row)
    console.print(table)
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
