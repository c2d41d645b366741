"""KVCacheConfig: the one typed KV config round-trips and refuses impossible settings in one line."""

from __future__ import annotations

import pytest

from sinkquant.errors import InputError
from sinkquant.kv import KVCacheConfig
from sinkquant.recipe import parse_recipe


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
            KVCacheConfig.from_dict(kwargs)
    with pytest.raises(InputError, match="unknown"):
        KVCacheConfig.from_dict({"bitz": 4})


def test_recipe_section_is_the_same_config():
    recipe = parse_recipe("kv_cache:\n  bits: 2\n  sinks: [2, 0, 2]\n")
    assert isinstance(recipe.kv_cache, KVCacheConfig) and recipe.kv_cache.sinks == [0, 2]
    assert KVCacheConfig.from_dict(recipe.kv_cache.to_dict()) == recipe.kv_cache
