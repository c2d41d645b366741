"""`sinkquant calibrate`: parse the options, call `sinkquant.pipeline.calibrate_model`, print the report."""

from __future__ import annotations

import click

from ..calibration_settings import CalibrationSection, CalibrationSettings
from .app import DTYPE_CHOICE, NO_VERIFY_HELP, execution, execution_options, main
from .app import progress as _progress

# the defaults are the recipe's (one source: `CalibrationSection`, `CalibrationSettings`)
SECTION, THRESHOLDS = CalibrationSection(), CalibrationSettings()


@main.command()
@click.argument("model")
@click.option(
    "--dataset",
    default=None,
    help="Text to calibrate on: .txt/.jsonl/.parquet file or hub name (default: embedded C4 slice).",
)
@click.option("--samples", default=SECTION.samples, show_default=True, type=int, help="Calibration samples.")
@click.option("--seq-len", default=SECTION.seq_len, show_default=True, type=int, help="Tokens per sample.")
@click.option(
    "--seed", default=SECTION.seed, show_default=True, type=int, help="Seed for sampling documents."
)
@click.option(
    "--epsilon",
    default=THRESHOLDS.epsilon,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Attention threshold of Sink_k^eps.",
)
@click.option(
    "--massive-abs",
    default=THRESHOLDS.massive_abs,
    show_default=True,
    type=float,
    help="|h| above which an activation can be massive.",
)
@click.option(
    "--massive-ratio",
    default=THRESHOLDS.massive_ratio,
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
    from ..calibrate.summary import print_summary
    from ..pipeline import calibrate_model

    report = calibrate_model(
        model,
        CalibrationSection.resolve(dataset=dataset, samples=samples, seq_len=seq_len, seed=seed),
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
