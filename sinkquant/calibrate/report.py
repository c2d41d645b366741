"""The calibration report: what calibration measured, as plain data that round-trips through JSON.

Kept apart from the recipe on purpose: a recipe says what to do, the report says what was found.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..calibration_settings import CalibrationSettings
from ..data import CalibrationSamples
from ..errors import InputError

SCHEMA_VERSION = 1


@dataclass
class ContentSink:
    token: str
    token_id: int
    score: float  # mean share of (layer, head) pairs that sink on this token where it was flagged
    count: int  # times it was flagged as a sink
    occurrences: int  # times it appeared where it could be scored


@dataclass
class SinkReport:
    positions: list[int]
    score: dict[int, float]  # position -> Sink_k^eps
    content: list[ContentSink]
    head_scores: list[list[float]]  # [layer][head] mean attention received by position 0
    found: bool
    note: str = ""
    max_later_share: float = 0.0  # the largest share any position after the leading ones drew (for context)


@dataclass
class LayerActivation:
    layer: int
    max_abs: float
    dim: int
    position: int
    token: str
    ratio_to_median: float
    median_abs: float
    position0_max_abs: float
    position0_dim: int
    top_dims: list[int]


@dataclass
class MassiveReport:
    dims: list[int]
    layers: list[LayerActivation]
    first_layer: int | None  # first layer where a massive activation appears


@dataclass
class LinearStats:
    in_features: int
    top_channels: list[int]  # by max |x|, largest first
    top_max_abs: list[float]
    max_abs: list[float]  # per input channel, over all calibration tokens
    mean_abs: list[float]
    # per input channel, over the tokens outside the sink positions (None: no sinks found, or a report
    # written before this field); squared, the clip search's weights where a report has no mean_square
    mean_abs_without_sinks: list[float] | None = None
    # mean x² per input channel, over all tokens and without the sink positions (None: a report written
    # before these fields; the latter also None when no sinks were found): the clip search's weights, so
    # without the sinks one token does not decide a group's range
    mean_square: list[float] | None = None
    mean_square_without_sinks: list[float] | None = None

    def outlier_channels(self, fraction: float, by: str = "max") -> list[int]:
        """The `fraction` of input channels with the largest max |x| (by="max") or mean |x| (by="mean")."""
        values = self.max_abs if by == "max" else self.mean_abs
        k = max(1, round(fraction * self.in_features)) if fraction > 0 else 0
        return sorted(range(self.in_features), key=lambda c: (-values[c], c))[:k]


def sink_rows(sinks: SinkReport, massive: MassiveReport, settings: CalibrationSettings) -> list[int]:
    """The leading positions whose tokens the quantizers set apart (`mean_square_without_sinks`, the learned
    rounding's loss): the attention sinks and the positions that carry a massive activation in some
    layer (the same tokens in trained models, but a model whose sink is a learned logit, or whose sink
    attention calibration misses, still has its massive-activation token found)."""
    rows = {p for p in sinks.positions if p < settings.track_positions}
    for layer in massive.layers:
        massive_here = layer.max_abs > settings.massive_threshold(layer.median_abs)
        if massive_here and layer.position < settings.track_positions:
            rows.add(layer.position)
    return sorted(rows)


@dataclass
class CalibrationReport:
    model: str
    model_type: str
    num_layers: int
    num_heads: int
    tokens: int
    samples: int
    seq_len: int
    dataset: str
    seed: int
    bos: bool
    dtype: str
    sinks: SinkReport
    massive: MassiveReport
    linear: dict[str, LinearStats]
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)
    elapsed_s: float = 0.0
    schema_version: int = SCHEMA_VERSION

    # -- convenience views used by the quantizers ---------------------------------------------------
    @property
    def sink_positions(self) -> list[int]:
        return list(self.sinks.positions)

    @property
    def massive_dims(self) -> list[int]:
        return list(self.massive.dims)

    @property
    def sink_rows(self) -> list[int]:
        """The positions set apart as sink tokens: attention sinks and massive-activation positions."""
        return sink_rows(self.sinks, self.massive, self.settings)

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["sinks"]["score"] = {str(k): v for k, v in self.sinks.score.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationReport:
        version = data.get("schema_version")
        if version is None or version > SCHEMA_VERSION:
            raise InputError(
                f"calibration report has schema_version {version!r}; this sinkquant reads up to {SCHEMA_VERSION}: "
                "upgrade sinkquant or re-run `sinkquant calibrate`"
            )
        d = dict(data)
        s = dict(d["sinks"])
        s["score"] = {int(k): float(v) for k, v in s["score"].items()}
        s["content"] = [ContentSink(**c) for c in s["content"]]
        m = dict(d["massive"])
        m["layers"] = [LayerActivation(**layer) for layer in m["layers"]]
        d["sinks"] = SinkReport(**s)
        d["massive"] = MassiveReport(**m)
        d["linear"] = {k: LinearStats(**v) for k, v in d["linear"].items()}
        d["settings"] = CalibrationSettings(**d.get("settings", {}))
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationReport:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"calibration report {path} does not exist; run `sinkquant calibrate` first")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(
                f"calibration report {path} is not valid JSON ({exc}); re-create it with `sinkquant calibrate --out`"
            ) from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise InputError(
                f"calibration report {path} is missing or has unexpected fields ({exc})"
            ) from exc

    def massive_signature(self) -> dict | None:
        """How to recognise a sink token at run time: {layer, dims, threshold} — a token whose hidden state
        at the output of `layer` exceeds `threshold` in any of `dims` (the first layer with massive
        activations; threshold = max(massive_abs, massive_ratio x that layer's median |h|)). None when the
        model has no massive activations."""
        first = self.massive.first_layer
        if first is None or not self.massive.dims:
            return None
        median = self.massive.layers[first].median_abs
        threshold = self.settings.massive_threshold(median)
        return {"layer": first, "dims": list(self.massive.dims), "threshold": float(threshold)}

    def summary_dict(self) -> dict:
        """The small part of the report worth keeping inside a checkpoint (no per-channel vectors)."""
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "tokens": self.tokens,
            "dataset": self.dataset,
            "sinks": {
                "positions": self.sinks.positions,
                "score": {str(k): v for k, v in self.sinks.score.items()},
                "content": [asdict(c) for c in self.sinks.content],
            },
            "massive": {"dims": self.massive.dims, "first_layer": self.massive.first_layer},
            "signature": self.massive_signature(),
        }


@dataclass
class Calibration:
    """One run's calibration, handed to every step that needs it: the samples drawn once for the run
    (`samples.input_ids` [n, seq_len]) and the report measured on them. Either may be None when no
    step of the run needs it."""

    samples: CalibrationSamples | None = None
    report: CalibrationReport | None = None

    @property
    def input_ids(self):
        """The samples' token ids [n, seq_len], or None when none were drawn."""
        return None if self.samples is None else self.samples.input_ids
