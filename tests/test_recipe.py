from pathlib import Path

import pytest

from sinkquant.errors import InputError
from sinkquant.recipe import Recipe, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path):
    recipe = load_recipe(path)
    assert parse_recipe(recipe.to_yaml()) == recipe


def test_default_recipe_is_w4_g128_with_one_percent_outliers():
    r = Recipe()
    assert r.weights.bits == 4 and r.weights.group == 128 and r.weights.outliers.fraction == 0.01
    assert "lm_head" in r.weights.ignore and r.kv_cache is None


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "weights:\n  bits: 4\n  group_sise: 64\n",
            r"line 3: unknown key 'weights.group_sise'; did you mean 'group_size'",
        ),
        ("weights:\n  bits: 3\n", r"line 2: weights.bits"),
        (
            "weights:\n  group_size: 100\n",
            r"line 2: weights.group_size: group_size must be 32, 64, 128, 256 or 'channel'",
        ),
        ("weights:\n  outliers:\n    fraction: 0.9\n", r"line 3: weights.outliers.fraction"),
        ("weights:\n  outliers:\n    select: threshold\n", r"needs a `threshold`"),
        ("kv_cache:\n  bits: 3\n", r"line 2: kv_cache.bits"),
        ("kv_cache:\n  residual: many\n", r"kv_cache.residual: Input should be a valid integer"),
        ("kv_cache:\n  residual: 64\n  max_tokens: 40\n", r"max_tokens \(40\) must be at least"),
        ("calibraton:\n  samples: 4\n", r"unknown key 'calibraton'; did you mean 'calibration'"),
        ("weights: [1, 2\n", r"not valid YAML"),
        ("- a\n- b\n", r"must be a YAML mapping"),
        ("version: 99\n", r"newer than this sinkquant reads"),
    ],
)
def test_invalid_recipes_name_line_key_and_fix(text, message):
    with pytest.raises(InputError, match=message):
        parse_recipe(text, "r.yaml")


def test_missing_recipe_file_is_not_parsed_as_yaml(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_are_validated():
    r = Recipe().with_overrides(**{"weights.bits": 8, "kv_cache.bits": 2})
    assert r.weights.bits == 8 and r.kv_cache.bits == 2
    with pytest.raises(InputError, match="weights.bits"):
        Recipe().with_overrides(**{"weights.bits": 5})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"weights.bits": 8}, "4-bit groups"),
    ],
)
def test_log_scales_refuse_what_would_leave_their_grid(overrides, message):
    with pytest.raises(InputError, match=message):
        Recipe().with_overrides(**{"weights.log_scales": True, **overrides})
