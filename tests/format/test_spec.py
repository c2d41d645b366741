"""The layer format (sinkquant/format): one LayerSpec, its features from the registry, and what follows
from them (format version, buffers, descriptions, export refusals)."""

import pytest
import torch

from sinkquant.format import FEATURES, FORMAT_VERSION, LayerSpec, export_refusals, format_version_for

BASE = {"in_features": 576, "out_features": 192, "bits": 4, "group_size": 128, "outliers": 6, "bias": False}
VARIANTS = {
    "plain": {},
    "int8": {"bits": 8, "group_size": None},
    "per-channel": {"group_size": None},
    "symmetric": {"symmetric": True},
    "log-scales": {"symmetric": True, "log_scales": True},
    "rotation": {"rotation": 32},
    "grid": {"rotation": 32, "grid": "lloyd"},
    "bias-bf16": {"bias": True, "dtype": "bfloat16"},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_dict_round_trip(name):
    spec = LayerSpec.from_dict({**BASE, "symmetric": False, **VARIANTS[name]})
    again = LayerSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_dict_has_each_feature_only_where_set():
    plain = LayerSpec.from_dict(BASE).to_dict()
    assert plain == {**BASE, "dtype": "float16", "symmetric": False}
    grid = LayerSpec.from_dict({**BASE, "rotation": 32, "grid": "lloyd"}).to_dict()
    assert grid["rotation"] == 32 and grid["grid"] == "lloyd" and "log_scales" not in grid


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="not in sinkquant's format"):
        LayerSpec.from_dict({**BASE, "sparsity": 0.5})


def test_bad_bits_and_outliers_are_refused():
    with pytest.raises(ValueError, match="4 or 8 bits"):
        LayerSpec.from_dict({**BASE, "bits": 3})
    with pytest.raises(ValueError, match="outlier columns"):
        LayerSpec.from_dict({**BASE, "outliers": 600})


@pytest.mark.parametrize(
    ("extra", "version"),
    [({}, 2), ({"bits": 8, "symmetric": True}, 2), ({"symmetric": True}, 3), ({"log_scales": True}, 4),
     ({"rotation": 32}, 5), ({"rotation": 32, "grid": "lloyd"}, 6)],
)  # fmt: skip
def test_format_version_is_the_newest_feature(extra, version):
    assert LayerSpec.from_dict({**BASE, **extra}).format_version == version
    layers = {"a": BASE, "b": {**BASE, **extra}}
    assert format_version_for(layers) == version
    assert FORMAT_VERSION == max(f.since for f in FEATURES.values())


def test_buffers_follow_the_features():
    plain = LayerSpec.from_dict(BASE).shapes()
    assert list(plain) == ["weight", "weight_scale", "weight_min", "outlier_idx", "outlier_weight"]
    assert plain["weight"] == ((192, 285), torch.uint8) and plain["weight_scale"] == (
        (192, 5),
        torch.bfloat16,
    )
    sym_log = LayerSpec.from_dict({**BASE, "symmetric": True, "log_scales": True}).shapes(
        out_features=384, shards=2
    )
    assert list(sym_log)[:3] == ["weight", "weight_scale_code", "weight_scale_top"]
    assert "weight_min" not in sym_log and sym_log["weight_scale_top"] == ((2,), torch.int32)
    grid = LayerSpec.from_dict({**BASE, "rotation": 32, "grid": "lloyd"}).shapes(shards=3)
    assert grid["input_signs"] == ((72,), torch.uint8) and grid["weight_levels"] == ((48,), torch.float32)
    int8 = LayerSpec.from_dict({**BASE, "bits": 8, "symmetric": True}).shapes()
    assert int8["weight"] == ((192, 570), torch.int8) and "weight_min" not in int8


def test_descriptions_and_refusals_come_from_the_registry():
    spec = LayerSpec.from_dict({**BASE, "rotation": 32, "grid": "lloyd"})
    assert spec.scheme_text() == "int4 g128, inputs rotated (blocks of 32), lloyd grid"
    assert LayerSpec.from_dict({**BASE, "bits": 8, "group_size": None}).scheme_text() == "int8"
    layers = {"x.q": {**BASE, "rotation": 32}, "x.k": {**BASE, "rotation": 32, "grid": "lloyd"}, "x.o": BASE}
    refused = {feature.field: names for feature, names in export_refusals(layers)}
    assert list(refused) == ["grid", "rotation"]
    assert refused == {"rotation": ["x.k", "x.q"], "grid": ["x.k"]}


@pytest.mark.parametrize("extra", [{"log_scales": True}, {"grid": "lloyd"}])
def test_int4_only_features_refuse_int8(extra):
    with pytest.raises(ValueError, match="int4 layers"):
        LayerSpec.from_dict({**BASE, "bits": 8, **extra})


def test_missing_key_is_named():
    with pytest.raises(ValueError, match="lacks \\['outliers'\\]"):
        LayerSpec.from_dict({k: v for k, v in BASE.items() if k != "outliers"})
