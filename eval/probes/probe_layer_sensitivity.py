"""Where does a W4 checkpoint's error live? A probe before building per-layer mixed precision.

    python -m eval.probes.probe_layer_sensitivity CHECKPOINT [--model DIR] [--tokens 4096]
        [--restore-fraction 0.037 ...] [--final-tokens 16384] [--json runs/bench/layer_sensitivity.json]
        [--out eval/results/probes/PAGE.md]
    python -m eval.probes.probe_layer_sensitivity --render [--json ...] [--out ...]   (the page again from the JSON)

Mixed precision (llama.cpp's `_M` variants, AutoRound's and GPTQModel's per-layer bits) spends extra
bits on the layers whose rounding costs the most. That pays only if the error is concentrated: if a
few percent of the weights carry a large share of it. This probe measures that on a real checkpoint:

1. The float model, with every quantized linear's weight replaced by the checkpoint's dequantized
   weight (outlier columns as stored): the checkpoint's own numbers, in a plain float model.
2. Each linear type (all layers' q_proj, ...) and each decoder layer (its 7 linears) put back to its
   float weight, one at a time: KL(fp32 ‖ model) on `--tokens` WikiText-2 test tokens, and how much of
   the all-quantized KL that recovers, per percent of the weights restored.
3. Each linear of the most sensitive layers alone, the same way.
4. Greedy by recovered KL per weight: the most sensitive linears up to each `--restore-fraction` of
   the quantized weights, put back to float together, scored on `--final-tokens` (perplexity, KL,
   top-1). Float is an upper bound of what int8 for those linears could buy.

Restoring a linear after GPTQ is not GPTQ with that linear unquantized (later linears were fitted to
its rounded outputs), so the numbers bound, not predict, a mixed-precision recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from eval.lib.common import PROBE_RESULTS, RUNS, WIKITEXT, default_model, machine
from sinkquant.checkpoint import load
from sinkquant.data import load_documents
from sinkquant.evaluate.perplexity import evaluation_windows, score_window, window_logits
from sinkquant.loading import load_model
from sinkquant.modeling import load_tokenizer
from sinkquant.quantize.linear import SinkQuantLinear


def reference_logits(model, windows: torch.Tensor) -> list[torch.Tensor]:
    return [window_logits(model, w[None]) for w in windows]


def score(model, windows: torch.Tensor, ref: list[torch.Tensor]) -> dict:
    """Perplexity, KL and top-1 against `ref` (the float model's logits), as `evaluate` scores them."""
    totals = [0.0, 0.0, 0, 0]  # nll, kl, top-1 agreements, predicted tokens
    for w, ref_logits in zip(windows, ref, strict=True):
        score_window(window_logits(model, w[None]), w[None], ref_logits, totals)
    nll, kl, agree, count = totals
    return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count}


class Swapper:
    """The float model with each quantized linear's weight switchable between float and dequantized."""

    def __init__(self, model, checkpoint) -> None:
        modules = dict(model.named_modules())
        self.linears = {}
        for name, q in checkpoint.named_modules():
            if isinstance(q, SinkQuantLinear):
                layer = modules[name]
                self.linears[name] = (
                    layer,
                    layer.weight.data.clone(),
                    q.dequantized_weight().to(layer.weight.dtype),
                )
        self.total = sum(w.numel() for _, w, _ in self.linears.values())

    def set(self, restored: set[str]) -> None:
        for name, (layer, float_w, deq_w) in self.linears.items():
            layer.weight.data.copy_(float_w if name in restored else deq_w)

    def share(self, names) -> float:
        return sum(self.linears[n][1].numel() for n in names) / self.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("--render", action="store_true", help="only write the page from the JSON of a run")
    parser.add_argument("--out", type=Path, default=PROBE_RESULTS / "layer_sensitivity_smollm2.md")
    parser.add_argument(
        "--model", default=None, help="the float model the checkpoint was made from (default: SmolLM2)"
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument(
        "--top-layers", type=int, default=6, help="decoder layers whose linears are probed alone"
    )
    parser.add_argument("--restore-fraction", type=float, nargs="*", default=[0.01, 0.02, 0.037, 0.06])
    parser.add_argument("--final-tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=RUNS / "layer_sensitivity.json")
    args = parser.parse_args()
    if args.render:
        write_page(json.loads(args.json.read_text()), args.out)
        return
    if args.checkpoint is None:
        parser.error("give the CHECKPOINT to probe (or --render)")
    model_dir = args.model or default_model()
    tokenizer = load_tokenizer(model_dir)
    text = "\n\n".join(load_documents(WIKITEXT))
    windows = evaluation_windows(tokenizer, text, 1024, args.tokens)
    model = load_model(model_dir, torch.float32)
    ref = reference_logits(model, windows)
    swap = Swapper(model, load(args.checkpoint))
    out: dict = {
        "checkpoint": str(args.checkpoint),
        "model": str(model_dir),
        "tokens": args.tokens,
        "machine": machine(),
        "probes": {},
    }

    def probe(label: str, names: set[str]) -> dict:
        start = time.perf_counter()
        swap.set(names)
        row = score(model, windows, ref) | {"share": swap.share(names), "linears": sorted(names)}
        out["probes"][label] = row
        print(f"{label:40s} share {100 * row['share']:5.2f}%  KL {row['kl']:.4f}  ppl {row['ppl']:.3f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        return row

    base = probe("all quantized", set())
    kinds = sorted({n.rsplit(".", 1)[-1] for n in swap.linears})
    layers = sorted({n.rsplit(".", 2)[0] for n in swap.linears}, key=lambda s: int(s.rsplit(".", 1)[-1]))
    for kind in kinds:
        probe(f"type {kind}", {n for n in swap.linears if n.endswith("." + kind)})
    gain = {}
    for layer in layers:
        row = probe(f"layer {layer}", {n for n in swap.linears if n.startswith(layer + ".")})
        gain[layer] = (base["kl"] - row["kl"]) / row["share"]
    single = {}
    for layer in sorted(layers, key=lambda s: -gain[s])[: args.top_layers]:
        for name in sorted(n for n in swap.linears if n.startswith(layer + ".")):
            row = probe(f"linear {name}", {name})
            single[name] = (base["kl"] - row["kl"]) / row["share"]
    # linears not probed alone: their layer's recovery per weight, shared evenly
    for name in swap.linears:
        single.setdefault(name, gain[name.rsplit(".", 2)[0]])
    ranked = sorted(single, key=lambda n: -single[n])
    windows = evaluation_windows(tokenizer, text, 1024, args.final_tokens)
    swap.set(set(swap.linears))  # the float model again: the reference
    ref = reference_logits(model, windows)
    out["final_tokens"] = args.final_tokens
    probe(f"final all quantized ({args.final_tokens} tokens)", set())
    for fraction in args.restore_fraction:
        chosen: set[str] = set()
        for name in ranked:
            if swap.share(chosen | {name}) > fraction:
                continue
            chosen.add(name)
        probe(f"final top {100 * fraction:.1f}% restored", chosen)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    write_page(out, args.out)
    print(f"wrote {args.json} and {args.out}")


def write_page(run: dict, path: Path) -> None:
    """The probe's rows as tables: types and decoder layers, linears alone, restored sets."""
    probes = run["probes"]
    base = probes["all quantized"]
    info = run["machine"]

    def table(labels: list[str], ref: dict) -> list[str]:
        lines = ["| restored to float | share of weights | KL | KL recovered | perplexity | top-1 |",
                 "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for label in labels:
            r = probes[label]
            recovered = 100 * (ref["kl"] - r["kl"]) / ref["kl"]
            lines.append(f"| {label} | {100 * r['share']:.2f}% | {r['kl']:.4f} | {recovered:+.1f}% | {r['ppl']:.3f} | {r['top1']:.4f} |")  # fmt: skip
        return lines

    first = [k for k in probes if not k.startswith("final")]
    final = [k for k in probes if k.startswith("final")]
    units = [k for k in first if k.startswith(("all", "type", "layer"))]
    singles = sorted((k for k in first if k.startswith("linear")), key=lambda k: probes[k]["kl"])
    chosen = [
        f"- {k}: " + ", ".join(n.removeprefix("model.") for n in probes[k]["linears"]) for k in final[1:]
    ]
    text = [
        "# Where the W4 error lives (SmolLM2-135M): per-linear sensitivity of a checkpoint",
        "",
        f"`python -m eval.probes.probe_layer_sensitivity {run['checkpoint']}` on {info['cpu']} ({info['cpu_capability']}), "
        f"{info['threads']} threads, {info['date']}. The float model with every quantized linear's weight "
        "replaced by the checkpoint's dequantized weight; the named linears put back to their float weights. "
        f"KL(fp32 ‖ model) and top-1 against the float model; WikiText-2 test, windows of 1024, first "
        f"{run['tokens']} tokens for the scan, {run['final_tokens']} for the restored sets. See the script's "
        "docstring for what restoring after GPTQ does and does not say.",
        "",
        f"## Types and decoder layers ({run['tokens']} tokens)",
        "",
        *table(units, base),
        "",
        f"## Linears alone, in the most sensitive layers, best first ({run['tokens']} tokens)",
        "",
        *table(singles, base),
        "",
        f"## The most sensitive linears restored together ({run['final_tokens']} tokens)",
        "",
        "Greedy by KL recovered per weight (a linear not probed alone takes its layer's figure), up to each "
        "share of the quantized weights:",
        "",
        *table(final, probes[final[0]]),
        "",
        *chosen,
        "",
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


if __name__ == "__main__":
    main()
