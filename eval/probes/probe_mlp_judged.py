"""Issue 48: gate/up's range search judged per decoder layer by the MLP's output error (through SwiGLU
and down_proj, float) on 16 x 512 calibration tokens (inputs captured from the float model), then the
model scored with gate/up searched only where that error is lower.

    python -m eval.probes.probe_mlp_judged MODEL REPORT.json TOKENS
Slow (about a minute a Qwen2 layer on 2 cores): its run on Qwen2 was stopped after 5 layers
(eval/results/probes/default_w4_cause_48.log); page default_w4_cause_48.md.
"""

import sys
import time

import torch

from eval.lib.common import WIKITEXT
from sinkquant.calibrate.report import CalibrationReport
from sinkquant.data import calibration_samples
from sinkquant.evaluate import evaluate
from sinkquant.loading import open_model
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.weights import choose_outliers, column_importance, targets
from sinkquant.recipe import Recipe

torch.manual_seed(0)
model_path, report_path, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
recipe = Recipe()
w = recipe.weights
host, tok = open_model(model_path, "float32", stream=False)
model = host.model
report = CalibrationReport.load(report_path)
c = recipe.calibration
ids = calibration_samples(tok, c.dataset, c.samples, c.seq_len, c.seed).input_ids[:16]
chosen, _ = targets(model, w.ignore)


def quant(name, module, search):
    idx = choose_outliers(name, module.weight, w, report)
    q = SinkQuantLinear.from_float(
        module.weight,
        module.bias,
        4,
        w.group,
        idx,
        False,
        importance=column_importance(name, report, "exclude"),
        clip_search=search,
    )
    return q.dequantized_weight().to(module.weight.dtype)


layers = model.model.layers
inputs = {}
hooks = [
    layer.mlp.register_forward_pre_hook(
        lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    for i, layer in enumerate(layers)
]
with torch.no_grad():
    for row in ids:
        model(row[None])
for h in hooks:
    h.remove()
decisions = {}
t = time.time()
with torch.no_grad():
    for i, layer in enumerate(layers):
        x = torch.cat(inputs.pop(i))
        mlp = layer.mlp
        ref = mlp(x)
        g0, u0 = mlp.gate_proj.weight.data.clone(), mlp.up_proj.weight.data.clone()
        errs = {}
        for search in (False, True):
            mlp.gate_proj.weight.data = quant(f"model.layers.{i}.mlp.gate_proj", mlp.gate_proj, search)
            mlp.up_proj.weight.data = quant(f"model.layers.{i}.mlp.up_proj", mlp.up_proj, search)
            errs[search] = float((mlp(x) - ref).double().pow(2).sum())
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = g0, u0
        decisions[i] = errs[True] < errs[False]
        print(f"layer {i}: search/minmax MLP output error {errs[True] / errs[False]:.3f}", flush=True)
print("judged", time.time() - t)
with torch.no_grad():
    for name, module in chosen.items():
        search = True
        if name.endswith(("gate_proj", "up_proj")):
            search = decisions[int(name.split(".layers.")[1].split(".")[0])]
        module.weight.data = quant(name, module, search)
r = evaluate(model, tok, WIKITEXT, 1024, tokens, progress=False)
print(
    f"mlp-judged perplexity {r.perplexity:.4f}; gate/up searched in {sum(decisions.values())}/{len(decisions)} layers"
)
