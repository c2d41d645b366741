"""`sinkquant calibrate`, `eval` and `quantize`: parse the options, call `sinkquant.pipeline`, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import click

from ..recipe import WeightsSection
from .app import DTYPE_CHOICE, NO_VERIFY_HELP, execution, execution_options, main, module_names_text
from .app import progress as _progress


def eval_options(help_text: str):
    """`--eval TEXT` and `--eval-tokens`, shared by the commands that score what they wrote."""

    def apply(command):
        command = click.option(
            "--eval-tokens",
            default=16384,
            show_default=True,
            type=click.IntRange(min=2),
            help="Text tokens for --eval.",
        )(command)
        return click.option("--eval", "eval_dataset", default=None, help=help_text)(command)

    return apply


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


@main.command("eval")
@click.argument("model")
@click.option(
    "--dataset", required=True, help="Text to score: .txt/.jsonl/.parquet file or hub name (wikitext2)."
)
@click.option(
    "--seq-len", default=1024, show_default=True, type=click.IntRange(min=2), help="Tokens per window."
)
@click.option(
    "--max-tokens", default=None, type=click.IntRange(min=1), help="Score only the first N text tokens."
)
@click.option("--reference", default=None, help="Model to compare against (KL divergence, top-1 agreement).")
@click.option(
    "--chunk-size",
    default=None,
    type=click.IntRange(min=1),
    help="Feed each window through the KV cache this many tokens at a time.",
)
@click.option(
    "--recipe", "recipe_path", default=None, help="Use the recipe's kv_cache section for the KV cache."
)
@click.option(
    "--kv-bits", default=None, type=click.Choice(["2", "4", "8"]), help="Quantize the KV cache to these bits."
)
@click.option(
    "--kv-sinks", default=None, help="auto (from calibration), none, or N (keep the first N positions)."
)
@click.option(
    "--residual", default=None, type=click.IntRange(min=0), help="Recent tokens kept at full precision."
)
@click.option(
    "--key-outlier-channels",
    default=None,
    type=click.IntRange(min=0),
    help="Key channels per KV head kept at full precision.",
)
@click.option(
    "--kv-group-size",
    default=None,
    type=click.IntRange(min=8),
    help="Tokens (keys per channel) or values per group.",
)
@click.option(
    "--max-kv-tokens",
    default=None,
    type=click.IntRange(min=16),
    help="Streaming: evict the oldest non-sink tokens beyond this.",
)
@click.option(
    "--stream", is_flag=True, help="Score each (long) window with eviction on: needs --max-kv-tokens."
)
@click.option(
    "--calibration",
    default=None,
    type=click.Path(dir_okay=False),
    help="Calibration report for --kv-sinks auto (else calibrate on the recipe's calibration section).",
)
@click.option(
    "--dtype", default="auto", type=DTYPE_CHOICE, show_default=True, help="Precision (auto = float32 on CPU)."
)
@click.option(
    "--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here."
)
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped inside the model folder to run.")
@click.option("--no-verify", is_flag=True, help=NO_VERIFY_HELP)
@execution_options
def eval_command(
    model,
    dataset,
    seq_len,
    max_tokens,
    reference,
    chunk_size,
    recipe_path,
    kv_bits,
    kv_sinks,
    residual,
    key_outlier_channels,
    kv_group_size,
    max_kv_tokens,
    stream,
    calibration,
    dtype,
    json_out,
    trust_remote_code,
    no_verify,
    device,
    memory_budget,
):
    """Perplexity of MODEL (a model or a sinkquant checkpoint) under the fixed protocol."""
    from ..pipeline import KVRequest, evaluate_model

    if stream and max_kv_tokens is None:
        raise click.UsageError(
            "--stream needs --max-kv-tokens (the cache size at which the oldest tokens are evicted)"
        )
    overrides = {
        "bits": int(kv_bits) if kv_bits else None,
        "sinks": _kv_sinks(kv_sinks),
        "residual": residual,
        "key_outlier_channels": key_outlier_channels,
        "group_size": kv_group_size,
        "max_tokens": max_kv_tokens,
    }
    result = evaluate_model(
        model,
        dataset,
        seq_len,
        max_tokens,
        reference,
        chunk_size,
        KVRequest(recipe_path, overrides, calibration),
        dtype,
        trust_remote_code,
        verify=not no_verify,
        progress=_progress(),
        execution=execution(device, memory_budget),
    )
    result.extra["stream"] = stream
    line = f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of {seq_len}"
    line += f", chunks of {result.chunk_size})" if result.chunk_size else ")"
    click.echo(line)
    if result.extra["kv_cache"]:
        click.echo(f"KV cache: {result.extra['kv_cache']}")
    if result.kl is not None:
        click.echo(
            f"KL(ref || model) {result.kl:.6f} nats/token, top-1 agreement {result.top1_agreement:.4f}"
        )
    if json_out:
        path = Path(json_out)
        path.write_text(json.dumps(result.to_dict(), indent=2))
        click.echo(f"result: {path}")


def _kv_sinks(text: str | None):
    """--kv-sinks: auto, none, or N (the first N positions)."""
    if text is None or text in ("auto", "none"):
        return text
    if not text.isdigit():
        from ..errors import InputError

        raise InputError(f"--kv-sinks must be auto, none or a number of leading positions (got {text!r})")
    return list(range(int(text)))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@main.command()
@click.argument("model_dir")
@click.argument("out_dir")
@click.option(
    "--recipe",
    "recipe_path",
    default=None,
    help="Recipe YAML (default: W4 g128 RTN, 1% outlier columns by mean |x|).",
)
@click.option(
    "--calibration",
    default=None,
    type=click.Path(dir_okay=False),
    help="Reuse a saved calibration report (JSON).",
)
@click.option("--dataset", default=None, help="Override calibration.dataset.")
@click.option("--samples", default=None, type=click.IntRange(min=1), help="Override calibration.samples.")
@click.option("--seq-len", default=None, type=click.IntRange(min=16), help="Override calibration.seq_len.")
@click.option("--wbits", default=None, type=click.Choice(["4", "8"]), help="Override weights.bits.")
@click.option("--group-size", default=None, help="Override weights.group_size (32/64/128/256 or channel).")
@click.option("--outlier-fraction", default=None, type=float, help="Override weights.outliers.fraction.")
@click.option(
    "--outlier-select",
    default=None,
    type=click.Choice(["max", "mean", "threshold"]),
    help="Override weights.outliers.select.",
)
@click.option("--no-outliers", is_flag=True, help="Keep no outlier input columns (weights.outliers: null).")
@click.option(
    "--algorithm",
    default=None,
    type=click.Choice(list(get_args(WeightsSection.model_fields["algorithm"].annotation))),
    help="Override weights.algorithm.",
)
@click.option(
    "--kv-bits",
    default=None,
    type=click.Choice(["2", "4", "8"]),
    help="Store a kv_cache section with these bits.",
)
@eval_options("Measure perplexity before and after on this text (seq-len 1024).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped inside the model folder to run.")
@execution_options
def quantize(
    model_dir,
    out_dir,
    recipe_path,
    calibration,
    dataset,
    samples,
    seq_len,
    wbits,
    group_size,
    outlier_fraction,
    outlier_select,
    no_outliers,
    algorithm,
    kv_bits,
    eval_dataset,
    eval_tokens,
    overwrite,
    trust_remote_code,
    device,
    memory_budget,
):
    """Quantize MODEL_DIR into a checkpoint in OUT_DIR."""
    from ..errors import InputError
    from ..pipeline import quantize_model
    from ..recipe import Recipe, load_recipe

    if group_size is not None and group_size != "channel":
        if not group_size.isdigit():
            raise InputError(f"--group-size must be a number or 'channel' (got {group_size!r})")
        group_size = int(group_size)
    if no_outliers and (outlier_fraction is not None or outlier_select is not None):
        given = "--outlier-fraction" if outlier_fraction is not None else "--outlier-select"
        raise InputError(f"--no-outliers and {given} contradict each other; give one of them")
    overrides = {
        "calibration.dataset": dataset,
        "calibration.samples": samples,
        "calibration.seq_len": seq_len,
        "weights.bits": int(wbits) if wbits else None,
        "weights.group_size": group_size,
        "weights.outliers.fraction": outlier_fraction,
        "weights.outliers.select": outlier_select,
        "weights.algorithm": algorithm,
        "kv_cache.bits": int(kv_bits) if kv_bits else None,
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    recipe = load_recipe(recipe_path) if recipe_path else Recipe()
    recipe = recipe.with_overrides(**given) if given else recipe
    if no_outliers and recipe.weights is not None:
        recipe = recipe.with_overrides(**{"weights.outliers": None})
    result = quantize_model(
        model_dir,
        out_dir,
        recipe,
        calibration,
        overwrite,
        eval_dataset,
        eval_tokens,
        trust_remote_code,
        progress=_progress(),
        execution=execution(device, memory_budget),
    )
    _print_summary(result, recipe)


def _outside_line(result) -> str:
    """The weights no linear layer holds (left at source precision), so a user of e.g. a MoE model whose
    experts are fused 3-D tensors sees how much of the model stayed as it was."""
    outside = result.outside_linears
    elements = sum(outside.values())
    share = elements * 2 / max(1, result.params_bytes_fp16 - result.embedding_bytes_fp16)
    first = max(outside, key=outside.get)
    return (
        f"left at source precision: {len(outside)} tensors outside linear layers, "
        f"{_mib(elements * 2)} fp16 ({share:.1%} of the non-embedding weights; largest: {first}); "
        "sinkquant quantizes linear layers only"
    )


def _print_summary(result, recipe) -> None:
    """What `quantize` did, as lines a person reads: modules, columns, bytes, KV cache, time."""
    s = result.summary
    w = recipe.weights
    if w is not None:
        scheme = f"int{w.bits}" + (
            "" if w.bits == 8 else f" {'per channel' if w.group is None else f'g{w.group}'}"
        )
        click.echo(
            f"quantized {s.modules} linear modules to {scheme} ({w.algorithm}); skipped: {module_names_text(s.skipped)}"
        )
        share = s.outlier_columns / max(1, s.input_columns)
        click.echo(
            f"outlier input columns kept at full precision: {s.outlier_columns} of {s.input_columns} ({share:.2%})"
        )
        click.echo(
            f"quantized modules: {_mib(s.bytes_before)} fp16 -> {_mib(s.bytes_after)} ({s.bytes_after / max(1, s.bytes_before):.3f}x)"
        )
        if result.outside_linears:
            click.echo(_outside_line(result))
    click.echo(
        f"model: {_mib(result.params_bytes_fp16)} fp16 -> {_mib(result.checkpoint_bytes)} safetensors "
        f"({result.checkpoint_bytes / result.params_bytes_fp16:.3f}x); without embeddings "
        f"{_mib(result.params_bytes_fp16 - result.embedding_bytes_fp16)} -> "
        f"{_mib(max(0, result.checkpoint_bytes - result.embedding_bytes_fp16))}"
    )
    if recipe.kv_cache is not None:
        click.echo(f"KV cache: {recipe.kv_cache.describe()}")
    if result.perplexity:
        click.echo(
            f"perplexity: {result.perplexity['before']:.4f} -> {result.perplexity['after']:.4f} "
            f"({result.perplexity['after'] / result.perplexity['before'] - 1:+.2%})"
        )
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    click.echo(f"time: {times}")
    click.echo(f"checkpoint: {result.out_dir} ({_mib(result.folder_bytes)} in all)")


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
