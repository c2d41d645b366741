"""A calibration report as tables a person can read in a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .report import CalibrationReport


def print_summary(report: CalibrationReport, console: Console | None = None, top_linear: int = 8) -> None:
    console = console or Console(width=None if Console().is_terminal else 150)
    s = report.settings
    console.print(
        f"[bold]{report.model}[/] ({report.model_type}): {report.samples} samples x {report.seq_len} tokens "
        f"of {report.dataset}, {report.elapsed_s:.1f} s"
    )
    sinks = Table(title=f"Attention sinks (Sink_k^eps, eps = {s.epsilon})")
    sinks.add_column("position")
    sinks.add_column("Sink_k", justify="right")
    sinks.add_column("sink?")
    for k, v in sorted(report.sinks.score.items())[:8]:
        sinks.add_row(str(k), f"{v:.3f}", "yes" if k in report.sinks.positions else "")
    console.print(sinks)
    if report.sinks.content:
        content = Table(title="Content sinks (after the leading positions)")
        for col in ("token", "id", "share of heads", "flagged", "occurrences"):
            content.add_column(col)
        for c in report.sinks.content[:10]:
            content.add_row(
                repr(c.token), str(c.token_id), f"{c.score:.3f}", str(c.count), str(c.occurrences)
            )
        console.print(content)
    console.print(
        f"sink positions: {report.sinks.positions or 'none'}; content sinks: {len(report.sinks.content)}; "
        f"largest share on a later position: {report.sinks.max_later_share:.3f}"
        + (f"  ({report.sinks.note})" if report.sinks.note else "")
    )
    act = Table(title=f"Massive activations (|h| > {s.massive_abs:g} and > {s.massive_ratio:g} x median)")
    for col in ("layer", "max |h|", "dim", "position", "token", "x median", "|h| at pos 0"):
        act.add_column(col, justify="right")
    for la in report.massive.layers:
        act.add_row(
            str(la.layer),
            f"{la.max_abs:,.1f}",
            str(la.dim),
            str(la.position),
            repr(la.token),
            f"{la.ratio_to_median:,.0f}",
            f"{la.position0_max_abs:,.1f}",
        )
    console.print(act)
    console.print(
        f"massive dims: {report.massive.dims or 'none'}"
        + (f" (from layer {report.massive.first_layer} on)" if report.massive.first_layer is not None else "")
    )
    lin = Table(title=f"Linear layers with the largest input outliers (top {top_linear})")
    for col in ("module", "in", "top channels", "max |x|", "mean |x| (median ch.)"):
        lin.add_column(col)
    ranked = sorted(report.linear.items(), key=lambda kv: -kv[1].top_max_abs[0])[:top_linear]
    for name, st in ranked:
        median_mean = sorted(st.mean_abs)[len(st.mean_abs) // 2]
        lin.add_row(
            name,
            str(st.in_features),
            ", ".join(map(str, st.top_channels[:4])),
            f"{st.top_max_abs[0]:,.1f}",
            f"{median_mean:.3g}",
        )
    console.print(lin)
