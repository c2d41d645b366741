"""The `sinkquant` command: parses options, calls the Python API, prints results. No logic here."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import SinkQuantError

DTYPE_CHOICE = click.Choice(["auto", "float32", "bfloat16", "float16"])
NO_VERIFY_HELP = "Load a sinkquant checkpoint even if its files do not match the sha256 manifest."


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _progress() -> bool:
    """Progress bars only on a terminal: in a log or a pipe they are noise around the lines that matter."""
    return sys.stderr.isatty()


def _one_line(text: str) -> str:
    """A message as one line: the CLI promises one line per error, whatever a message was built from."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as `warning: ...`, one line each, like errors (no source file and line of library code)."""
    text = str(message).strip().splitlines()
    click.echo(f"warning: {text[0] if text else category.__name__}", err=True)


class _Group(click.Group):
    """Turns every error into one line on stderr (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        debug = "--debug" in sys.argv[1:] or bool(ctx.params.get("debug"))
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.showwarning = _one_line_warning
                return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # a bad option or argument: one line too, not click's usage block
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SinkQuantError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            ctx.exit(130)
        except Exception as exc:  # an unexpected failure: still one line unless --debug
            if debug:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(
                f"error: {type(exc).__name__}: {first} (re-run with --debug for the traceback)", err=True
            )
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sinkquant")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def main(debug: bool) -> None:
    """Sink-aware quantization for Hugging Face causal language models."""
    _quiet_libraries()


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
):
    """Measure attention sinks, massive activations and outlier input channels of MODEL."""
    from .calibrate import CalibrationSettings
    from .calibrate import calibrate as run_calibration
    from .calibrate.summary import print_summary
    from .data import calibration_samples
    from .modeling import load_tokenizer, prepare_model

    settings = CalibrationSettings(epsilon=epsilon, massive_abs=massive_abs, massive_ratio=massive_ratio)
    probe = None
    if dtype == "float16":
        probe = calibration_samples(
            load_tokenizer(model, trust_remote_code), dataset, 1, min(seq_len, 128), seed
        ).input_ids
    net, tokenizer = prepare_model(model, dtype, trust_remote_code, probe_ids=probe, verify=not no_verify)
    report = run_calibration(net, tokenizer, dataset, samples, seq_len, seed, settings, progress=_progress())
    report.model = str(model)
    print_summary(report)
    if out:
        click.echo(f"report: {report.save(out)}")
    if plots:
        from .calibrate.plots import save_plots

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
    help="Calibration report for --kv-sinks auto (else calibrate 16 x 512).",
)
@click.option(
    "--dtype", default="auto", type=DTYPE_CHOICE, show_default=True, help="Precision (auto = float32 on CPU)."
)
@click.option(
    "--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here."
)
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped inside the model folder to run.")
@click.option("--no-verify", is_flag=True, help=NO_VERIFY_HELP)
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
):
    """Perplexity of MODEL (a model or a sinkquant checkpoint) under the fixed protocol."""
    from .data import load_documents
    from .errors import InputError
    from .evaluate import evaluate, evaluation_windows
    from .modeling import load_tokenizer, prepare_model

    probe = None
    if dtype == "float16":
        tok = load_tokenizer(model, trust_remote_code)
        probe = evaluation_windows(tok, "\n\n".join(load_documents(dataset)), min(seq_len, 128), None)[:1]
    net, tokenizer = prepare_model(model, dtype, trust_remote_code, probe_ids=probe, verify=not no_verify)
    kv_options = {
        "kv_cache.bits": int(kv_bits) if kv_bits else None,
        "kv_cache.residual": residual,
        "kv_cache.key_outlier_channels": key_outlier_channels,
        "kv_cache.group_size": kv_group_size,
        "kv_cache.max_tokens": max_kv_tokens,
    }
    if kv_sinks is not None:
        if kv_sinks not in ("auto", "none") and not kv_sinks.isdigit():
            raise InputError(
                f"--kv-sinks must be auto, none or a number of leading positions (got {kv_sinks!r})"
            )
        kv_options["kv_cache.sinks"] = kv_sinks if not kv_sinks.isdigit() else list(range(int(kv_sinks)))
    if stream and max_kv_tokens is None:
        raise InputError(
            "--stream needs --max-kv-tokens (the cache size at which the oldest tokens are evicted)"
        )
    factory, kv_desc = _kv_cache_factory(net, tokenizer, recipe_path, kv_options, calibration)
    if factory is not None and chunk_size is None:
        chunk_size = 64
    ref = prepare_model(reference, "auto", trust_remote_code, verify=not no_verify)[0] if reference else None
    result = evaluate(
        net,
        tokenizer,
        dataset,
        seq_len,
        max_tokens,
        reference=ref,
        chunk_size=chunk_size,
        cache_factory=factory,
        progress=_progress(),
    )
    result.extra = {
        "model": str(model),
        "reference": reference,
        "dtype": dtype,
        "kv_cache": kv_desc,
        "stream": stream,
    }
    line = f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of {seq_len}"
    line += f", chunks of {chunk_size})" if chunk_size else ")"
    click.echo(line)
    if kv_desc:
        click.echo(f"KV cache: {kv_desc}")
    if ref is not None:
        click.echo(
            f"KL(ref || model) {result.kl:.6f} nats/token, top-1 agreement {result.top1_agreement:.4f}"
        )
    if json_out:
        path = Path(json_out)
        path.write_text(json.dumps(result.to_dict(), indent=2))
        click.echo(f"result: {path}")


def _kv_cache_factory(net, tokenizer, recipe_path, kv_options, calibration):
    """The KV cache an eval asks for: flags over a recipe over the checkpoint's stored settings."""
    from .quantize.generation import cache_factory, kv_config
    from .recipe import Recipe, load_recipe

    asked = any(v is not None for v in kv_options.values())
    recipe = load_recipe(recipe_path) if recipe_path else None
    if recipe is None and not asked:
        stored = getattr(net, "sinkquant_cache_factory", None)
        return (stored, "as stored in the checkpoint") if stored else (None, None)
    if recipe is not None and recipe.kv_cache is None and not asked:
        return None, None
    base = (
        recipe
        if recipe is not None and recipe.kv_cache is not None
        else Recipe().with_overrides(**{"kv_cache.bits": 4})
    )
    given = {key: value for key, value in kv_options.items() if value is not None}
    config = kv_config(base.with_overrides(**given).kv_cache)
    report = None
    if config.sinks == "auto":
        from .calibrate import CalibrationReport, calibrate

        report = (
            CalibrationReport.load(calibration)
            if calibration
            else calibrate(net, tokenizer, None, 16, 512, progress=_progress())
        )
    key_outliers = None
    if config.key_outlier_channels:
        from .data import calibration_samples
        from .quantize.generation import calibrated_key_channels

        ids = calibration_samples(tokenizer, None, 8, 512).input_ids
        sinks = (
            report.sink_positions
            if report is not None
            else (config.sinks if isinstance(config.sinks, list) else [0])
        )
        key_outliers = calibrated_key_channels(net, ids, config.key_outlier_channels, sinks)
    desc = (
        f"int{config.bits}, keys per {config.key_granularity}, group {config.group_size}, sinks {config.sinks}, "
        f"residual {config.residual}, key outlier channels {config.key_outlier_channels}, max tokens {config.max_tokens}"
    )
    return cache_factory(config, report, key_outliers), desc


def _recipe_from(recipe_path: str | None, overrides: dict):
    from .recipe import Recipe, load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else Recipe()
    given = {key: value for key, value in overrides.items() if value is not None}
    return recipe.with_overrides(**given) if given else recipe


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
    "--algorithm", default=None, type=click.Choice(["rtn", "gptq"]), help="Override weights.algorithm."
)
@click.option(
    "--kv-bits",
    default=None,
    type=click.Choice(["2", "4", "8"]),
    help="Store a kv_cache section with these bits.",
)
@click.option(
    "--eval",
    "eval_dataset",
    default=None,
    help="Measure perplexity before and after on this text (seq-len 1024).",
)
@click.option(
    "--eval-tokens",
    default=16384,
    show_default=True,
    type=click.IntRange(min=2),
    help="Text tokens for --eval.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped inside the model folder to run.")
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
):
    """Quantize MODEL_DIR into a checkpoint in OUT_DIR."""
    from .errors import InputError
    from .pipeline import quantize_model

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
    recipe = _recipe_from(recipe_path, overrides)
    if no_outliers and recipe.weights is not None:
        recipe = recipe.with_overrides(**{"weights.outliers": None})
    if group_size is not None and recipe.weights is not None and recipe.weights.bits == 8:
        # int8 is one scale per output channel: the group size would be dropped without a word
        source = "--wbits 8" if wbits else f"weights.bits is 8 in {recipe_path}, and int8"
        raise InputError(
            f"{source} is always per output channel; drop --group-size, or use --wbits 4 for groups"
        )
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
    )
    s = result.summary
    w = recipe.weights
    if w is not None:
        scheme = f"int{w.bits}" + (
            "" if w.bits == 8 else f" {'per channel' if w.group is None else f'g{w.group}'}"
        )
        click.echo(
            f"quantized {s.modules} linear modules to {scheme} ({w.algorithm}); skipped: {', '.join(s.skipped) or 'none'}"
        )
        share = s.outlier_columns / max(1, s.input_columns)
        click.echo(
            f"outlier input columns kept at full precision: {s.outlier_columns} of {s.input_columns} ({share:.2%})"
        )
        click.echo(
            f"quantized modules: {_mib(s.bytes_before)} fp16 -> {_mib(s.bytes_after)} ({s.bytes_after / max(1, s.bytes_before):.3f}x)"
        )
    click.echo(
        f"model: {_mib(result.params_bytes_fp16)} fp16 -> {_mib(result.checkpoint_bytes)} safetensors "
        f"({result.checkpoint_bytes / result.params_bytes_fp16:.3f}x); without embeddings "
        f"{_mib(result.params_bytes_fp16 - result.embedding_bytes_fp16)} -> "
        f"{_mib(max(0, result.checkpoint_bytes - result.embedding_bytes_fp16))}"
    )
    if recipe.kv_cache is not None:
        kv = recipe.kv_cache
        click.echo(
            f"KV cache: int{kv.bits}, keys per {kv.key_granularity}, sinks {kv.sinks}, residual {kv.residual}"
        )
    if result.perplexity:
        click.echo(
            f"perplexity: {result.perplexity['before']:.4f} -> {result.perplexity['after']:.4f} "
            f"({result.perplexity['after'] / result.perplexity['before'] - 1:+.2%})"
        )
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    click.echo(f"time: {times}")
    click.echo(f"checkpoint: {result.out_dir} ({_mib(result.folder_bytes)} in all)")


@main.group()
def recipe():
    """Check and show recipe files."""


@recipe.command("validate")
@click.argument("file")
def recipe_validate(file):
    """Validate FILE; errors name the line and key."""
    from .recipe import load_recipe

    load_recipe(file)
    click.echo(f"{file}: ok")


@recipe.command("show")
@click.argument("file")
def recipe_show(file):
    """Print FILE with every default filled in."""
    from .recipe import load_recipe

    click.echo(load_recipe(file).to_yaml(), nl=False)


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(checkpoint, as_json):
    """Show what a sinkquant CHECKPOINT holds."""
    from .pipeline import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
