"""`sinkquant quantize`: parse the options, call `sinkquant.pipeline.quantize_model`, print what it did."""

from __future__ import annotations

from typing import get_args

import click

from ..recipe import WeightsSection
from .app import execution, execution_options, main, module_names_text
from .app import progress as _progress
from .options import eval_options


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
        if s.range_search is not None:
            click.echo(_range_search_line(s.range_search))
        if s.range_moved:
            click.echo(_range_moved_line(s.range_moved))
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


def _range_moved_line(moved: dict[str, list[int]]) -> str:
    """How often the search moved a group's range off min/max, per kind of linear."""
    shares = ", ".join(f"{kind} {n / max(1, total):.1%}" for kind, (n, total) in moved.items())
    return f"int4 groups whose range the search moved off min/max: {shares}"


def _range_search_line(judged: dict) -> str:
    """Where the int4 range search ran, and the KL that chose it (search_choice.py)."""
    kept = judged["min_max_in"]
    kl = judged["kl"]
    tried = ", ".join(f"{label} {value:.4f}" for label, value in kl.items())
    where = "every linear" if not kept else f"every linear but {', '.join(kept)} (min/max there)"
    return f"int4 range search in {where}; KL from the float model on calibration samples: {tried}"
