"""SinkQuantizedLayer on its own: sinks exact and out of the group statistics; planning is pure."""

import torch

from sinkquant.kv import KVCacheConfig, SinkQuantizedLayer
from sinkquant.kv.flags import TokenFlags
from sinkquant.kv.layer import plan_update

SMALL = {"group_size": 8, "residual": 8}


def test_sinks_exact_and_excluded_from_group_statistics():
    x = torch.randn(1, 2, 40, 16)
    x[:, :, 0] *= 1000  # a massive sink key/value

    def run(sinks):
        config = KVCacheConfig(bits=4, sinks=sinks, **SMALL)
        layer = SinkQuantizedLayer(config, TokenFlags(config.leading_sinks, detecting=False))
        layer.update(x[:, :, :32], x[:, :, :32])
        return layer.update(x[:, :, 32:], x[:, :, 32:])

    k, v = run([0])
    assert torch.equal(k[:, :, 0], x[:, :, 0]) and torch.equal(v[:, :, 0], x[:, :, 0])
    err_sink = (k[:, :, 1:8] - x[:, :, 1:8]).abs().max()
    k_plain, _ = run("none")
    err_plain = (k_plain[:, :, 1:8] - x[:, :, 1:8]).abs().max()
    assert err_sink * 20 < err_plain


def test_planning_changes_nothing_and_quantizes_whole_groups_past_the_residual():
    config = KVCacheConfig(bits=4, sinks=[0], **SMALL)
    flags = TokenFlags(config.leading_sinks, detecting=False)
    layer = SinkQuantizedLayer(config, flags)
    x = torch.randn(1, 2, 30, 16)
    layer.update(x[:, :, :29], x[:, :, :29])  # tokens move into the body at the next update
    layer.update(x[:, :, 29:], x[:, :, 29:])  # 29 old tokens: two groups quantized, 13 + 1 in the tail
    assert layer.quantized_length == 16 and layer.tail_length() == 14
    before = layer.get_mask_sizes(1)
    assert layer.get_mask_sizes(1) == before  # asking twice plans twice, changes nothing
    flush, evict, drop, held = plan_update(
        config, flags, layer.cumulative_length, layer.body_start, layer.quantized_length,
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
    )  # fmt: skip
    assert (flush, evict, drop, held) == (0, 0, 0, 30)


def test_flags_count_leading_sinks_from_each_rows_first_real_token():
    flags = TokenFlags([0], detecting=False)
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    flags.begin(2, 4, real, torch.device("cpu"))
    assert flags.sink.tolist() == [True, False, True, False]  # row 2 starts at 0, row 1 at 2
    assert flags.has_padding() and flags.known == 4
    flags.crop(2)
    assert flags.length == 2 and flags.real.shape == (2, 2)
