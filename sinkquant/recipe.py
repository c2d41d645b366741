"""Recipes: one YAML file says everything a sinkquant run does.

    calibration: {dataset, samples, seq_len, seed}
    weights:     {bits, group_size, symmetric, log_scales, algorithm, outliers: {select, fraction, threshold},
                  ignore, gptq}
    kv_cache:    {bits, key_granularity, value_granularity, group_size, symmetric, sinks, residual,
                  max_tokens, key_outlier_channels}    (`sinkquant.kv.KVCacheConfig`)

Validation is strict (pydantic, extra="forbid"): an unknown key, a wrong type or an impossible value
is an `InputError` naming the file, the line, the key and, for a typo, the nearest valid key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .calibration_settings import CalibrationSection
from .errors import InputError
from .kv.config import KVCacheConfig
from .schema import StrictModel, error_path

if TYPE_CHECKING:  # the CLI reads recipes before it needs torch
    import torch

    from .format import LayerSpec

RECIPE_VERSION = 1
DEFAULT_IGNORE = ["lm_head", "re:.*embed.*", "re:.*wte$", "re:.*wpe$"]
DEFAULT_GROUP = 128  # int4 group size when a recipe gives none


class OutlierSection(StrictModel):
    """Which input columns of each linear layer stay at full precision.

    select=max|mean: the top `fraction` of input channels by max |x| (or mean |x|) over the calibration
    tokens; select=threshold: every channel whose max |x| exceeds `threshold`. To keep no columns, set
    the whole section to null (`outliers: null`): a fraction of 0 would be a rule that selects nothing,
    so it is refused rather than read as "off"."""

    select: Literal["max", "mean", "threshold"] = "mean"
    fraction: float = 0.01
    threshold: float | None = Field(None, gt=0)

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, value):
        if value <= 0:
            raise ValueError(
                "fraction must be above 0; to keep no outlier columns, set `outliers: null` "
                "(or pass --no-outliers)"
            )
        if value > 0.5:
            raise ValueError("fraction must be at most 0.5 (keeping more columns dense saves nothing)")
        return value

    @model_validator(mode="after")
    def _threshold_needs_value(self) -> OutlierSection:
        if self.select == "threshold" and self.threshold is None:
            raise ValueError(
                "select: threshold needs a `threshold` value (max |x| above which a channel is kept)"
            )
        return self


class GPTQSection(StrictModel):
    """Options of the error-compensating GPTQ algorithm (weights.algorithm: gptq)."""

    block_size: int = Field(128, ge=1)
    damping: float = Field(0.01, gt=0, le=1.0)
    act_order: bool = False
    sink_tokens: Literal["include", "exclude", "cap"] = "include"
    # each group's range shrunk per row to the factor that minimises the diag(H)-weighted rounding
    # error of the group's current weights (GPTQ's counterpart of weights.clip_search)
    clip_search: bool = False
    # the dtype each decoder layer computes its calibration forward pass and Hessians in. float64 makes
    # the checkpoint independent of the BLAS's code path (which differs between CPUs and cannot be
    # pinned: eval/results/bench/mkl_numerics.md): its last-bit differences fall far below float32's rounding
    # of the layer's output, so GPTQ's sweep sees the same inputs. float32 is faster.
    precision: Literal["float32", "float64"] = "float32"
    # where each int4 group's range comes from: `sweep`, GPTQ's own (from the group's current weights
    # when the sweep reaches it, shrunk by `clip_search`); `rtn`, the range the rtn algorithm gives the
    # same group of the original weights (its activation-weighted search where `clip_search_judge`
    # keeps it, min/max elsewhere), fixed before the sweep, so GPTQ only chooses the codes on the
    # default recipe's grid (int4 on uniform asymmetric grids without rotation or log scales; int8
    # ignores it)
    ranges: Literal["sweep", "rtn"] = "sweep"


#: the rotation blocks a recipe may ask for (`weights.rotation`): powers of two up to one int4 group of
#: 128; format/features/rotation.py's BLOCKS lists the same
RotationBlock = Literal[2, 4, 8, 16, 32, 64, 128]

#: the int4 grids a recipe may ask for (`weights.grid`; format/features/grid.py)
Grid = Literal["uniform", "lloyd"]


class WeightsSection(StrictModel):
    """bits: 4 (groups along the input) or 8 (one scale per output channel). group_size: the int4
    group (null: 128), or "channel" for one group per output row; int8 takes none."""

    bits: Literal[4, 8] | None = 4
    group_size: int | Literal["channel"] | None = None
    symmetric: bool = False
    # int4: each group's scale stored in one byte on a grid of 1/32 octave (8 octaves below one exponent
    # per layer) instead of bf16: 8 bits per group fewer, each scale within half a grid step (2^(1/64):
    # 1.09%) of its min/max value before bf16 rounds the grid point (at most 0.39% more)
    log_scales: bool = False
    algorithm: Literal["rtn", "gptq"] = "rtn"
    # int4 RTN: pick each group's range among shrunk min/max ranges by activation-weighted error
    clip_search: bool = True
    # whether the sink positions' tokens weigh that error. `exclude` (mean |x| over the other tokens) by
    # default: a sink's massive activation (10^3-10^5, one token per sample) would otherwise fit a group's
    # range to that one token, whatever the model; the outlier columns still see every token
    clip_sink_tokens: Literal["include", "exclude"] = "exclude"
    # where the search runs (RTN): `kl` per kind of linear (q_proj, gate_proj, ...), min/max kept in a
    # kind where the model's KL from the float one on 4 calibration samples says the search costs
    # (quantize/search_choice.py: on Qwen2 it does in gate/up); `everywhere`: in every linear
    clip_search_judge: Literal["kl", "everywhere"] = "kl"
    outliers: OutlierSection | None = Field(default_factory=OutlierSection)
    # each layer's kept input columns rotated by a block-diagonal Hadamard matrix with random signs
    # (blocks of this many columns) before GPTQ rounds them; the layer rotates its inputs the same way
    # at run time (format/features/rotation.py). null: no rotation. Served by sinkquant, transformers and the
    # vLLM plugin (sinkquant beside it); not exported to compressed-tensors.
    rotation: RotationBlock | None = None
    # int4 with GPTQ: `lloyd` gives each layer its own 16 levels, placed by Lloyd-Max on its weights
    # (format/features/grid.py), instead of the uniform grid. Served by sinkquant, transformers and the vLLM
    # plugin (sinkquant beside it; the fused kernel looks the codes up); not exported to compressed-tensors.
    grid: Grid = "uniform"
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    gptq: GPTQSection = Field(default_factory=GPTQSection)

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value):
        if value is not None and value != "channel" and value not in (32, 64, 128, 256):
            raise ValueError("group_size must be 32, 64, 128, 256 or 'channel'")
        return value

    @model_validator(mode="after")
    def _int8_has_no_groups(self) -> WeightsSection:
        if self.bits == 8 and self.group_size not in (None, "channel"):
            raise ValueError(
                f"int8 (bits: 8) is always one scale per output channel, so group_size {self.group_size} "
                "would be ignored; drop group_size (--group-size), or use bits 4 (--wbits 4) for groups"
            )
        return self

    @model_validator(mode="after")
    def _log_scales_fit(self) -> WeightsSection:
        if not self.log_scales:
            return self
        if self.bits != 4:
            raise ValueError(
                "log_scales is for 4-bit groups (int8 keeps float32 scales); set bits: 4 or drop it"
            )
        return self

    @model_validator(mode="after")
    def _rotation_needs_gptq(self) -> WeightsSection:
        if self.rotation is not None and self.algorithm != "gptq":
            raise ValueError(
                f"rotation needs algorithm gptq (it rounds against the rotated Hessian; {self.algorithm} "
                "weighs each input column apart); set algorithm: gptq or drop rotation"
            )
        return self

    @model_validator(mode="after")
    def _grid_fits(self) -> WeightsSection:
        if self.grid == "uniform":
            return self
        if self.bits != 4 or self.algorithm != "gptq":
            raise ValueError(
                f"grid {self.grid} is for int4 with GPTQ (it rounds each column to the layer's levels); set "
                "bits: 4 and algorithm: gptq, or grid: uniform"
            )
        if self.symmetric or self.log_scales:
            raise ValueError(
                f"grid {self.grid} keeps each group's bf16 minimum and scale as they are; drop symmetric "
                "and log_scales, or use grid: uniform"
            )
        return self

    @model_validator(mode="after")
    def _rtn_ranges_fit(self) -> WeightsSection:
        if self.gptq.ranges == "sweep" or self.algorithm != "gptq" or self.bits != 4:
            return self  # int8 has one scale per row and no range to take
        if self.symmetric or self.log_scales or self.rotation is not None or self.grid != "uniform":
            raise ValueError(
                "gptq.ranges: rtn takes the rtn algorithm's int4 ranges of the unrotated weights on the "
                "uniform asymmetric grid; drop symmetric, log_scales, rotation and grid, or use gptq.ranges: sweep"
            )
        return self

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore_list(cls, value):
        return [value] if isinstance(value, str) else value

    @property
    def group(self) -> int | None:
        """Group size as a number, or None for one group per output channel."""
        if self.group_size == "channel" or self.bits == 8:
            return None
        return DEFAULT_GROUP if self.group_size is None else int(self.group_size)

    def layer_spec(
        self, out_features: int, in_features: int, outliers: int, bias: bool, dtype: torch.dtype
    ) -> LayerSpec:
        """The layer this section asks for, in the checkpoint's format (`format.LayerSpec`): the
        recipe's `grid: uniform` is the spec's None."""
        from .format import LayerSpec

        return LayerSpec(
            in_features, out_features, self.bits, self.group, outliers, bias, str(dtype).replace("torch.", ""),
            self.symmetric, self.log_scales, self.rotation, None if self.grid == "uniform" else self.grid,
        )  # fmt: skip


class Recipe(StrictModel):
    """A whole sinkquant run. `Recipe()` is the documented default: W4 g128 RTN with clipping search,
    1% outlier columns by mean |x| (see docs/weights.md for why), no KV-cache quantization, 32 x 512
    calibration tokens of the embedded C4 slice."""

    version: int = RECIPE_VERSION
    name: str | None = None
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    weights: WeightsSection | None = Field(default_factory=WeightsSection)
    kv_cache: KVCacheConfig | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, value):
        if value > RECIPE_VERSION:
            raise ValueError(
                f"recipe version {value} is newer than this sinkquant reads ({RECIPE_VERSION}); upgrade sinkquant"
            )
        return value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, **fields: Any) -> Recipe:
        """A copy with dotted-path overrides applied and validated, e.g. {"weights.bits": 8}.

        A value of None sets that field or section to null ({"weights.outliers": None} keeps no outlier
        columns); callers with "not given" options (the CLI) drop those before calling."""
        data = self.model_dump(mode="json", exclude_unset=True)  # keeps "not given" apart from a default
        for dotted, value in fields.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        return _validate(data, source="command-line options", lines={})


# -- loading -------------------------------------------------------------------------------------------


def _line_map(
    node: yaml.Node, path: tuple = (), out: dict | None = None, seen: set | None = None
) -> dict[tuple, int]:
    """Map every key path of a YAML document to its 1-based line (an alias is followed once, so a
    document that contains itself ends instead of recursing forever)."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            out[key_path] = key_node.start_mark.line + 1
            _line_map(value_node, key_path, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _line_map(item, (*path, i), out, seen)
    return out


def _fields_at(path: tuple) -> list[str]:
    model: Any = Recipe
    for key in path:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [
            a
            for a in getattr(annotation, "__args__", (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            return []
        model = candidates[0]
    return list(getattr(model, "model_fields", {}))


def _validate(data: Any, source: str, lines: dict[tuple, int]) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{source}: a recipe must be a YAML mapping (key: value), not {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = error_path(err)
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        where = f"{source}, line {line}" if line else source
        if err["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"{where}: unknown key {key!r}{hint} (valid here: {', '.join(valid)})") from None
        got = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"  # a rule across fields names them itself
        raise InputError(f"{where}: {key}: {msg}{shown}") from None


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate YAML text."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # a ReaderError has no `problem`
        raise InputError(f"{source}{line}: not valid YAML ({problem}); fix the syntax there") from None
    return _validate(data, source, _line_map(node) if node is not None else {})


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Load and validate a recipe file (a missing path is an error, never parsed as YAML text)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"recipe {path} is a folder; give a recipe YAML file (see recipes/ for examples)")
    if not path.is_file():
        raise InputError(f"recipe file {path} does not exist; see recipes/ for examples")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe file {path} cannot be read as text ({exc}); save it as UTF-8 YAML") from exc
    return parse_recipe(text, str(path))
