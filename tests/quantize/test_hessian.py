"""The Hessian GPTQ works from: sink rows included, excluded or capped; xᵀx from upper blocks equal
to the full product; the upper factor of H⁻¹ from one Cholesky."""

import pytest
import torch

from sinkquant.errors import SinkQuantError
from sinkquant.quantize.hessian import HessianAccumulator, _gram, inverse_hessian_factor


def _hessian(x, sinks=(), mode="include"):
    acc = HessianAccumulator(x.shape[-1], list(sinks))
    acc.add(x)
    return acc.hessian(mode)


def test_upper_factor_of_the_inverse_is_the_cholesky_factor_of_the_inverse():
    torch.manual_seed(0)
    x = torch.randn(512, 40, dtype=torch.float64)
    h = x.T @ x / 512
    upper, used = inverse_hessian_factor(h, 0.0, "layer")
    assert used == 0.0 and torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(h), atol=1e-10)
    cols = torch.tensor([5, 1, 30, 7])  # restricted to columns, in that order
    sub, _ = inverse_hessian_factor(h, 0.0, "layer", columns=cols)
    assert torch.allclose(sub.T @ sub, torch.linalg.inv(h[cols][:, cols]), atol=1e-10)
    with (
        pytest.warns(UserWarning, match="not positive definite"),
        pytest.raises(SinkQuantError, match="could not"),
    ):
        inverse_hessian_factor(-h, 0.0, "layer")  # negative definite at every damping


def test_sink_rows_included_excluded_or_capped():
    x = torch.randn(2, 6, 4)
    x[:, 0, 1] = 50.0  # a massive activation at the sink position
    body = x[:, 1:].reshape(-1, 4)
    sink = x[:, 0]
    capped = torch.minimum(torch.maximum(sink, -body.abs().amax(0)), body.abs().amax(0))
    expect = {
        "include": (body.T @ body + sink.T @ sink) * 2 / 12,
        "exclude": body.T @ body * 2 / 10,
        "cap": (body.T @ body + capped.T @ capped) * 2 / 12,
    }
    for mode, h in expect.items():
        assert torch.allclose(_hessian(x, [0], mode).float(), h, rtol=1e-5, atol=1e-5), mode


def test_max_is_tracked_only_when_cap_needs_it():
    x = torch.randn(2, 6, 4)
    acc = HessianAccumulator(4, [0], track_max=False)
    acc.add(x)
    assert torch.equal(acc.hessian("include"), _hessian(x, [0], "include"))
    with pytest.raises(ValueError, match="track_max"):
        acc.hessian("cap")


@pytest.mark.parametrize("width", [100, 300, 576, 1000])
def test_gram_from_upper_blocks_is_the_full_product(width):
    x = torch.randn(700, width)
    x[:, 7] *= 300
    h = _gram(x)
    assert torch.equal(h, h.T)
    assert torch.allclose(h, x.T @ x, rtol=1e-5, atol=1e-2)


def test_a_wide_layer_factors_in_float32_close_to_float64():
    from sinkquant.quantize import hessian as module

    torch.manual_seed(0)
    x = torch.randn(600, 300, dtype=torch.float64)
    h = x.T @ x / 600
    exact, _ = inverse_hessian_factor(h, 0.01, "narrow")
    wide = module.WIDE_FACTOR
    try:
        module.WIDE_FACTOR = 256  # treat this 300-column layer as wide
        fast, used = inverse_hessian_factor(h, 0.01, "wide")
    finally:
        module.WIDE_FACTOR = wide
    assert fast.dtype == torch.float32 and exact.dtype == torch.float64 and used == 0.01
    assert torch.allclose(fast.double(), exact, rtol=1e-3, atol=1e-4)
