"""The layer features are registry entries: their hooks are the only places that test them, and what
they declare (blocks, exclusions, kernels) is what the rest of sinkquant reads."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from sinkquant.format import FEATURES, LayerSpec
from sinkquant.format.features.rotation import BLOCKS
from sinkquant.recipe import RotationBlock

ROOT = Path(__file__).resolve().parents[2]
FEATURE_WORDS = set(FEATURES)
#: where a test of those words may stay, and why
ALLOWED = {
    "sinkquant/format": "the format module: the features themselves, the schemes' storage and primitives",
    "sinkquant/recipe.py": "the recipe schema validates the fields a user writes",
    # compressed-tensors' own `symmetric` argument (the export's target format), not the layer feature
    "sinkquant/export": "the export format's own quantization arguments",
}


def _feature_tests(tree: ast.AST):
    """(line, word) of every condition (if, while, assert, ternary, and/or, comprehension filter) that
    reads a name, attribute or string constant equal to a feature's spec field."""
    for node in ast.walk(tree):
        conditions = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            conditions.append(node.test)
        elif isinstance(node, ast.comprehension):
            conditions.extend(node.ifs)
        elif isinstance(node, ast.BoolOp):
            conditions.extend(node.values)
        for condition in conditions:
            for sub in ast.walk(condition):
                word = (
                    sub.id if isinstance(sub, ast.Name)
                    else sub.attr if isinstance(sub, ast.Attribute)
                    else sub.value if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                    else None
                )  # fmt: skip
                if word in FEATURE_WORDS:
                    yield condition.lineno, word


def test_no_feature_is_tested_outside_its_file_the_format_and_the_recipe():
    found = []
    for folder in ("sinkquant", "integrations/vllm/sinkquant_vllm"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if any(relative == place or relative.startswith(place + "/") for place in ALLOWED):
                continue
            found += [
                f"{relative}:{line} tests {word}"
                for line, word in _feature_tests(ast.parse(path.read_text()))
            ]
    assert not found, "a feature's behaviour belongs in its hooks (format/features/):\n" + "\n".join(found)


def test_the_scan_finds_a_feature_test():
    source = "def f(spec, x):\n    return x if spec.grid is None else g(x)\n"
    assert list(_feature_tests(ast.parse(source))) == [(2, "grid")]


def test_the_rotation_blocks_are_the_recipes():
    assert BLOCKS == get_args(RotationBlock)


def test_a_spec_refuses_the_features_a_feature_excludes():
    with pytest.raises(ValueError, match="lloyd grid with log scales"):
        LayerSpec(256, 64, 4, 128, 0, False, log_scales=True, grid="lloyd")
    with pytest.raises(ValueError, match="lloyd grid with symmetric"):
        LayerSpec(256, 64, 4, 128, 0, False, symmetric=True, grid="lloyd")


def test_pytorch_kernels_and_fused_layers_follow_the_features_declarations():
    plain = LayerSpec(256, 64, 4, 128, 2, False, rotation=32, log_scales=True)
    grid = LayerSpec(256, 64, 4, 128, 2, False, grid="lloyd")
    assert plain.pytorch_kernels and not grid.pytorch_kernels
    assert all(f.shares_fused_layer for f in plain.features())
    assert not all(f.shares_fused_layer for f in grid.features())
