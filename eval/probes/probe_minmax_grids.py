"""Issue 48: why sinkquant's min/max W4 g128 and eval/bench/bench_families.py's own min/max code score apart
on Qwen2.5-Coder-0.5B (47.85 against 47.06) with the same outlier columns: the layers' weights compared.

sinkquant stores each group's scale and minimum in bf16 and rounds against those; the benchmark's code (`bench_families.minmax_rounded`)
rounds against float32 ones. For three Qwen2 linears (their 1% outlier columns from the default recipe's report):
the largest difference between the two dequantized weights, the share of weights that differ, and each
one's mean square error against the float weight.

    python -m eval.probes.probe_minmax_grids MODEL_DIR REPORT.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

from eval.bench.bench_families import minmax_rounded
from sinkquant.calibrate.report import CalibrationReport
from sinkquant.quantize.linear import SinkQuantLinear

NAMES = ("model.layers.10.mlp.gate_proj", "model.layers.10.self_attn.k_proj", "model.layers.2.mlp.down_proj")


def main() -> None:
    model_dir, report_path = sys.argv[1], sys.argv[2]
    report = CalibrationReport.load(report_path)
    shard = sorted(Path(model_dir).glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as source:
        for name in NAMES:
            weight = source.get_tensor(name + ".weight").float()
            idx = report.linear[name].outlier_channels(0.01, "mean")
            mine = SinkQuantLinear.from_float(weight, None, 4, 128, idx, False).dequantized_weight().float()
            theirs = minmax_rounded(weight, torch.tensor(idx))
            diff = (mine - theirs).abs()
            print(
                f"{name}: largest difference {float(diff.max()):.3e}, weights differing by > 1e-4 "
                f"{float((diff > 1e-4).float().mean()):.2%}, mean square error sinkquant "
                f"{float((mine - weight).pow(2).mean()):.4e}, own code {float((theirs - weight).pow(2).mean()):.4e}"
            )


if __name__ == "__main__":
    main()
