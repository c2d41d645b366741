import copy

import pytest
import torch
from test_gptq import _gptq, _recipe, _report
from tiny_models import tiny_llama

from sinkquant.errors import InputError
from sinkquant.quantize.hessian import CrossAccumulator, HessianAccumulator
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.target import GPTQObserver, ReferenceInputs
from sinkquant.recipe import parse_recipe


def _x(seed=0, samples=3, seq=16, d=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, seq, d, generator=g)
    x[:, 0, 5] += 80.0  # a sink token with a massive activation
    return x


@pytest.mark.parametrize("mode", ["include", "exclude"])
def test_cross_term_is_the_hessian_when_both_inputs_agree(mode):
    x = _x()
    h, c = HessianAccumulator(24, [0], track_max=False), CrossAccumulator(24, [0])
    h.add(x)
    c.add(x, x.clone())
    torch.testing.assert_close(c.cross(mode), h.hessian(mode), rtol=1e-6, atol=1e-6)


def test_target_weight_is_the_least_squares_map_onto_the_float_outputs():
    """W' minimises ‖W X̃ - W' X‖ (damping aside): the float model's outputs from the inputs the
    quantized model gives, and with X̃ = X it is W itself."""
    x = _x(samples=8, seq=64).reshape(-1, 24)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.3
    reference = x + noise  # the float model's input; x is what the quantized layers give
    weight = torch.randn(10, 24, generator=torch.Generator().manual_seed(4))
    refs = ReferenceInputs()
    observer = GPTQObserver("layer.q_proj", 24, [], False, refs)
    refs._inputs, refs._cursor = {"layer.q_proj": reference}, {"layer.q_proj": 0}
    observer.add(x)
    h = observer.hessians.hessian("include")
    got = observer.target_weight(weight, h, "include", torch.arange(24), damping=1e-9)
    want = torch.linalg.lstsq(x.double(), (reference.double() @ weight.double().T)).solution.T
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    same = GPTQObserver("layer.q_proj", 24, [], False, refs)
    refs._inputs, refs._cursor = {"layer.q_proj": x}, {"layer.q_proj": 0}
    same.add(x)
    unchanged = same.target_weight(
        weight, same.hessians.hessian("include"), "include", torch.arange(24), 0.01
    )
    torch.testing.assert_close(unchanged, weight, rtol=1e-5, atol=1e-5)


def test_observers_ignore_the_float_pass():
    refs = ReferenceInputs()
    observer = GPTQObserver("a", 24, [], False, refs)
    module = torch.nn.Linear(24, 4)
    with refs.record({"a": module}):
        module(_x())
        observer.add(_x())  # as the observer's own hook would during the float pass
    assert observer.hessians.count == 0


@pytest.mark.parametrize("one_pass", [True, False])
def test_pipeline_toward_the_float_model(one_pass):
    """The first layer's q/k/v see the float model's inputs (nothing before them is quantized), so
    they match plain GPTQ; later layers differ; the two routes and a rerun give the same bytes."""
    base = tiny_llama()
    report = _report(base)
    plain, toward = copy.deepcopy(base), copy.deepcopy(base)
    _gptq(plain, _recipe(), report, progress=False, batch_size=2, one_pass=one_pass)
    recipe = _recipe(**{"weights.gptq.target": "model"})
    summary = _gptq(toward, recipe, report, progress=False, batch_size=2, one_pass=one_pass)
    assert summary.modules == 14
    first, last = (lambda m: m.model.layers[0].self_attn.q_proj), (lambda m: m.model.layers[-1].mlp.down_proj)
    assert isinstance(first(toward), SinkQuantLinear)
    torch.testing.assert_close(first(toward).dequantized_weight(), first(plain).dequantized_weight())
    assert not torch.equal(last(toward).dequantized_weight(), last(plain).dequantized_weight())
    again = copy.deepcopy(base)
    _gptq(again, recipe, report, progress=False, batch_size=2, one_pass=one_pass)
    for key, value in toward.state_dict().items():
        assert torch.equal(value.view(torch.uint8), again.state_dict()[key].view(torch.uint8)), key


def test_cap_is_refused_with_the_model_target():
    with pytest.raises(InputError, match="cap"):
        parse_recipe("weights: {algorithm: gptq, gptq: {target: model, sink_tokens: cap}}")
