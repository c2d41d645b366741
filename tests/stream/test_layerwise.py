"""The layer-by-layer runner: captured inputs reproduce the model, merged batches equal batched ones,
and linears fed one tensor share one observer (or are handed it once on arrival)."""

import copy

import torch
from tiny_models import tiny_llama

from sinkquant.architecture import decoder_layers, hidden_of
from sinkquant.quantize.hessian import HessianAccumulator
from sinkquant.stream.layerwise import capture_inputs, merge_batches, observe_inputs, run_layer


def test_layer_by_layer_float_pass_matches_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 120, (5, 24))
    inputs = capture_inputs(model, ids, batch_size=2)
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    for index, layer in enumerate(decoder_layers(model)):
        run_layer(layer, inputs, index)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
    final = model.model.norm(torch.cat(inputs.hidden))
    assert torch.allclose(final, expected, atol=1e-5)


def test_merged_batches_give_the_batched_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 120, (5, 24))
    batched = capture_inputs(model, ids, batch_size=2)
    merged = merge_batches(capture_inputs(model, ids, batch_size=2))
    assert merged is not None and [h.shape[0] for h in merged.hidden] == [5]
    for index, layer in enumerate(decoder_layers(model)):
        run_layer(layer, batched, index)
        run_layer(layer, merged, index)
        assert torch.allclose(merged.hidden[0], torch.cat(batched.hidden), atol=1e-5)


def test_batches_with_arguments_of_other_shapes_stay_apart():
    inputs = capture_inputs(tiny_llama(), torch.randint(0, 120, (4, 8)), batch_size=2)
    per_batch = inputs.calls[0][1][1]
    per_batch["extra"] = torch.ones(3)  # differs from batch 0's and has no batch dimension
    inputs.calls[0][0][1]["extra"] = torch.zeros(3)
    assert merge_batches(inputs) is None


def test_observers_are_shared_by_linears_with_one_input():
    model = tiny_llama()
    layer = decoder_layers(model)[0]
    modules = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs = capture_inputs(model, torch.randint(0, 120, (2, 16)), batch_size=2)
    with observe_inputs(modules, lambda _name, d: HessianAccumulator(d, [])) as observers:
        run_layer(layer, inputs, 0)
    assert observers["self_attn.q_proj"] is observers["self_attn.v_proj"]
    assert observers["mlp.gate_proj"] is observers["mlp.up_proj"]
    assert len({id(o) for o in observers.values()}) == 4
    assert observers["self_attn.k_proj"].count == 32


def test_on_arrival_sees_each_module_once_with_its_whole_input_split_into_samples():
    model = tiny_llama()
    layer = decoder_layers(model)[0]
    modules = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs = merge_batches(capture_inputs(model, torch.randint(0, 120, (3, 16)), batch_size=2))
    arrived, parts = [], []

    class Counting(HessianAccumulator):
        def add(self, x):
            parts.append(x.shape[0])
            super().add(x)

    def on_arrival(name, module, observer):
        arrived.append(name)
        assert observer.count == 3 * 16  # the whole input was observed before the module runs

    with observe_inputs(modules, lambda _name, d: Counting(d, []), split=2, on_arrival=on_arrival):
        run_layer(layer, inputs, 0)
        run_layer(layer, inputs, 0)  # a second forward: nothing observed or handed again
    assert sorted(arrived) == sorted(modules) and len(arrived) == len(set(arrived))
    assert parts == [2, 1] * 4  # q/k/v share one input, gate/up another: 4 observed inputs


def test_computing_in_float64_keeps_stored_dtypes_and_puts_the_weights_back():
    """A layer computing in float64 (GPTQ's `precision: float64`) takes and gives float32 hidden states,
    gives the float64 layer's result rounded once, and leaves its own tensors as they were."""
    from sinkquant.stream.layerwise import _cast_floats, computing_in

    model = tiny_llama()
    inputs = capture_inputs(model, torch.randint(0, 120, (2, 24)), batch_size=2)
    layer = decoder_layers(model)[0]
    before = {name: (t, t.data_ptr(), t.dtype) for name, t in layer.state_dict(keep_vars=True).items()}
    hidden = inputs.hidden[0].clone()
    args, kwargs = _cast_floats(inputs.calls[0][0], torch.float32, torch.float64)
    with torch.no_grad():
        expected = hidden_of(copy.deepcopy(layer).double()(hidden.double(), *args, **kwargs)).float()
        in_float32 = hidden_of(layer(hidden, *inputs.calls[0][0][0], **inputs.calls[0][0][1]))
    with computing_in(layer, torch.float64):
        assert layer.self_attn.q_proj.weight.dtype == torch.float64
        run_layer(layer, inputs, 0)
    assert inputs.hidden[0].dtype == torch.float32
    assert torch.equal(inputs.hidden[0], expected) and not torch.equal(inputs.hidden[0], in_float32)
    for name, tensor in layer.state_dict(keep_vars=True).items():
        original, pointer, dtype = before[name]
        assert tensor is original and tensor.data_ptr() == pointer and tensor.dtype == dtype, name
