"""Input rotation (weights.rotation): the rotation is orthogonal and its parts agree with the dense
matrix; a rotated layer computes x Wᵀ with W in the input's basis; GPTQ on rotated weights lowers the
layer's output error where a few large weights set each group's range; a rotated checkpoint loads
every way and scores the same, and the paths that cannot carry a rotation refuse it."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import quantized_tiny_llama, row_errors

from sinkquant.errors import InputError
from sinkquant.export import export
from sinkquant.format.features.rotation import (
    InputRotation,
    block_sizes,
    draw_signs,
    pack_signs,
    unpack_signs,
)
from sinkquant.format.primitives import complement_indices
from sinkquant.loading import load_model
from sinkquant.pipeline import inspect_checkpoint
from sinkquant.quantize.gptq import gptq_quantize_weight
from sinkquant.quantize.hessian import HessianAccumulator
from sinkquant.quantize.linear import SinkQuantLinear, forget_rotated_input
from sinkquant.recipe import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integrations" / "vllm"))
from sinkquant_vllm.layer import FORMAT_VERSION as PLUGIN_FORMAT  # noqa: E402
from sinkquant_vllm.layer import LayerSpec  # noqa: E402


def _dense(rotation: InputRotation) -> torch.Tensor:
    """R as a matrix, from its definition diag(s) · blockdiag(H_b), H_b built by Sylvester's recursion."""

    def hadamard(n):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / n**0.5

    return rotation.signs.double()[:, None] * torch.block_diag(*[hadamard(b) for b in rotation.sizes])


@pytest.mark.parametrize("n, block", [(570, 32), (576, 32), (172, 16), (7, 4), (1530, 128)])
def test_the_rotation_is_orthogonal_and_matches_its_dense_matrix(n, block):
    rotation = InputRotation(draw_signs(n + 3, n), block)
    assert sum(rotation.sizes) == n and max(rotation.sizes) <= block
    dense = _dense(rotation)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(rotation.apply(x), x @ dense, atol=1e-12)
    assert torch.allclose(rotation.apply_transposed(x), x @ dense.T, atol=1e-12)
    # float32 and bf16 inputs are rotated in float32 and come back in their own dtype
    for dtype in (torch.float32, torch.bfloat16):
        got = rotation.apply(x.to(dtype))
        assert got.dtype == dtype
        assert torch.allclose(
            got.double(), x.to(dtype).double() @ dense, atol=0.05 if dtype == torch.bfloat16 else 1e-5
        )


def test_block_sizes_take_the_rest_in_powers_of_two():
    assert block_sizes(570, 32) == [32] * 17 + [16, 8, 2]
    assert block_sizes(64, 32) == [32, 32]
    assert block_sizes(7, 4) == [4, 2, 1]


@pytest.mark.parametrize("n", [1, 8, 13, 570])
def test_signs_pack_to_one_bit_each_and_back(n):
    signs = draw_signs(1000, n)
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_signs(packed, n), signs)


def test_rotated_hessian_is_qt_h_q_with_the_outlier_columns_left_alone():
    n, outliers = 96, [5, 40]
    keep = complement_indices(torch.tensor(outliers), n)
    rotation = InputRotation(draw_signs(n, keep.numel()), 16)
    q = torch.eye(n, dtype=torch.float64)
    q[keep[:, None], keep[None, :]] = _dense(rotation)
    x = torch.randn(200, n, dtype=torch.float64)
    h = x.T @ x
    assert torch.allclose(rotation.rotate_hessian(h, keep), q.T @ h @ q, atol=1e-9)
    w = torch.randn(8, n)
    rotated = rotation.rotate_columns(w, keep)
    assert torch.equal(rotated[:, outliers], w[:, outliers].double())
    assert torch.allclose(rotated, w.double() @ q, atol=1e-12)


@pytest.mark.parametrize("outliers", [[], [3, 50, 129]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rotated_layer_multiplies_by_the_weight_in_the_inputs_basis(outliers, dtype):
    torch.manual_seed(0)
    weight = torch.randn(64, 160) * 0.05
    keep = 160 - len(outliers)
    layer = SinkQuantLinear.from_float(
        weight, None, 4, 32, outliers, rotation=InputRotation(draw_signs(160, keep), 32)
    )
    plain = SinkQuantLinear.from_float(weight, None, 4, 32, outliers)
    effective = layer.dequantized_weight()
    assert torch.equal(effective[:, outliers], weight[:, outliers])
    # int4 of the rotated weight, taken back to the input basis, is as close to W as int4 of W itself
    assert (effective - weight).norm() < 1.3 * (plain.dequantized_weight() - weight).norm()
    x = torch.randn(3, 70, 160).to(dtype)  # 210 rows: the dense-buffer path for bf16
    for rows in (x, x[:, :1]):  # and one row: the fused decode path
        want = rows.float() @ effective.T
        got = layer(rows).float()
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_gptq_on_rotated_weights_lowers_the_output_error_of_heavy_tailed_rows():
    torch.manual_seed(0)
    d = 256
    x = torch.randn(4096, d) @ (torch.randn(d, d) / d**0.5 + torch.eye(d))
    acc = HessianAccumulator(d, [])
    acc.add(x)
    h = acc.hessian("include")
    weight = torch.distributions.StudentT(2.5).sample((64, d)) * 0.02
    keep = torch.arange(d)
    rotation = InputRotation(draw_signs(d, d), 32)
    plain = gptq_quantize_weight(weight, h, 4, 128, [], clip_search=True)
    rotated = gptq_quantize_weight(
        rotation.rotate_columns(weight, keep).float(), rotation.rotate_hessian(h, keep).float(), 4, 128, [],
        clip_search=True,
    )  # fmt: skip
    back = rotation.apply_transposed(rotated.weight)
    error_plain = row_errors(weight, plain.weight, h).sum()
    error_rotated = row_errors(weight, back, h).sum()
    assert error_rotated < 0.5 * error_plain, (error_rotated, error_plain)


@pytest.fixture(scope="module")
def rotated_checkpoint(tmp_path_factory, stories_path):
    return quantized_tiny_llama(tmp_path_factory.mktemp("rotated"), stories_path, **{"weights.rotation": 16})


def test_a_rotated_checkpoint_loads_every_way_and_scores_the_same(rotated_checkpoint):
    from transformers import AutoModelForCausalLM

    qc = json.loads((rotated_checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 5
    assert all(spec["rotation"] == 16 for spec in qc["layers"].values())
    ours = load_model(rotated_checkpoint)
    layers = [m for m in ours.modules() if isinstance(m, SinkQuantLinear)]
    assert layers and all(m.spec.rotation == 16 for m in layers)
    assert list(inspect_checkpoint(rotated_checkpoint)["schemes"]) == [
        "int4 g32, inputs rotated (blocks of 16)"
    ]
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(rotated_checkpoint)(ids).logits
    assert torch.equal(want, hf)


def test_export_refuses_a_rotated_checkpoint_and_the_vllm_plugin_reads_its_specs(
    rotated_checkpoint, tmp_path
):
    with pytest.raises(InputError, match="rotated inputs"):
        export(rotated_checkpoint, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    qc = json.loads((rotated_checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] <= PLUGIN_FORMAT
    # every rotated layer's tensors are the ones the plugin's spec names, so vLLM can load them
    model = load_model(rotated_checkpoint)
    for name, spec in qc["layers"].items():
        module = model.get_submodule(name)
        buffers = {k: (tuple(v.shape), v.dtype) for k, v in module.named_buffers() if k != "bias"}
        assert buffers == dict(LayerSpec.from_dict(spec).shapes()), name


def test_rotation_is_refused_without_gptq():
    with pytest.raises(ValueError, match="rotation needs algorithm gptq"):
        Recipe().with_overrides(**{"weights.rotation": 32})


def test_linears_reading_one_input_share_its_rotation_only_while_it_is_unchanged(monkeypatch):
    """q/k/v (and gate/up) read one input: the second and third reuse the first's rotation of it, but
    an input changed in place, or a layer with other outlier columns, is rotated anew."""
    torch.manual_seed(0)

    def layer(outliers, seed):
        weight = torch.randn(48, 160, generator=torch.Generator().manual_seed(seed)) * 0.05
        keep = 160 - len(outliers)
        return SinkQuantLinear.from_float(
            weight, None, 4, 32, outliers, rotation=InputRotation(draw_signs(160, keep), 32)
        )

    q, k, other = layer([3, 70], 1), layer([3, 70], 2), layer([4, 70], 3)
    x = torch.randn(5, 160)

    def alone(module, inputs):  # the layer's output with nothing rotated before it
        forget_rotated_input()
        return module(inputs)

    calls = []
    real = InputRotation.apply
    monkeypatch.setattr(InputRotation, "apply", lambda self, t: calls.append(1) or real(self, t))
    with torch.no_grad():
        want_k, want_other = alone(k, x.clone()), alone(other, x.clone())
        calls.clear()
        q(x)
        assert torch.equal(k(x), want_k) and len(calls) == 1  # k reused q's rotation of x
        assert torch.equal(other(x), want_other) and len(calls) == 2
        q(x)
        x.mul_(2)  # in place: the rotation held for x is stale
        assert torch.equal(k(x), alone(k, x.clone()))


def test_a_rotated_layer_runs_under_inference_mode_rotating_each_input_itself():
    """torch.inference_mode (how vLLM runs) makes inference tensors, which keep no version counter: a
    rotated layer then rotates its input itself instead of reusing the last rotation, and still gives
    what it gives under no_grad, on every path."""
    weight = torch.randn(48, 160, generator=torch.Generator().manual_seed(0)) * 0.05
    layer = SinkQuantLinear.from_float(
        weight, None, 4, 32, [3, 70], rotation=InputRotation(draw_signs(160, 158), 32)
    )
    for rows in (1, 7, 80):
        x = torch.randn(rows, 160).to(torch.bfloat16)
        with torch.no_grad():
            forget_rotated_input()
            want = layer(x)
        with torch.inference_mode():
            first, second = layer(x.clone()), layer(x.clone())
        assert torch.equal(first, want) and torch.equal(second, want)
