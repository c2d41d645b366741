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
from sinkquant.kv import KVCacheConfig, SinkDetection, SinkQuantizedCache, SinkQuantizedLayer, build_cache
from sinkquant.kv.hooks import ModelHooks

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
    assert cache.memory_bytes()["key_outlier_channels"] > 0
    keys, _ = quantized_layers(cache)[0]._assemble()  # layer 0 sees the same inputs as the reference
    channels = top[0][None, :, None].expand(2, 2, 48, 2)
    assert torch.equal(keys.gather(-1, channels), ref.layers[0].keys.gather(-1, channels))
    assert not torch.equal(keys, ref.layers[0].keys)  # the other channels are quantized
    with pytest.raises(InputError, match="key_outlier_channels"):
        build_cache(llama, KVCacheConfig(key_outlier_channels=2), None)


def test_build_cache_from_report_and_shared_hooks(llama):
    signature = {"layer": 1, "dims": [3, 7], "threshold": 2000.0}
    report = SimpleNamespace(sinks=SimpleNamespace(positions=[0, 1]), massive_signature=lambda: signature)
    first = build_cache(llama, KVCacheConfig(), report)
    assert first.config.sinks == [0, 1] and first.detect == SinkDetection(
        layer=1, dims=[3, 7], threshold=2000.0
    )

    def hooks():
        return (
            len(llama._forward_pre_hooks),
            len(llama._forward_hooks),
            len(llama.model.layers[1]._forward_hooks),
        )

    assert hooks() == (1, 1, 1)
    second = build_cache(llama, KVCacheConfig(sinks="none"), report)  # joins the same hooks
    assert second.detect is None and second.config.sinks == "none"
    assert hooks() == (1, 1, 1)
    second.detach()
    assert hooks() == (1, 1, 1)  # the first cache still detects
    first.detach()
    assert hooks() == (0, 0, 0)  # the hooks go with the last cache
    plain = build_cache(llama, KVCacheConfig(), None)
    assert plain.config.sinks == "auto" and plain.flags.leading_positions == [0] and plain.detect is None
    plain.detach()
    build_cache(llama, KVCacheConfig(), report)  # never detached: a benchmark reusing the model
    build_cache(llama, KVCacheConfig(), report)
    assert hooks() == (1, 1, 1)
    ModelHooks.detach_all(llama)  # removes them whatever caches are still alive
    assert hooks() == (0, 0, 0)
    ModelHooks.detach_all(llama)  # and is a no-op on a model without any


def test_concurrent_generations_keep_their_own_caches(llama):
    """Two generations on one model at once, one per thread, each with its own detecting cache: each
    ends exactly as it does alone (the same tokens, the same sink flags)."""
    import threading

    prompts = [ids_for(1, 40, seed=5), ids_for(1, 40, seed=6)]
    detect = SinkDetection(layer=0, dims=list(range(64)), threshold=0.06)  # flags about half the tokens

    def run(ids, attached=lambda: None):
        cache = SinkQuantizedCache.for_model(llama, bits=4, sinks=[0], detect=detect, **SMALL)
        attached()  # both caches are attached before either generates
        out = llama.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
        cache.detach()
        return out, cache.flags.sink.clone()

    alone = [run(ids) for ids in prompts]
    assert not torch.equal(alone[0][1], alone[1][1])  # the prompts are flagged differently
    together: list = [None, None]
    both = threading.Barrier(2)

    def worker(i):
        together[i] = run(prompts[i], both.wait)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (out, sink), (out_alone, sink_alone) in zip(together, alone, strict=True):
        assert torch.equal(out, out_alone) and torch.equal(sink, sink_alone)


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
