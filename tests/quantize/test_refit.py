import pytest
import torch

from sinkquant.quantize.refit import refit_group_params, row_errors


def _problem(out=12, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) @ (torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n))
    x[0, :7] *= 50  # one token with large activations, as a sink has
    h = (x.T @ x).double() / x.shape[0]
    codes = torch.randint(0, 16, (out, n), generator=g).float()
    return h, codes, g


def _dequantize(codes, scale, minimum, group):
    n = codes.shape[1]
    s = scale.repeat_interleave(group, dim=1)[:, :n]
    m = minimum.repeat_interleave(group, dim=1)[:, :n]
    return codes.double() * s + m


@pytest.mark.parametrize("symmetric", [False, True])
def test_recovers_the_parameters_that_made_the_weights(symmetric):
    h, codes, g = _problem()
    scale = torch.rand(12, 3, generator=g, dtype=torch.float64) * 0.01 + 0.001  # 300 = 128 + 128 + 44
    minimum = -8 * scale if symmetric else torch.randn(12, 3, generator=g, dtype=torch.float64) * 0.05
    weight = _dequantize(codes, scale, minimum, 128)
    got_scale, got_min = refit_group_params(weight, codes, h, 128, symmetric)
    torch.testing.assert_close(got_scale, scale, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got_min, minimum, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("symmetric", [False, True])
def test_is_the_weighted_least_squares_optimum(symmetric):
    """Against a direct solve of one row's design matrix (columns: code and one per group), and no
    small change of any parameter lowers the error."""
    h, codes, g = _problem(out=3)
    weight = torch.randn(3, 300, generator=g, dtype=torch.float64) * 0.05
    scale, minimum = refit_group_params(weight, codes, h, 128, symmetric)
    groups = torch.arange(300) // 128
    for row in range(3):
        cols = []
        for k in range(3):
            in_group = (groups == k).double()
            cols.append(in_group * (codes[row].double() - 8) if symmetric else in_group * codes[row].double())
            if not symmetric:
                cols.append(in_group)
        design = torch.stack(cols, dim=1)
        theta = torch.linalg.solve(design.T @ h @ design, design.T @ h @ weight[row])
        want_scale = theta if symmetric else theta[0::2]
        torch.testing.assert_close(scale[row], want_scale, rtol=1e-6, atol=1e-10)
    best = row_errors(weight, _dequantize(codes, scale, minimum, 128), h)
    for k in range(3):
        for delta in (1e-4, -1e-4):
            moved = scale.clone()
            moved[:, k] += delta
            moved_min = -8 * moved if symmetric else minimum
            assert (row_errors(weight, _dequantize(codes, moved, moved_min, 128), h) > best).all()


def test_constant_codes_and_dead_inputs_give_finite_parameters():
    h, codes, g = _problem(out=4, n=256)
    h[:, 10:20] = 0
    h[10:20] = 0  # dead inputs
    codes[0] = 5  # every code of row 0 equal: its scale and minimum are collinear
    weight = torch.randn(4, 256, generator=g, dtype=torch.float64) * 0.05
    scale, minimum = refit_group_params(weight, codes, h, 64, False)
    assert torch.isfinite(scale).all() and torch.isfinite(minimum).all()
