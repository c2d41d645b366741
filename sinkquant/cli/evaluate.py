"""`sinkquant eval`: parse the options, call `sinkquant.pipeline.evaluate_model`, print the result."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import DTYPE_CHOICE, NO_VERIFY_HELP, execution, execution_options, main
from .app import progress as _progress


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
