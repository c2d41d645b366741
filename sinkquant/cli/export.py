"""`sinkquant export`: parse the options, call `sinkquant.pipeline.export_checkpoint`, print the report."""

from __future__ import annotations

import click

from .app import main
from .app import progress as _progress
from .options import eval_options


@main.command()
@click.argument("checkpoint")
@click.argument("out_dir")
@click.option(
    "--format",
    "fmt",
    default="compressed-tensors",
    show_default=True,
    type=click.Choice(["compressed-tensors"]),
    help="What to write: compressed-tensors is what vLLM and transformers serve without sinkquant.",
)
@click.option(
    "--activations",
    default="none",
    show_default=True,
    type=click.Choice(["none", "int8"]),
    help="int8: dynamic per-token int8 activations: W8A8 from an 8-bit checkpoint, W4A8 (symmetric) from a "
    "4-bit one; these are what vLLM's CPU backend serves (it has no weight-only int8 kernel, and no "
    "W4A16 kernel in its AVX2 build).",
)
@click.option(
    "--group-size",
    default=None,
    type=click.IntRange(min=2),
    help="Group size of a 4-bit export (default: the checkpoint's, or the largest multiple of 32 below it "
    "that divides every input width).",
)
@click.option(
    "--symmetric/--asymmetric",
    default=None,
    help="Grid of a 4-bit export (default: the checkpoint's; vLLM's CPU kernels serve symmetric only).",
)
@click.option(
    "--smooth",
    is_flag=True,
    help="Rescale input channels at the norms and up_proj rows before quantizing (SmoothQuant for int8 "
    "activations, a searched strength for weight-only); calibrates the checkpoint first.",
)
@click.option(
    "--smooth-alpha",
    default=None,
    type=float,
    help="With --smooth and int8 activations: SmoothQuant's migration strength in [0, 1] (default 0.5, its "
    "paper's); larger moves more of the activations' range into the weights.",
)
@click.option(
    "--narrow-int8",
    is_flag=True,
    help="W8A8: write weight codes in [-64, 64], which vLLM's CPU kernel (oneDNN) multiplies exactly on x86 "
    "CPUs without VNNI (AVX2); full-range codes saturate its int16 sums there.",
)
@click.option(
    "--dense",
    multiple=True,
    metavar="REGEX",
    help="Keep matching modules unquantized (repeatable); q/k/v and gate/up follow each other.",
)
@eval_options("Score checkpoint and export on this text (seq-len 1024).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
def export(
    checkpoint,
    out_dir,
    fmt,
    activations,
    group_size,
    symmetric,
    smooth,
    smooth_alpha,
    narrow_int8,
    dense,
    eval_dataset,
    eval_tokens,
    overwrite,
):
    """Write the sinkquant CHECKPOINT in another format into OUT_DIR."""
    from ..export import ExportSettings
    from ..pipeline import export_checkpoint

    settings = ExportSettings(
        fmt,
        group_size,
        symmetric,
        activations,
        list(dense),
        smooth=smooth,
        smooth_alpha=smooth_alpha,
        narrow_int8=narrow_int8,
        overwrite=overwrite,
    )
    result = export_checkpoint(checkpoint, out_dir, settings, eval_dataset, eval_tokens, progress=_progress())
    r = result.report
    click.echo(
        f"exported {r.modules} modules as {r.format} {r.scheme} ({r.bits_per_weight:.3f} bits per weight)"
    )
    if r.dense:
        click.echo(
            f"kept dense: {len(r.dense)} modules ({', '.join(r.dense[:3])}{', ...' if len(r.dense) > 3 else ''})"
        )
    worst = sorted(r.fold_error.items(), key=lambda kv: -kv[1])[:3]
    click.echo("largest weight change from folding: " + ", ".join(f"{n} {e:.2%}" for n, e in worst))
    click.echo("KV cache: not exported (vLLM has no sink-aware KV cache)")
    if result.perplexity:
        p = result.perplexity
        click.echo(
            f"perplexity: checkpoint {p['checkpoint']:.4f} -> export {p['export']:.4f} "
            f"({p['export'] / p['checkpoint'] - 1:+.2%})"
        )
    click.echo(f"time: {r.seconds:.1f}s")
    click.echo(f"export: {r.out_dir}")
