"""Three levers tried on the best W4 recipe after input rotation, none of which sinkquant builds: does
rotating the whole residual stream, weighting the sink token's rows in GPTQ's Hessian, or choosing the
outlier columns by energy lower the error further?

    python -m eval.probes.probe_w4_levers NAME LEVER [VALUE]   (one row per invocation, one heavy job at a time)
    python -m eval.probes.probe_w4_levers --render             (the page again from the JSON lines)

LEVER is one of
* `residual`: QuaRot's R1, folded into the weights (no run-time cost): every RMSNorm's weight is folded
  into the linears that read it (and set to 1), the embedding, the linears that read the residual
  stream and lm_head (untied from the embedding) are multiplied by one random orthogonal matrix Q
  (QR of a seeded Gaussian), the linears that write to it by Qᵀ. RMSNorm(x Q) = RMSNorm(x) Q, so the
  model computes the same function (the script prints the largest logit difference) while every
  input of q/k/v/gate/up is spread over all hidden dimensions, the massive activation's dimension
  included. Llama-shaped models only (pre-norm, no post-norms).
* `sink_weight W`: the sink positions' rows enter each linear's Hessian W times (their x scaled by
  √W before xᵀx); the sink token's keys and values are read by every later token, so its errors
  might cost more than one token's.
* `outlier_score energy` or `energy_w`: the same number of full-precision input columns as the recipe's
  1%, the columns with the largest mean x² over the calibration tokens (`energy`), or mean x² times the
  column's squared weight norm (`energy_w`), instead of mean |x|: under rotation a kept column's
  share of the output error is its energy.
* `grid lloyd`: a non-uniform 16-level int4 grid instead of the uniform one. Each group keeps its
  range (scale and minimum as stored, its endpoints exact); the 14 inner levels are placed by
  Lloyd-Max on this model's own weights, rotated as the recipe rotates them and normalised per group
  of 128 to [0, 1] (pooled over every linear, each value weighted by its group's squared range). GPTQ,
  its clip search and the dequantized forward use the levels; the integer kernels, whose grid is
  uniform, are switched off for the row. Not a format sinkquant stores: a bound on what a
  per-format look-up grid would buy.
* `none`: the recipe as it is, in memory.

Each row: recipes/w4-g128-best.yaml with `weights.grid: uniform` (the recipe before it shipped the
`grid` lever's idea as `grid: lloyd`), run in memory on the float model (the pipeline's calibration and
`quantize_weights`), scored against the float model on WikiText-2 test, first 16,384 tokens, windows of
1024: perplexity, KL(fp32 ‖ row), top-1; bits per weight from the quantized layers' buffers.
"""

from __future__ import annotations

import argparse
import json

import torch

import sinkquant.quantize.gptq as gptq
import sinkquant.quantize.hessian as hessian
from eval.lib.common import (
    PROBE_RESULTS,
    ROOT,
    RUNS,
    WIKITEXT,
    default_model,
    machine,
    score_in_memory,
    write_report,
)
from sinkquant.evaluate import evaluate
from sinkquant.loading import load_model
from sinkquant.modeling import load_tokenizer, stored_dtype
from sinkquant.quantize.linear import use_kernels
from sinkquant.quantize.weights import select_outliers
from sinkquant.recipe import load_recipe

RECIPE = ROOT / "recipes" / "w4-g128-best.yaml"
LINES = RUNS / "w4_levers.jsonl"
PAGE = PROBE_RESULTS / "w4_levers_smollm2.md"


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate_residual(model, seed: int = 0) -> None:
    """QuaRot's R1 on a Llama-shaped model in place (see the docstring)."""
    m = model.model
    q = random_orthogonal(model.config.hidden_size, seed)

    def fold(norm, linears) -> None:
        g = norm.weight.double()
        for lin in linears:
            lin.weight.copy_((lin.weight.double() * g) @ q)
        norm.weight.fill_(1.0)

    def rotate_output(lin) -> None:
        lin.weight.copy_(q.T @ lin.weight.double())
        if lin.bias is not None:
            lin.bias.copy_(lin.bias.double() @ q)

    embedding = m.embed_tokens.weight.double()
    model.lm_head.weight = torch.nn.Parameter(embedding.clone().float())
    model.config.tie_word_embeddings = False
    m.embed_tokens.weight.copy_(embedding @ q)
    for layer in m.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        rotate_output(attn.o_proj)
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        rotate_output(mlp.down_proj)
    fold(m.norm, [model.lm_head])


def weigh_sink_rows(weight: float) -> None:
    plain = hessian.HessianAccumulator._hessian

    def weighted(self, mode):
        if self.sink_rows:
            self.sink_rows = [r * weight**0.5 for r in self.sink_rows]
        return plain(self, mode)

    hessian.HessianAccumulator._hessian = weighted


def choose_outliers_by(score_name: str) -> None:
    def choose(name, weight, weights, report):
        count = len(select_outliers(name, weight.shape[1], weights, report))
        score = torch.tensor(report.linear[name].mean_square, dtype=torch.float64)
        if score_name == "energy_w":
            score = score * weight.double().pow(2).sum(0)
        return sorted(torch.topk(score, count).indices.tolist())

    gptq.choose_outliers = choose


def lloyd_levels(model, seed: int = 0, sample: int = 4_000_000, rounds: int = 60) -> torch.Tensor:
    """16 levels in [0, 1] with 0 and 1 fixed: Lloyd-Max on the decoder linears' weights (see the
    docstring)."""
    from sinkquant.format.features.rotation import InputRotation

    gen = torch.Generator().manual_seed(seed)
    positions, ranges = [], []
    for name, p in model.named_parameters():
        if p.dim() != 2 or ".layers." not in name:
            continue
        w = p.detach().float()[:, : (p.shape[1] // 128) * 128]
        signs = torch.randint(0, 2, (w.shape[1],), generator=gen).float() * 2 - 1
        groups = InputRotation(signs, 32).apply(w).reshape(-1, 128)
        low, high = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
        positions.append(((groups - low) / (high - low)).flatten())
        ranges.append((high - low).expand(-1, 128).flatten())
    t, r = torch.cat(positions), torch.cat(ranges)
    pick = torch.randperm(t.numel(), generator=gen)[:sample]
    t, weight = t[pick].double(), r[pick].double() ** 2
    levels = torch.linspace(0, 1, 16, dtype=torch.float64)
    for _ in range(rounds):
        bucket = torch.bucketize(t, (levels[1:] + levels[:-1]) / 2)
        for k in range(1, 15):
            inside = bucket == k
            levels[k] = (t[inside] * weight[inside]).sum() / weight[inside].sum()
    return levels.float()


def use_grid(levels: torch.Tensor) -> None:
    """int4 codes index `levels` (in [0, 1]) instead of the uniform grid, everywhere GPTQ and the
    dequantized forward round or expand them (with the package's own rounding and expansion, grid.py)."""
    import sinkquant.format.schemes as schemes
    from sinkquant.format.features.grid import expand_codes, round_to_levels
    from sinkquant.format.primitives import dequantize_grouped

    table = levels * 15  # in units of the group's scale: value = table[code] * scale + minimum

    def on_levels(codes, scale, minimum, group_size):
        return dequantize_grouped(expand_codes(codes, table), scale, minimum, group_size)

    type(schemes.SCHEMES[4]).round_to_range = lambda self, values, scale, minimum: round_to_levels(
        values, scale, minimum, table
    )
    schemes.int4.dequantize_grouped = on_levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument(
        "lever", nargs="?", choices=["none", "residual", "sink_weight", "outlier_score", "grid"]
    )
    parser.add_argument("value", nargs="?")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if not args.render:
        run_row(args.name, args.lever, args.value)
    write_page([json.loads(line) for line in LINES.read_text().splitlines()])


def run_row(name: str, lever: str, value: str | None) -> None:
    model_dir = default_model()
    storage = stored_dtype(model_dir)
    tokenizer = load_tokenizer(model_dir)
    reference = load_model(model_dir, torch.float32)
    model = load_model(model_dir, torch.float32)
    if lever == "residual":
        rotate_residual(model)
        ids = torch.randint(0, 40000, (1, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (reference(ids).logits - model(ids).logits).abs().max().item()
        print(f"largest logit difference after the rotation: {diff:.2e}", flush=True)
    elif lever == "sink_weight":
        weigh_sink_rows(float(value))
    elif lever == "outlier_score":
        choose_outliers_by(value)
    kernels = True
    if lever == "grid":
        levels = lloyd_levels(model)
        print("levels:", " ".join(f"{v:.4f}" for v in levels.tolist()), flush=True)
        use_grid(levels)
        kernels = False
    with use_kernels(kernels):
        recipe = load_recipe(RECIPE).with_overrides(**{"weights.grid": "uniform"})
        scores, _ = score_in_memory(model, tokenizer, recipe, reference, storage, 16384)
    done = [json.loads(line) for line in LINES.read_text().splitlines()] if LINES.is_file() else []
    fp32 = next((r["fp32"] for r in done if "fp32" in r), None)  # the float model, scored once
    if fp32 is None:
        fp32 = evaluate(reference, tokenizer, WIKITEXT, 1024, 16384, progress=False).perplexity
    row = {"name": name, "lever": lever, "value": value, **scores, "fp32": fp32, "machine": machine()}
    LINES.parent.mkdir(parents=True, exist_ok=True)
    with LINES.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_page(rows: list[dict]) -> None:
    info = rows[-1]["machine"]
    lines = [
        "# Levers tried on the best W4 recipe (SmolLM2-135M): a probe",
        "",
        f"`python -m eval.probes.probe_w4_levers NAME LEVER [VALUE]`, one row per invocation, on {info['cpu']} "
        f"({info['cpu_capability']}), {info['threads']} threads. Each row: recipes/w4-g128-best.yaml with "
        "`grid: uniform`, as it was before it shipped `grid: lloyd` (GPTQ, "
        "act_order, input rotation 32, 1% columns, 128 x 512 embedded C4 calibration) run in memory with "
        "the row's lever (see the script's docstring); WikiText-2 test, first 16,384 tokens, windows of "
        "1024; KL(fp32 ‖ row) and top-1 against the float model. Row `best-rotation32` of "
        "eval/results/probes/sweep_w4_smollm2.md is the same recipe run as a user runs it: 24.2090, KL 0.0836.",
        "",
        "| row | lever | value | bits per weight | perplexity | vs fp32 | KL | top-1 | seconds | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['lever']} | {r['value'] or ''} | {r['bits']:.4f} | {r['ppl']:.4f} "
            f"| {100 * (r['ppl'] / r['fp32'] - 1):+.2f}% | {r['kl']:.4f} | {r['top1']:.4f} | {r['seconds']:.0f} | {r.get('note', '')} |"
        )
    write_report(PAGE, [*lines, ""])


if __name__ == "__main__":
    main()
