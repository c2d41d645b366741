"""Does rotating each linear's inputs (incoherence processing) lower the W4 GPTQ error? The probe that
led to `weights.rotation` (sinkquant/format/features/rotation.py), and its variants that sinkquant does not build.

    python -m eval.probes.probe_rotation NAME=SPEC ... [--recipe recipes/w4-g128-best.yaml] [--tokens 16384]
        [--json runs/bench/rotation.json] [--out eval/results/probes/rotation_w4_smollm2.md]
    python -m eval.probes.probe_rotation --render [--json ...] [--out ...]     (the page again from the JSON)

SPEC is `plain` (the recipe as it is), `rotate:BLOCK` or `rotatekept:BLOCK` (below), then optional
JSON recipe overrides after a colon, e.g. `rot64=rotate:64:{"weights.outliers": null}` or `best=plain`.

QuIP#, QuaRot and HIGGS multiply a weight by an orthogonal matrix R before rounding: W' = W R is
stored and the input is rotated to x R at run time, so (x R) W'ᵀ = x R Rᵀ Wᵀ = x Wᵀ. A Hadamard
transform spreads each row's large weights and each input's large activations over a block, so a
group's range is set by many values instead of a few, and the rounding error is closer to white noise.
Here R is block diagonal: blocks of BLOCK inputs, each a normalised Sylvester-Hadamard matrix with
random signs (fixed seed), so with BLOCK up to 128 each 128-column group holds whole blocks, and the
run-time cost would be a BLOCK-point transform per input row.

The probe runs the real pipeline in memory (the recipe's calibration, then `quantize_weights`, decoder
layer by decoder layer) with `gptq.quantize_module` wrapped: each linear's float weight and Hessian
are rotated (W R, Rᵀ H R), GPTQ quantizes those, and the result is a `SinkQuantLinear` subclass that
rotates its input before the stored int4 weights apply (and reports W' Rᵀ as its effective weight, so
the later layers' calibration inputs are the quantized model's). Outlier columns (the recipe's rule)
stay exact in the original basis: those inputs are zeroed before the rotation (their rows and columns
of H too) and multiply their float weights apart, so the int4 part spans every input column, the
outlier ones at zero. `rotatekept:BLOCK` is sinkquant's own `weights.rotation: BLOCK` (built from this
probe's finding): the kept columns rotated among themselves, the outlier columns the layer's own exact
storage, no int4 codes for them. The page's rotkept32 row ran the probe's copy of it (commit 1899c80),
whose matrices were the same. The probe writes no file. Scored in memory against the float
model: perplexity, KL and top-1 on WikiText-2 test; bits per weight from the quantized layers'
buffers (outlier columns in the folder's dtype; the int4 codes of zeroed columns counted).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sinkquant.quantize.gptq as gptq
from eval.lib.common import PROBE_RESULTS, ROOT, RUNS, WIKITEXT, default_model, machine, score_in_memory
from sinkquant.calibrate.report import CalibrationReport
from sinkquant.evaluate import evaluate
from sinkquant.format.features.rotation import InputRotation, draw_signs
from sinkquant.loading import load_model
from sinkquant.modeling import load_tokenizer, stored_dtype
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.weights import float_weight
from sinkquant.recipe import load_recipe


def block_rotation(n: int, block: int) -> torch.Tensor:
    """[n, n] float64: sinkquant's rotation of n columns (`InputRotation`: blocks of `block`, the rest
    in smaller powers of two, the signs `draw_signs` gives a layer of n inputs), as a dense matrix."""
    return InputRotation(draw_signs(n, n), block).apply(torch.eye(n, dtype=torch.float64))


class RotatedLinear(SinkQuantLinear):
    """Stored int4 weights of W R: forward rotates the input by R first, so the product is W x. With
    outlier columns: those inputs are zeroed before the rotation and multiply their float weights
    (`kept_idx`, `kept_weight`) apart."""

    rotation: torch.Tensor

    def keep_exact(self, idx: list[int], weight: torch.Tensor) -> None:
        self.register_buffer("kept_idx", torch.tensor(idx, dtype=torch.int32))
        self.register_buffer("kept_weight", weight[:, idx].to(self.outlier_weight.dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = getattr(self, "kept_idx", None)
        if idx is None or not idx.numel():
            return super().forward(x @ self.rotation.to(x.dtype))
        body = x.clone()
        body[..., idx.long()] = 0
        y = super().forward(body @ self.rotation.to(x.dtype))
        return y + x[..., idx.long()] @ self.kept_weight.to(x.dtype).T

    def dequantized_weight(self) -> torch.Tensor:
        w = super().dequantized_weight() @ self.rotation.float().T
        idx = getattr(self, "kept_idx", None)
        if idx is not None and idx.numel():
            w[:, idx.long()] = self.kept_weight.float()
        return w


def rotating_quantize_module(block: int):
    """`gptq.quantize_module`, on the rotated weight and Hessian: R rotates every column, the outlier
    inputs zeroed before it (their rows and columns of H too) and their float weights applied apart."""
    rotated_hessians: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(H) -> (H, Rᵀ H R)

    def quantize_module(name, module, hessian, idx, weights, storage, factor_cache=None):
        weight = float_weight(module).detach().cpu()
        r = block_rotation(weight.shape[1], block)
        key = id(hessian)
        if key not in rotated_hessians:
            rotated_hessians.clear()  # the Hessians of one input (q/k/v, gate/up) arrive together
            h = hessian.to(torch.float64).clone()
            h[idx] = 0
            h[:, idx] = 0
            rotated_hessians[key] = (hessian, (r.T @ h @ r).to(hessian.dtype))
        body = weight.to(torch.float64).clone()
        body[:, idx] = 0
        w_rot = (body @ r).float()
        bias = module.bias.detach().cpu() if module.bias is not None else None
        res = gptq._gptq_weight(name, w_rot, rotated_hessians[key][1], [], weights, factor_cache)
        if res is None:
            raise SystemExit(f"GPTQ failed on {name}")
        new = RotatedLinear.from_float(
            w_rot, bias, weights.bits, weights.group, [], weights.symmetric, codes=res.codes,
            scale=res.scale, minimum=res.minimum, storage_dtype=storage, log_scales=weights.log_scales,
        )  # fmt: skip
        new.rotation = r.float()
        if idx:
            new.keep_exact(idx, weight)
        return new.to(module.weight.device)

    return quantize_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--render", action="store_true", help="only write the page from the JSON")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "w4-g128-best.yaml")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--report", type=Path, default=RUNS / "rotation_report.json")
    parser.add_argument("--json", type=Path, default=RUNS / "rotation.json")
    parser.add_argument("--out", type=Path, default=PROBE_RESULTS / "rotation_w4_smollm2.md")
    args = parser.parse_args()
    if args.render:
        write_page(json.loads(args.json.read_text()), args.out)
        return
    model_dir = default_model()
    storage = stored_dtype(model_dir)
    tokenizer = load_tokenizer(model_dir)
    reference = load_model(model_dir, torch.float32)
    done = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    if done.get("tokens") != args.tokens:
        done = {"rows": [], "tokens": args.tokens, "machine": machine()}
        done["fp32"] = evaluate(reference, tokenizer, WIKITEXT, 1024, args.tokens, progress=False).perplexity
    original = gptq.quantize_module
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        kind, _, rest = spec.partition(":")
        block, overrides = 0, {}
        if kind in ("rotate", "rotatekept"):
            block_text, _, rest = rest.partition(":")
            block = int(block_text)
        if rest:
            overrides = json.loads(rest)
        if kind == "rotatekept":  # sinkquant's own rotation, as a recipe sets it
            overrides, block = {**overrides, "weights.rotation": block}, 0
        recipe = load_recipe(args.recipe)
        recipe = recipe.with_overrides(**overrides) if overrides else recipe
        model = load_model(model_dir, torch.float32)
        report = CalibrationReport.load(args.report) if args.report.is_file() else None
        gptq.quantize_module = rotating_quantize_module(block) if block else original
        try:
            scores, used = score_in_memory(
                model, tokenizer, recipe, reference, storage, args.tokens, report, progress=True
            )
        finally:
            gptq.quantize_module = original
        if report is None:
            used.save(args.report)
        row = {"name": name, "spec": spec, **scores, "machine": machine()}
        done["rows"] = [r for r in done["rows"] if r["name"] != name] + [row]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(done, indent=1))
        print(f"{name}: {row['ppl']:.4f} ({100 * (row['ppl'] / done['fp32'] - 1):+.2f}%) KL {row['kl']:.4f} "
              f"top-1 {row['top1']:.4f} bits {row['bits']:.3f} ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    write_page(done, args.out)
    print(f"wrote {args.json} and {args.out}")


def write_page(run: dict, path: Path) -> None:
    fp32 = run["fp32"]
    info = run["machine"]
    lines = [
        "# Rotated inputs for W4 GPTQ (SmolLM2-135M): a probe",
        "",
        f"`python -m eval.probes.probe_rotation NAME=SPEC ...` on {info['cpu']} ({info['cpu_capability']}), "
        f"{info['threads']} threads. Each row: recipes/w4-g128-best.yaml (GPTQ, act_order, 128 x 512 embedded "
        "C4 calibration) with the row's overrides, run in memory on the float model, each linear's weight "
        "and Hessian rotated by block-diagonal random-sign Hadamard matrices of the row's block (`plain`: "
        "not rotated); see the script's docstring. WikiText-2 test, first "
        f"{run['tokens']} tokens, windows of 1024, fp32 {fp32:.4f}; KL(fp32 ‖ row) and top-1 against the "
        "float model. Seconds: calibration report (reused from the first row when it exists) and "
        "quantization.",
        "",
        "| row | spec | bits per weight | perplexity | vs fp32 | KL | KL vs `best` | top-1 | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next((r for r in run["rows"] if r["name"] == "best"), None)
    for r in run["rows"]:
        versus = f"{100 * (r['kl'] / base['kl'] - 1):+.1f}%" if base else "–"
        lines.append(
            f"| {r['name']} | `{r['spec']}` | {r['bits']:.3f} | {r['ppl']:.4f} | {100 * (r['ppl'] / fp32 - 1):+.2f}% "
            f"| {r['kl']:.4f} | {versus} | {r['top1']:.4f} | {r['seconds']:.0f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, ""]))


if __name__ == "__main__":
    main()
