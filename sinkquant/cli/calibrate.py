"""`sinkquant calibrate`: parse the options, call `sinkquant.pipeline.calibrate_model`, print the report."""

from __future__ import annotations

import click

from .app import DTYPE_CHOICE, NO_VERIFY_HELP, execution, execution_options, main
from .app import progress as _progress


@main.command()
@click.argument("model")
@click.option(
    "--dataset",
    default=None,
    help="Text to calibrate on: .txt/.jsonl/.parquet file or hub name (default: embedded C4 slice).",
)
@click.option(
    "--samples", default=16, show_default=True, type=click.IntRange(min=1), help="Calibration samples."
)
@click.option(
    "--seq-len", default=512, show_default=True, type=click.IntRange(min=2), help="Tokens per sample."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling documents.")
@click.option(
    "--epsilon",
    default=0.3,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Attention threshold of Sink_k^eps.",
)
@click.option(
    "--massive-abs",
    default=100.0,
    show_default=True,
    type=float,
    help="|h| above which an activation can be massive.",
)
@click.option(
    "--massive-ratio",
    default=1000.0,
    show_default=True,
    type=float,
    help="... and above this multiple of the layer median.",
)
@click.option(
    "--dtype", default="auto", type=DTYPE_CHOICE, show_default=True, help="Precision (auto = float32 on CPU)."
)
@click.option(
    "--out", "out", default=None, type=click.Path(dir_okay=False), help="Write the JSON report here."
)
@click.option(
    "--plots", default=None, type=click.Path(file_okay=False), help="Write PNG plots into this folder."
)
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped inside the model folder to run.")
@click.option("--no-verify", is_flag=True, help=NO_VERIFY_HELP)
@execution_options
def calibrate(
    model,
    dataset,
    samples,
    seq_len,
    seed,
    epsilon,
    massive_abs,
    massive_ratio,
    dtype,
    out,
    plots,
    trust_remote_code,
    no_verify,
    device,
    memory_budget,
):
    """Measure attention sinks, massive activations and outlier input channels of MODEL."""
    from ..calibrate import CalibrationSettings
    from ..calibrate.summary import print_summary
    from ..pipeline import calibrate_model
    from ..recipe import CalibrationSection

    report = calibrate_model(
        model,
        CalibrationSection(dataset=dataset, samples=samples, seq_len=seq_len, seed=seed),
        CalibrationSettings(epsilon=epsilon, massive_abs=massive_abs, massive_ratio=massive_ratio),
        dtype,
        trust_remote_code,
        verify=not no_verify,
        progress=_progress(),
        execution=execution(device, memory_budget),
    )
    print_summary(report)
    if out:
        click.echo(f"report: {report.save(out)}")
    if plots:
        from ..calibrate.plots import save_plots

        for path in save_plots(report, plots):
            click.echo(f"plot: {path}")
