"""SinkQuantizedCache: packing, closeness to DynamicCache, exact sinks, detection, padding, GQA,
sliding layers, crop/reorder, eviction, config round trip. Tiny random models; SmolLM2 once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from sinkquant.calibrate.keys import key_channel_stats, top_key_channels
from sinkquant.errors import InputError
from sinkquant.quantize.kv_cache import (
    KVCacheConfig,
    SinkDetection,
    SinkQuantizedCache,
    SinkQuantizedLayer,
    build_cache,
)
from sinkquant.quantize.kv_store import PackedTokens, TokenFlags

SMALL = {"group_size": 8, "residual": 8}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


def ids_for(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def feed(model, ids, cache, chunk=8, **kwargs) -> torch.Tensor:
    out = [
        model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True, **kwargs).logits
        for s in range(0, ids.shape[1], chunk)
    ]
    return torch.cat(out, dim=1)


def quantized_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, SinkQuantizedLayer)]


def test_config_round_trip_and_errors():
    config = KVCacheConfig(
        bits=2, key_granularity="token", group_size=32, symmetric=True, sinks=[3, 0],
        residual=16, max_tokens=128, key_outlier_channels=2,
    )  # fmt: skip
    assert config.sinks == [0, 3]
    assert KVCacheConfig.from_dict(config.to_dict()) == config
    assert KVCacheConfig.from_dict(KVCacheConfig().to_dict()) == KVCacheConfig()
    bad = [{"bits": 3}, {"key_granularity": "head"}, {"bits": 2, "group_size": 6}, {"sinks": "some"},
           {"residual": -1}, {"max_tokens": 10}, {"value_granularity": "channel"}]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(InputError):
            KVCacheConfig(**kwargs)
    with pytest.raises(InputError, match="unknown"):
        KVCacheConfig.from_dict({"bitz": 4})


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_packed_tokens_hold_packed_bytes(bits, per_channel):
    x = torch.randn(2, 3, 32, 16)
    store = PackedTokens(bits, 8, False, per_channel)
    store.append(x[:, :, :16])
    store.append(x[:, :, 16:])
    codes, params = store.nbytes()
    assert store.codes.dtype == torch.uint8 and codes == 2 * 3 * 32 * 16 * bits // 8
    groups = 16 * (32 // 8) if per_channel else 32 * (16 // 8)
    assert params == 2 * (2 * 3 * groups) * 2  # scale + minimum, float16
    step = (x.max() - x.min()) / (2**bits - 1)
    assert (store.dequantize(torch.float32) - x).abs().max() <= step / 2 * 1.01 + 1e-3
    store.drop_front(8)
    assert store.length == 24
    assert (store.dequantize(torch.float32) - x[:, :, 8:]).abs().max() <= step / 2 * 1.01 + 1e-3


def test_cache_close_to_dynamic_and_bytes_held(llama):
    ids = ids_for(1, 96)
    ref = feed(llama, ids, DynamicCache(config=llama.config))
    for bits, tol in [(8, 2e-3), (4, 5e-2)]:
        cache = SinkQuantizedCache.for_model(llama, bits, **SMALL)
        out = feed(llama, ids, cache)
        assert (out - ref).abs().max() < tol * ref.abs().max()
        assert cache.get_seq_length() == 96
        mem = cache.memory_bytes()
        quantized = sum(layer.quantized_length for layer in quantized_layers(cache))
        assert quantized > 0 and all(layer.tail_length() >= 8 for layer in quantized_layers(cache))
        assert mem["codes"] == quantized * 2 * 16 * 2 * bits // 8  # tokens x kv heads x head_dim x (K, V)
        assert mem["sinks_fp"] == 2 * 2 * 16 * 4 * 2  # one sink, K and V, 2 layers, float32
        assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
        cache.detach()


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


def _inject(position: int, dim: int, value: float, length: int):
    """Forward hook adding `value` to h[:, position, dim] on the forward that feeds `length` tokens."""

    def hook(_module, _args, out):
        if out.shape[1] != length:
            return None
        out = out.clone()
        out[:, position, dim] += value
        return out

    return hook


def test_runtime_detection_of_a_later_sink(llama):
    ids = ids_for(1, 64, seed=2)
    handle = llama.model.layers[0].register_forward_hook(_inject(13, 5, 1e4, 40))
    try:
        ref = DynamicCache(config=llama.config)
        feed(llama, ids[:, :40], ref, chunk=40)
        feed(llama, ids[:, 40:], ref)
        detect = SinkDetection(layer=0, dims=[5], threshold=1000.0)
        cache = SinkQuantizedCache.for_model(llama, 2, detect=detect, **SMALL)
        feed(llama, ids[:, :40], cache, chunk=40)
        feed(llama, ids[:, 40:], cache)
    finally:
        handle.remove()
        cache.detach()
    assert cache.flags.sink.nonzero().flatten().tolist() == [0, 13]
    for layer, ref_layer in zip(quantized_layers(cache), ref.layers, strict=True):
        assert layer._sink_pos.tolist() == [0, 13]
        keys, values = layer._assemble()
        assert torch.equal(keys[:, :, 13], ref_layer.keys[:, :, 13])
        assert torch.equal(values[:, :, [0, 13]], ref_layer.values[:, :, [0, 13]])
        assert not torch.equal(keys[:, :, 12], ref_layer.keys[:, :, 12])  # a normal token is quantized


def _left_padded(batch_pads, n):
    ids = ids_for(len(batch_pads), n, seed=3)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(batch_pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def test_left_padding_never_a_sink_and_generate_with_gqa(llama):
    ids, mask = _left_padded([2, 5], 30)
    kwargs = {
        "max_new_tokens": 12,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    with torch.no_grad():
        ref = llama.generate(ids, attention_mask=mask, **kwargs)
        cache = SinkQuantizedCache.for_model(llama, 8, **SMALL)
        out = llama.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)
    cache.detach()
    assert cache.flags.leading.nonzero().flatten().tolist() == [2, 5]
    assert all(layer._sink_pos.tolist() == [2, 5] for layer in quantized_layers(cache))
    assert cache.get_seq_length() == 30 + 12 - 1
    assert quantized_layers(cache)[0].keys.shape[1] == 2  # GQA: the cache holds the 2 KV heads
    ref_logits, logits = torch.stack(ref.logits), torch.stack(out.logits)
    assert (logits - ref_logits).abs().max() < 1e-2 * ref_logits.abs().max()


def test_sliding_window_layers_keep_working_through_generate(gemma):
    ids = ids_for(1, 24, seed=4)
    kwargs = {
        "max_new_tokens": 16,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    with torch.no_grad():
        ref = gemma.generate(ids, past_key_values=DynamicCache(config=gemma.config), **kwargs)
        cache = SinkQuantizedCache.for_model(gemma, 8, **SMALL)
        out = gemma.generate(ids, past_key_values=cache, **kwargs)
    cache.detach()
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, SinkQuantizedLayer] * 2
    assert cache.memory_bytes()["sliding"] > 0 and quantized_layers(cache)[0].quantized_length > 0
    ref_logits, logits = torch.stack(ref.logits), torch.stack(out.logits)
    assert (logits - ref_logits).abs().max() < 1e-2 * ref_logits.abs().max()


def test_crop_and_reorder(llama):
    ids = ids_for(2, 40, seed=5)
    cache = SinkQuantizedCache.for_model(llama, 4, **SMALL)
    feed(llama, ids, cache)
    layer = quantized_layers(cache)[0]
    cache.crop(-3)
    assert cache.get_seq_length() == 37 and cache.flags.length == 37 and layer.held_length == 37
    with pytest.raises(InputError, match="already quantized"):
        cache.crop(-(layer.tail_length() + 1))
    assert cache.get_seq_length() == 37  # a refused crop changes nothing
    logits = feed(llama, ids[:, 37:], cache)
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 40
    keys, values = layer._assemble()
    cache.reorder_cache(torch.tensor([1, 0]))
    keys2, values2 = layer._assemble()
    assert torch.equal(keys2, keys.flip(0)) and torch.equal(values2, values.flip(0))
    assert torch.equal(cache.flags.real, torch.ones(2, 40, dtype=torch.bool))
    cache.detach()


def test_beam_search_and_prompt_lookup_run(llama):
    ids = ids_for(2, 30, seed=8)
    with torch.no_grad():
        beams = SinkQuantizedCache.for_model(llama, 8, **SMALL)
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=10,
                             do_sample=False, past_key_values=beams)  # fmt: skip
        lookup = SinkQuantizedCache.for_model(llama, 8, **SMALL)  # assisted decoding crops rejected tokens
        llama.generate(
            ids[:1], max_new_tokens=10, do_sample=False, past_key_values=lookup, prompt_lookup_num_tokens=3
        )
    lookup.detach()
    assert out.shape == (2, 40) and beams.flags.real.shape == (6, 39) and beams.get_seq_length() == 39
    assert lookup.get_seq_length() == lookup.flags.length == 39


@pytest.mark.parametrize("sinks", [[0], "none"])
def test_eviction_keeps_sinks_and_mask_sizes(llama, sinks):
    ids = ids_for(1, 160, seed=6)
    cache = SinkQuantizedCache.for_model(llama, 4, sinks=sinks, max_tokens=32, **SMALL)
    layer = quantized_layers(cache)[0]
    ref = DynamicCache(config=llama.config)
    feed(llama, ids[:, :8], ref)
    with torch.no_grad():
        for s in range(0, 160, 8):
            kv_length, kv_offset = cache.get_mask_sizes(8, 0)
            logits = llama(input_ids=ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits
            assert torch.isfinite(logits).all()
            assert layer.held_length == kv_length and kv_offset == s + 8 - kv_length
            assert kv_length - 8 <= 32
    cache.detach()
    assert cache.get_seq_length() == 160 and layer.body_start > 0
    keys, _ = layer._assemble()
    if sinks == [0]:
        assert layer._sink_pos.tolist() == [0] and torch.equal(keys[:, :, 0], ref.layers[0].keys[:, :, 0])
    else:
        assert layer._sink_pos.numel() == 0
    padded = SinkQuantizedCache.for_model(llama, 4, max_tokens=32, **SMALL)
    ids, mask = _left_padded([0, 2], 8)
    with pytest.raises(InputError, match="padded"):
        llama(input_ids=ids, attention_mask=mask, past_key_values=padded, use_cache=True)
    padded.detach()


def test_key_outlier_channels_exact(llama):
    ids = ids_for(2, 48, seed=7)
    stats = key_channel_stats(llama, ids)
    assert sorted(stats) == [0, 1] and stats[0].shape == (2, 16)
    top = top_key_channels(stats, 2)
    assert top[1].shape == (2, 2) and torch.equal(top[1][:, 0], stats[1].argmax(dim=-1))
    ref = DynamicCache(config=llama.config)
    feed(llama, ids, ref)
    cache = build_cache(
        llama, KVCacheConfig(bits=2, sinks="none", key_outlier_channels=2, **SMALL), None, top
    )
    feed(llama, ids, cache)
    cache.detach()
    assert cache.memory_bytes()["key_outliers"] > 0
    keys, _ = quantized_layers(cache)[0]._assemble()  # layer 0 sees the same inputs as the reference
    channels = top[0][None, :, None].expand(2, 2, 48, 2)
    assert torch.equal(keys.gather(-1, channels), ref.layers[0].keys.gather(-1, channels))
    assert not torch.equal(keys, ref.layers[0].keys)  # the other channels are quantized
    with pytest.raises(InputError, match="key_outlier_channels"):
        build_cache(llama, KVCacheConfig(key_outlier_channels=2), None)


def test_build_cache_from_report_and_hook_replacement(llama):
    signature = {"layer": 1, "dims": [3, 7], "threshold": 2000.0}
    report = SimpleNamespace(sinks=SimpleNamespace(positions=[0, 1]), massive_signature=lambda: signature)
    first = build_cache(llama, KVCacheConfig(), report)
    assert first.config.sinks == [0, 1] and first.detect == SinkDetection(
        layer=1, dims=[3, 7], threshold=2000.0
    )
    hooks = (
        len(llama._forward_pre_hooks),
        len(llama._forward_hooks),
        len(llama.model.layers[1]._forward_hooks),
    )
    assert hooks == (1, 1, 1)
    second = build_cache(llama, KVCacheConfig(sinks="none"), report)  # replaces the first cache's hooks
    assert second.detect is None and second.config.sinks == "none"
    assert (len(llama._forward_pre_hooks), len(llama.model.layers[1]._forward_hooks)) == (1, 0)
    second.detach()
    assert len(llama._forward_pre_hooks) == 0 and len(llama._forward_hooks) == 0
    plain = build_cache(llama, KVCacheConfig(), None)
    assert plain.config.sinks == "auto" and plain.flags.leading_positions == [0] and plain.detect is None
    plain.detach()


def test_smollm2_detection_separates_the_sink(smollm2, c4_path):
    from sinkquant import calibrate
    from sinkquant.data import tokenize_text

    model, tok = smollm2
    report = calibrate(model, tok, c4_path, samples=2, seq_len=128, progress=False)
    detect = SinkDetection.from_report(report)
    assert detect is not None
    text = "The tower is 324 metres tall.\n\nIt was the first structure to reach that height.\n" * 6
    ids = torch.tensor(tokenize_text(tok, text)[:96])[None]

    def hook_counts():  # transformers itself may leave output-capturing hooks behind: compare, not zero
        return len(model._forward_pre_hooks), [len(layer._forward_hooks) for layer in model.model.layers]

    before = hook_counts()
    cache = build_cache(model, KVCacheConfig(bits=4, group_size=16, residual=16), report)
    assert hook_counts() != before
    try:
        feed(model, ids, cache, chunk=32)
    finally:
        cache.detach()
    assert cache.flags.sink.nonzero().flatten().tolist() == report.sinks.positions == [0]
    assert hook_counts() == before


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
def test_compiled_kv_dequantization_equals_the_torch_ops(bits, per_channel, param_dtype, monkeypatch):
    """The one-call C++ unpack + dequantize gives the torch ops' numbers bit for bit, strides included
    (after a front drop too)."""
    from sinkquant.kernels import fused_kernels
    from sinkquant.quantize import kv_store

    if fused_kernels() is None:
        pytest.skip("sinkquant's CPU kernels cannot be built here (needs AVX2, a C++ compiler and ninja)")
    torch.manual_seed(0)
    store = kv_store.PackedTokens(bits, 32 if per_channel else 48, False, per_channel)
    store.param_dtype = param_dtype
    for _ in range(3):
        store.append(torch.randn(2, 3, 64, 40) * 3)
    store.drop_front(32 if per_channel else 5)
    for dtype in (torch.float32, torch.bfloat16):
        fast = store.dequantize(dtype)
        with monkeypatch.context() as patch:
            patch.setattr(kv_store, "fused_kernels", lambda: None)
            slow = store.dequantize(dtype)
        assert torch.equal(fast, slow) and fast.stride() == slow.stride() and fast.dtype == dtype
