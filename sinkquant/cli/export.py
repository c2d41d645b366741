"""`sinkquant export`: parse the options, call `sinkquant.pipeline.export_checkpoint` (or, for GGUF,
`sinkquant.gguf.export_gguf`), print the report."""

from __future__ import annotations

import click
from click.core import ParameterSource

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
    type=click.Choice(["compressed-tensors", "gguf"]),
    help="What to write: compressed-tensors is what vLLM and transformers serve without sinkquant; gguf "
    "is llama.cpp's file, written from a plain HF model folder (CHECKPOINT) to the file OUT_DIR (*.gguf).",
)
@click.option(
    "--type",
    "gguf_type",
    default="Q8_0",
    show_default=True,
    help="With --format gguf: the type of the 2-D weights: F32, F16, BF16, Q8_0 or Q4_0 (rows that do not "
    "split into blocks of 32 stay F16).",
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
    gguf_type,
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
    _check_format_options(fmt)
    if fmt == "gguf":
        _export_gguf(checkpoint, out_dir, gguf_type, overwrite)
        return
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


#: the options only one format reads, by parameter name
_ONLY_FOR = {
    "gguf_type": "gguf",
    **dict.fromkeys(
        [
            "activations",
            "group_size",
            "symmetric",
            "smooth",
            "smooth_alpha",
            "narrow_int8",
            "dense",
            "eval_dataset",
        ],
        "compressed-tensors",
    ),
}


def _check_format_options(fmt: str) -> None:
    """An option the chosen format does not read is refused, not silently dropped."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        wanted = _ONLY_FOR.get(param.name)
        if wanted not in (None, fmt) and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT:
            raise click.UsageError(f"{param.opts[0]} applies to --format {wanted} only", ctx)


def _export_gguf(model, out, gguf_type, overwrite):
    from ..gguf import export_gguf

    result = export_gguf(model, out, gguf_type, progress=_progress(), overwrite=overwrite)
    click.echo(
        f"exported {result.path} as GGUF {result.type}: {result.file_bytes / 2**20:.2f} MiB, "
        f"{result.bits_per_weight:.3f} bits per weight"
    )
    counts: dict[str, int] = {}
    for _, ggml_type in result.plan:
        counts[ggml_type] = counts.get(ggml_type, 0) + 1
    click.echo("type  tensors")
    for ggml_type, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        click.echo(f"{ggml_type:<5} {count:>7}")
