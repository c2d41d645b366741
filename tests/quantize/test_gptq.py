import copy
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import CharTokenizer, tiny_llama

from sinkquant import calibrate
from sinkquant.architecture import decoder_layers
from sinkquant.calibrate import Calibration
from sinkquant.checkpoint import load, save
from sinkquant.data import calibration_samples
from sinkquant.errors import InputError
from sinkquant.pipeline import quantization_config
from sinkquant.quantize.gptq import gptq_quantize_, gptq_quantize_weight
from sinkquant.quantize.hessian import HessianAccumulator
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _inputs(n=2048, d=256, seed=0):
    """Correlated inputs with a few large channels (what GPTQ exploits and what outliers look like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))
    x[:, [3, 77]] *= 20
    return x


def _hessian(x, sinks=(), mode="include"):
    acc = HessianAccumulator(x.shape[-1], list(sinks))
    acc.add(x)
    return acc.hessian(mode)


def _weight(out=96, d=256, seed=1):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed)) * 0.05


def _module(w, res, bits, group, idx, symmetric=False):
    return SinkQuantLinear.from_float(
        w, None, bits, group, idx, symmetric, codes=res.codes, scale=res.scale, minimum=res.minimum
    )


@pytest.mark.parametrize(
    "bits, group, symmetric, act_order",
    [(4, 32, False, False), (4, 64, True, True), (4, None, False, False), (8, None, True, False)],
)
def test_gptq_lowers_output_error_and_stores_exactly_what_it_chose(bits, group, symmetric, act_order):
    x, w, idx = _inputs(), _weight(), [3, 77]
    res = gptq_quantize_weight(
        w, _hessian(x), bits, group, idx, symmetric, block_size=64, act_order=act_order
    )
    gptq = _module(w, res, bits, group, idx, symmetric)
    rtn = SinkQuantLinear.from_float(w, None, bits, group, idx, symmetric)
    assert torch.equal(gptq.dequantized_weight(), res.weight)  # SinkQuantLinear holds GPTQ's numbers
    err_gptq = float((x @ (w - gptq.dequantized_weight()).T).norm())
    err_rtn = float((x @ (w - rtn.dequantized_weight()).T).norm())
    assert err_gptq < 0.9 * err_rtn
    assert torch.equal(gptq.dequantized_weight()[:, idx], w[:, idx])  # outlier columns untouched
    assert torch.equal(gptq.outlier_weight, w[:, idx])


def test_uneven_groups_blocks_and_dead_inputs():
    x, w, idx = _inputs(d=200), _weight(d=200), [3, 77, 150]
    x[:, 10:14] = 0  # dead inputs: diag(H) = 0
    res = gptq_quantize_weight(w, _hessian(x), 4, 64, idx, block_size=48, act_order=True)
    module = _module(w, res, 4, 64, idx)  # 197 kept columns: groups of 64, 64, 64, 5
    assert module.weight_scale.shape == (96, 4)
    assert torch.isfinite(res.weight).all() and torch.equal(module.dequantized_weight(), res.weight)


def test_deterministic_bytes():
    x, w = _inputs(), _weight()
    a = gptq_quantize_weight(w, _hessian(x), 4, 32, [3], act_order=True)
    b = gptq_quantize_weight(w.clone(), _hessian(x.clone()), 4, 32, [3], act_order=True)
    for ta, tb in ((a.codes, b.codes), (a.scale, b.scale), (a.minimum, b.minimum)):
        assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8))


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, True)])
def test_clip_search_never_raises_the_weighted_rounding_error(bits, symmetric):
    x, w = _inputs(), _weight()
    h = torch.diag(_hessian(x).diagonal())  # diagonal H: GPTQ is round-to-nearest, no error feedback
    plain = gptq_quantize_weight(w, h, bits, 32, [3], symmetric)
    clipped = gptq_quantize_weight(w, h, bits, 32, [3], symmetric, clip_search=True)
    weighted = [float(((w - r.weight) ** 2 * h.diagonal().float()).sum()) for r in (plain, clipped)]
    assert weighted[1] < weighted[0]
    assert torch.equal(_module(w, clipped, bits, 32, [3], symmetric).dequantized_weight(), clipped.weight)


def test_cholesky_failure_retries_with_more_damping_and_warns():
    h = torch.eye(8, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 1.5  # indefinite: an eigenvalue of -0.5
    with pytest.warns(UserWarning, match="layers.7.mlp"):
        res = gptq_quantize_weight(_weight(d=8), h, 4, None, name="layers.7.mlp")
    assert res.damping == pytest.approx(1.0) and torch.isfinite(res.weight).all()


def _report(model):
    return calibrate(model, CharTokenizer(), None, samples=2, seq_len=32, progress=False)


def _gptq(model, recipe, report, **kwargs):
    """GPTQ on the recipe's calibration samples, drawn as a run draws them."""
    c = recipe.calibration
    samples = calibration_samples(CharTokenizer(), c.dataset, c.samples, c.seq_len, c.seed)
    return gptq_quantize_(model, recipe.weights, Calibration(samples, report), **kwargs)


def _recipe(**extra):
    overrides = {
        "weights.algorithm": "gptq",
        "weights.group_size": 32,
        "weights.outliers.fraction": 0.05,
        "calibration.samples": 6,
        "calibration.seq_len": 32,
        **extra,
    }
    return load_recipe(RECIPES / "w4-g128-gptq.yaml").with_overrides(**overrides)


@pytest.mark.parametrize("one_pass, calls_per_layer", [(True, 1), (False, 2 * 3)])
def test_one_pass_route_runs_each_layer_once(one_pass, calls_per_layer):
    """Merged batches: one call per layer, each linear layer quantized as its input arrives; the
    two-pass route runs every batch (3 of 2, 2, 2 samples) twice."""
    model = tiny_llama()
    report = _report(model)
    calls = []

    def count(module, args):
        if "forward" not in module.__dict__:  # not the stand-in that records the inputs
            calls.append(module)

    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(count)
    # GPTQ's own layer passes only: not those of the rtn ranges' judgment (gptq.ranges: rtn)
    recipe = _recipe(**{"calibration.samples": 6, "weights.gptq.ranges": "sweep"})
    summary = _gptq(model, recipe, report, progress=False, batch_size=2, one_pass=one_pass)
    assert summary.modules == 14
    assert len(calls) == calls_per_layer * len(decoder_layers(model))


def test_one_pass_quantizes_later_linears_on_quantized_inputs():
    """True sequential: o_proj's Hessian comes from the attention output computed with the already
    quantized q/k/v, so the two routes give different o_proj weights but the same q/k/v."""
    base = tiny_llama()
    report = _report(base)
    recipe = _recipe(**{"calibration.samples": 6})
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    _gptq(one, recipe, report, progress=False, batch_size=2, one_pass=True)
    _gptq(two, recipe, report, progress=False, batch_size=2, one_pass=False)
    attn_one, attn_two = one.model.layers[0].self_attn, two.model.layers[0].self_attn
    assert torch.equal(attn_one.q_proj.weight, attn_two.q_proj.weight)
    assert not torch.equal(attn_one.o_proj.weight, attn_two.o_proj.weight)


def test_linears_sharing_an_input_share_one_factorisation(monkeypatch):
    import sinkquant.quantize.gptq_sweep as sweep

    calls = []
    real = sweep.inverse_hessian_factor
    monkeypatch.setattr(sweep, "inverse_hessian_factor", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model = tiny_llama()
    _gptq(model, _recipe(), _report(model), progress=False)
    # per layer: q/k/v (one input), o, gate/up (one input), down
    assert len(calls) == 4 * len(decoder_layers(model))


def test_pipeline_quantizes_saves_and_reloads(tmp_path):
    model = tiny_llama()
    report = _report(model)
    recipe = _recipe()
    originals = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    ids = torch.randint(0, 120, (2, 20))
    with torch.no_grad():
        before = model(ids).logits
    summary = _gptq(model, recipe, report, progress=False)
    assert summary.modules == 14 and summary.skipped == ["lm_head"] and len(summary.layers) == 14
    assert isinstance(model.lm_head, torch.nn.Linear)
    for name, module in model.named_modules():
        if isinstance(module, SinkQuantLinear):
            idx = module.outlier_idx.long()
            assert torch.equal(module.dequantized_weight()[:, idx], originals[name][:, idx])
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().mean() / before.abs().mean()) < 0.2
    model.config.quantization_config = quantization_config(recipe, summary, report, None)
    reloaded = load(save(model, tmp_path / "out", recipe=recipe, report=report))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, after, atol=1e-4)


@pytest.mark.parametrize("sink_tokens", ["exclude", "cap"])
def test_pipeline_is_deterministic(sink_tokens):
    model = tiny_llama()
    report = _report(model)
    report.sinks.positions = [0]
    recipe = _recipe(**{"weights.gptq.sink_tokens": sink_tokens, "weights.gptq.act_order": True})
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Cholesky retries on a healthy model
        _gptq(a, recipe, report, progress=False)
        _gptq(b, recipe, report, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].view(torch.uint8), sb[key].view(torch.uint8)), key


def test_int8_per_channel_pipeline():
    model = tiny_llama()
    summary = _gptq(
        model,
        _recipe(**{"weights.bits": 8, "weights.group_size": None, "weights.outliers": None}),
        None,
        progress=False,
    )
    layer = model.model.layers[1].mlp.down_proj
    assert summary.modules == 14 and layer.bits == 8 and layer.n_outliers == 0


def test_recipe_options_validate():
    recipe = load_recipe(RECIPES / "w4-g128-gptq.yaml")
    assert recipe.weights.algorithm == "gptq" and recipe.weights.outliers.fraction == 0.01
    assert recipe.calibration.dataset is None and recipe.calibration.seq_len == 512
    ok = parse_recipe("weights: {algorithm: gptq, gptq: {sink_tokens: cap, act_order: true, damping: 0.1}}")
    assert ok.weights.gptq.sink_tokens == "cap" and ok.weights.gptq.damping == 0.1
    for bad in (
        "{sink_tokens: drop}",
        "{block_size: 0}",
        "{damping: 0}",
        "{dampening: 0.1}",
    ):
        with pytest.raises(InputError, match="gptq"):
            parse_recipe(f"weights: {{algorithm: gptq, gptq: {bad}}}")


def test_sink_modes_need_a_report():
    with pytest.raises(InputError, match="sink_tokens"):
        _gptq(
            tiny_llama(), _recipe(**{"weights.gptq.sink_tokens": "exclude", "weights.outliers": None}), None
        )


def test_a_layer_quantizes_to_the_same_codes_at_one_and_two_threads():
    """H's matmuls and the factorisation use every torch thread; the codes must not depend on how many."""
    from sinkquant.quantize.hessian import HessianAccumulator

    torch.manual_seed(0)
    x = torch.randn(4, 256, 768) * torch.rand(768) * 2
    x[:, 0, 11] += 300.0  # a massive activation on the sink token
    weight = torch.randn(512, 768) * 0.02
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            acc = HessianAccumulator(768, [0], track_max=False)
            for batch in x.split(2):
                acc.add(batch)
            hessian = acc.hessian()
            got = gptq_quantize_weight(weight.clone(), hessian, 4, 128, [5, 11, 300], clip_search=True)
            results.append((hessian, got))
    finally:
        torch.set_num_threads(threads)
    (h1, one), (h2, two) = results
    assert torch.equal(h1, h2)
    assert torch.equal(one.codes, two.codes) and torch.equal(one.scale, two.scale)
    assert torch.equal(one.minimum, two.minimum)


def test_float64_precision_stores_the_same_dtypes_and_loads(tmp_path):
    """`precision: float64` changes how the layers compute, not what is stored: every tensor keeps the
    dtype the float32 run stores, and the checkpoint loads."""
    report = _report(tiny_llama())
    narrow, wide = tiny_llama(), tiny_llama()
    _gptq(narrow, _recipe(), report, progress=False)
    recipe = _recipe(**{"weights.gptq.precision": "float64"})
    summary = _gptq(wide, recipe, report, progress=False)
    a, b = narrow.state_dict(), wide.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    wide.config.quantization_config = quantization_config(recipe, summary, report, None)
    reloaded = load(save(wide, tmp_path / "out", recipe=recipe, report=report))
    ids = torch.randint(0, 120, (1, 16))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, wide(ids).logits, atol=1e-4)


QUANTIZE_BYTES = """
import hashlib, json, sys
from sinkquant.pipeline import quantize_model
from sinkquant.recipe import Recipe
recipe = Recipe().with_overrides(**{"weights.algorithm": "gptq", "weights.group_size": 32,
    "weights.gptq.precision": sys.argv[3], "calibration.samples": 16, "calibration.seq_len": 128})
result = quantize_model(sys.argv[1], sys.argv[2], recipe, overwrite=True, progress=False)
from safetensors.torch import load_file
tensors = load_file(str(next(result.out_dir.glob("*.safetensors"))))
print(json.dumps({k: hashlib.sha256(v.view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest() for k, v in tensors.items()}))
"""


def test_float64_gptq_checkpoint_does_not_depend_on_the_blas_code_path(stories_path, tmp_path):
    """MKL picks its code path by CPU and cannot be pinned across AVX2 and AVX-512 CPUs; in float64, a
    GPTQ checkpoint made with MKL on its SSE2 path (MKL_CBWR=COMPATIBLE) is the same bytes."""
    import json
    import os
    import subprocess
    import sys

    digests = []
    for n, extra in enumerate(({}, {"MKL_CBWR": "COMPATIBLE"})):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
        done = subprocess.run(
            [sys.executable, "-c", QUANTIZE_BYTES, str(stories_path), str(tmp_path / f"q{n}"), "float64"],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert digests[0] == digests[1]


@pytest.mark.parametrize("recipe_file", ["w4-g128-best.yaml", "w4-g128-compact.yaml"])
@pytest.mark.parametrize("make", ["tiny_qwen2", "tiny_gemma3", "tiny_gpt_oss"])
def test_the_best_recipe_quantizes_other_architectures_and_loads_back(
    make, recipe_file, stories_path, tmp_path
):
    """recipes/w4-g128-best.yaml (GPTQ with act_order, input rotation and the Lloyd grid) as shipped, and w4-g128-compact.yaml (the same
    with symmetric groups, one-byte log scales and 0.7% columns), at sizes a tiny model takes (group 32,
    3 x 96 calibration tokens), on Qwen2 (q/k/v biases), Gemma 3 (sliding windows, soft-capping) and
    gpt-oss (learned sink logits, fused experts): every linear layer but lm_head is quantized with its
    outlier columns exact, and the checkpoint loads through transformers to the logits `load` gives,
    near the float model's."""
    import tiny_models
    from transformers import AutoModelForCausalLM

    from sinkquant.pipeline import quantize_model

    model = getattr(tiny_models, make)()
    src = tiny_models.save_tiny(model, tmp_path / "src", tokenizer_from=stories_path)
    recipe = load_recipe(RECIPES / recipe_file).with_overrides(
        **{"weights.group_size": 32, "calibration.samples": 3, "calibration.seq_len": 96}
    )
    assert recipe.weights.algorithm == "gptq" and recipe.weights.gptq.act_order
    quantize_model(src, tmp_path / "q", recipe, progress=False)
    ours = load(tmp_path / "q")
    plain = [n for n, m in ours.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"]
    originals = dict(model.named_modules())
    for name, module in ours.named_modules():
        if isinstance(module, SinkQuantLinear):
            idx = module.outlier_idx.long()
            assert idx.numel() > 0
            exact = originals[name].weight.detach()[:, idx]
            assert torch.equal(module.dequantized_weight()[:, idx], exact), name
            assert (
                module.spec.symmetric,
                module.spec.log_scales,
                module.spec.rotation,
                module.spec.grid == "lloyd",
            ) == (
                recipe.weights.symmetric,
                recipe.weights.log_scales,
                recipe.weights.rotation,
                recipe.weights.grid == "lloyd",
            )
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        logits = ours(input_ids=ids).logits
        through_hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))(input_ids=ids).logits
    assert torch.equal(logits, through_hf)
    # a loose bound: random weights and 288 calibration tokens give GPTQ little structure to exploit, so
    # this asks only that the layers kept their weights (logits of a model that lost them are off by ~100%;
    # symmetric groups on Gaussian weights lose more than asymmetric ones, so theirs is looser)
    error = float((logits - reference).abs().mean() / reference.abs().mean())
    assert torch.isfinite(logits).all() and error < (0.5 if recipe.weights.symmetric else 0.35)


def test_a_linear_gptq_cannot_serve_is_rounded_as_the_rtn_algorithm_rounds_it():
    """One round-to-nearest for every algorithm: lm_head (outside the decoder layers, no Hessian) under
    the GPTQ recipe gets the same buffers as under the RTN recipe with the same weights section."""
    from sinkquant.quantize.weights import quantize_

    base = tiny_llama()
    report = _report(base)
    recipe = _recipe(**{"weights.ignore": [], "calibration.samples": 2})
    by_gptq, by_rtn = copy.deepcopy(base), copy.deepcopy(base)
    with pytest.warns(UserWarning, match="lm_head is outside the decoder layers"):
        _gptq(by_gptq, recipe, report, progress=False)
    quantize_(by_rtn, recipe.weights.model_copy(update={"algorithm": "rtn"}), report, progress=False)
    gptq_head, rtn_head = by_gptq.lm_head, by_rtn.lm_head
    assert isinstance(gptq_head, SinkQuantLinear) and gptq_head.spec == rtn_head.spec
    for name, buffer in rtn_head.state_dict().items():
        assert torch.equal(gptq_head.state_dict()[name], buffer), name
