"""Issue 48: the default's range search judged per linear by the layer's output error e H eᵀ on its
calibration inputs (H over every calibration token, sink tokens included: the layer loop of
`quantize/calibrated.py`): prints each linear's error with the search over min/max's, then scores the
model where each linear keeps min/max or the search, whichever is lower (`judged`; `default`: always the
search; `minmax`: never).

    python -m eval.probes.probe_layer_judged MODEL REPORT.json TOKENS judged|default|minmax
(REPORT: the default recipe's calibration report of MODEL, e.g. written by probe_default_w4_variants
--report). Output: eval/results/probes/default_w4_cause_48.log; page default_w4_cause_48.md.
"""

import sys
import time
from collections import defaultdict

from eval.lib.common import WIKITEXT
from sinkquant.calibrate.report import Calibration, CalibrationReport
from sinkquant.data import calibration_samples
from sinkquant.evaluate import evaluate
from sinkquant.loading import open_model
from sinkquant.quantize.calibrated import calibrated_quantize_
from sinkquant.quantize.weights import float_weight, rtn_linear
from sinkquant.recipe import Recipe

model_path, report_path, tokens, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
recipe = Recipe()
host, tok = open_model(model_path, "float32", stream=False)
model = host.model
report = CalibrationReport.load(report_path)
c = recipe.calibration
samples = calibration_samples(tok, c.dataset, c.samples, c.seq_len, c.seed)
on = recipe.weights
off = on.model_copy(update={"clip_search": False})
stats = defaultdict(lambda: [0, 0, 0.0, 0.0])


def record(name, module, hessian, cache, storage):
    a, idx = rtn_linear(name, module, off, report, storage)
    b, _ = rtn_linear(name, module, on, report, storage)
    if hessian is None:
        return b, idx
    w = float_weight(module).float()
    h = hessian.double()

    def err(q):
        e = (w - q.dequantized_weight().float()).double()
        return float(((e @ h) * e).sum())

    ea, eb = err(a), err(b)
    kind = name.rsplit(".", 1)[-1]
    s = stats[kind]
    s[0] += 1
    s[1] += eb < ea
    s[2] += ea
    s[3] += eb
    print(f"{name}: search/minmax {eb / ea:.3f}", flush=True)
    if mode == "judged":
        return (b, idx) if eb < ea else (a, idx)
    return (b, idx) if mode == "default" else (a, idx)


t = time.time()
calibrated_quantize_(
    model,
    on,
    Calibration(samples, report),
    record,
    algorithm="probe",
    sink_tokens=sys.argv[5] if len(sys.argv) > 5 else "include",
    progress=False,
)
for k, s in stats.items():
    print(f"{k}: search wins {s[1]}/{s[0]} layers, total ratio {s[3] / s[2]:.3f}")
print("quantized", time.time() - t, flush=True)
r = evaluate(model, tok, WIKITEXT, 1024, tokens, progress=False)
print(f"{mode} perplexity {r.perplexity:.4f}")
