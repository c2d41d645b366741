"""Property-based tests (hypothesis): the recipe loader and the bit packing hold for every input,
not just the examples someone thought of.

Recipe loader: any text either gives a valid `Recipe` or one `InputError` line, never another
exception; every valid recipe survives YAML and back unchanged; a misspelt key is reported with its
line and the key it was meant to be. Packing: int8/int4/int2 codes come back exactly, in the size
promised, and grouped quantization lands within half a step of every value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from sinkquant.errors import InputError
from sinkquant.format import LayerSpec
from sinkquant.format.primitives import (
    dequantize_grouped,
    dequantize_int8_per_channel,
    pack_bits,
    packed_size,
    quantize_grouped,
    quantize_int8_per_channel,
    unpack_bits,
)
from sinkquant.kv import KVCacheConfig
from sinkquant.recipe import CalibrationSection, Recipe, WeightsSection, parse_recipe

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- recipes -----------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20)


@st.composite
def kv_sections(draw) -> dict:
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.integers(8, 1024).filter(lambda g: g * bits % 8 == 0))
    residual = draw(st.integers(0, 512))
    sinks = draw(st.one_of(st.sampled_from(["auto", "none"]), st.lists(st.integers(0, 64), max_size=4)))
    n_sinks = len(sinks) if isinstance(sinks, list) else int(sinks == "auto")
    floor = max(16, n_sinks + group + residual)  # KVCacheConfig: max_tokens >= 16 and room for them all
    return {
        "bits": bits,
        "key_granularity": draw(st.sampled_from(["channel", "token"])),
        "group_size": group,
        "symmetric": draw(st.booleans()),
        "sinks": sinks,
        "residual": residual,
        "max_tokens": draw(st.one_of(st.none(), st.integers(floor, floor + 4096))),
        "key_outlier_channels": draw(st.integers(0, 32)),
    }


@st.composite
def weight_sections(draw) -> dict:
    select = draw(st.sampled_from(["max", "mean", "threshold"]))
    outliers = {"select": select, "fraction": draw(st.floats(0, 0.5, exclude_min=True))}
    if select == "threshold" or draw(st.booleans()):
        outliers["threshold"] = draw(st.floats(1e-3, 1e6))
    if draw(st.booleans()):
        outliers = None  # keep no outlier columns
    bits = draw(st.sampled_from([4, 8, None]))
    groups = [None, "channel"] if bits == 8 else [None, 32, 64, 128, 256, "channel"]  # int8 takes no group
    return {
        "bits": bits,
        "group_size": draw(st.sampled_from(groups)),
        "symmetric": draw(st.booleans()),
        "algorithm": draw(st.sampled_from(["rtn", "gptq"])),
        "clip_search": draw(st.booleans()),
        # the int4 features, drawn freely: the combinations the recipe refuses are part of the draw
        "log_scales": draw(st.booleans()),
        "rotation": draw(st.sampled_from([None, 2, 8, 32, 128, 3])),
        "grid": draw(st.sampled_from(["uniform", "lloyd"])),
        "outliers": outliers,
        "ignore": draw(st.lists(names, max_size=3)),
        "gptq": {
            "block_size": draw(st.integers(1, 512)),
            "damping": draw(st.floats(1e-4, 1.0)),
            "act_order": draw(st.booleans()),
            "sink_tokens": draw(st.sampled_from(["include", "exclude", "cap"])),
            "clip_search": draw(st.booleans()),
        },
    }


@st.composite
def recipe_dicts(draw) -> dict:
    data = {
        "name": draw(st.one_of(st.none(), names)),
        "calibration": {
            "dataset": draw(st.one_of(st.none(), names)),
            "samples": draw(st.integers(1, 4096)),
            "seq_len": draw(st.integers(16, 32768)),
            "seed": draw(st.integers(-(2**31), 2**31)),
        },
        "weights": draw(st.one_of(st.none(), weight_sections())),
        "kv_cache": draw(st.one_of(st.none(), kv_sections())),
    }
    # any subset of the keys: the rest take their defaults
    return {k: v for k, v in data.items() if draw(st.booleans())}


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
sections = st.sampled_from(["version", "name", "calibration", "weights", "kv_cache", "outliers", "bits"])


def _one_line_input_error(text: str) -> None:
    try:
        recipe = parse_recipe(text, "r.yaml")
    except InputError as exc:
        message = str(exc)
        assert message.startswith("r.yaml") and "\n" not in message and "\r" not in message
    else:
        assert isinstance(recipe, Recipe)


@FAST
@given(st.text(max_size=200))
def test_any_text_is_a_recipe_or_one_input_error(text):
    _one_line_input_error(text)


@FAST
@given(
    st.dictionaries(sections, yaml_values, max_size=3),
    st.dictionaries(st.text(max_size=8), yaml_values, max_size=2),
)
def test_any_yaml_structure_is_a_recipe_or_one_input_error(top, nested):
    _one_line_input_error(yaml.safe_dump(top))
    for section in ("calibration", "weights", "kv_cache"):
        _one_line_input_error(yaml.safe_dump({section: nested}))


@FAST
@given(recipe_dicts())
def test_drawn_recipes_load_and_round_trip_or_are_refused_in_one_line(data):
    try:
        recipe = parse_recipe(yaml.safe_dump(data, allow_unicode=True), "r.yaml")
    except InputError as exc:  # a combination the recipe's rules refuse (e.g. rotation with rtn)
        assert "\n" not in str(exc) and str(exc).startswith("r.yaml")
        with pytest.raises(ValueError):
            Recipe.model_validate(data)
        return
    assert recipe == Recipe.model_validate(data)
    assert parse_recipe(recipe.to_yaml()) == recipe


@FAST
@given(recipe_dicts())
def test_drawn_int4_features_reach_the_layer_format(data):
    """A recipe's int4 features are what the layer spec of its layers says (LayerSpec takes them)."""
    try:
        weights = Recipe.model_validate(data).weights
    except ValueError:
        return
    if weights is None or weights.bits != 4:
        return
    spec = LayerSpec(576, 192, 4, 128, 6, False, symmetric=weights.symmetric, log_scales=weights.log_scales,
                     rotation=weights.rotation, grid=None if weights.grid == "uniform" else weights.grid)  # fmt: skip
    again = LayerSpec.from_dict(spec.to_dict())
    assert again == spec
    fields = {f.field for f in spec.features()}
    assert ("rotation" in fields) == (weights.rotation is not None)
    assert ("grid" in fields) == (weights.grid != "uniform")
    assert ("log_scales" in fields) == weights.log_scales


SECTIONS = {
    "": Recipe,
    "calibration": CalibrationSection,
    "weights": WeightsSection,
    "kv_cache": KVCacheConfig,
}
SECTION_KEYS = [
    (section, key) for section, model in SECTIONS.items() for key in model.model_fields if len(key) >= 6
]


@FAST
@given(st.sampled_from(SECTION_KEYS), st.data())
def test_a_misspelt_key_names_its_line_and_the_key_meant(section_key, data):
    section, key = section_key
    cut = data.draw(st.integers(0, len(key) - 1))
    typo = key[:cut] + key[cut + 1 :]  # one letter dropped
    valid = SECTIONS[section].model_fields
    if typo in valid:
        return
    blank = data.draw(st.integers(0, 3))  # blank lines before the typo move its line
    text = "\n" * blank + (f"{section}:\n  {typo}: 1\n" if section else f"{typo}: 1\n")
    with pytest.raises(InputError) as info:
        parse_recipe(text, "r.yaml")
    line = blank + (2 if section else 1)
    assert f"r.yaml, line {line}: unknown key" in str(info.value)
    assert f"did you mean {key!r}?" in str(info.value)


# -- packing and quantization ------------------------------------------------------------------------------


@st.composite
def codes(draw) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from([2, 4, 8]))
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=37))
    values = draw(arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    return torch.from_numpy(values), bits


@FAST
@given(codes())
def test_pack_unpack_round_trips_int8_int4_int2(case):
    values, bits = case
    n = values.shape[-1]
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*values.shape[:-1], packed_size(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), values)


@FAST
@given(
    arrays(
        np.float32,
        array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    st.sampled_from([2, 4, 8]),
    st.integers(1, 48),
    st.booleans(),
)
def test_grouped_quantization_is_within_half_a_step(x, bits, group_size, symmetric):
    x = torch.from_numpy(x)
    codes_, scale, minimum = quantize_grouped(x, bits, group_size, symmetric)
    assert codes_.dtype == torch.uint8 and int(codes_.max()) <= 2**bits - 1
    assert scale.shape[-1] == -(-x.shape[-1] // group_size)  # the group size is kept, last group shorter
    back = dequantize_grouped(codes_, scale, minimum, group_size)
    step = scale.float().repeat_interleave(group_size, dim=-1)[..., : x.shape[-1]]
    assert bool(((back - x).abs() <= step * 0.5001 + 1e-4 * (x.abs() + 1)).all())
    packed = pack_bits(codes_, bits)
    assert torch.equal(unpack_bits(packed, bits, x.shape[-1]), codes_)


@FAST
@given(
    arrays(
        np.float32,
        array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e3, 1e3, width=32),
    )
)
def test_int8_per_channel_is_within_half_a_step(w):
    w = torch.from_numpy(w)
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    back = dequantize_int8_per_channel(q, scale)
    assert bool(((back - w).abs() <= scale[:, None] * 0.5001 + 1e-4 * (w.abs() + 1)).all())


def test_int8_with_a_group_is_refused_and_null_means_128_for_int4():
    with pytest.raises(InputError, match="int8"):
        parse_recipe("weights: {bits: 8, group_size: 64}")
    assert parse_recipe("weights: {bits: 8}").weights.group is None
    assert parse_recipe("weights: {bits: 4}").weights.group == 128
