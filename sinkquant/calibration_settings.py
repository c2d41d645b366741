"""The calibration's settings, in one place: which text it runs on (`CalibrationSection`, the recipe's
`calibration:`) and the thresholds it measures with (`CalibrationSettings`, stored in every report).
`sinkquant calibrate`'s options, `sinkquant.calibrate()`'s arguments and the recipe take their defaults
and limits from here. Light on purpose (no torch): the CLI builds its options from it at import."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, ValidationError

from .errors import InputError
from .schema import StrictModel, first_error


@dataclass
class CalibrationSettings:
    """Thresholds used by calibration (all user options; defaults follow the literature). Stored in
    every calibration report; `sinkquant calibrate` takes its defaults from here."""

    epsilon: float = 0.3  # Sink_k^eps: a (layer, head) "sinks" on k when its mean attention to k exceeds this
    sink_share: float = (
        0.1  # a leading position is a sink when at least this share of (layer, head) pairs sink on it
    )
    content_share: float = 0.25  # same test for a token after position 0 (a content sink such as "\n") ...
    content_min_count: int = 2  # ... flagged at least this many times, so one noisy position is not a sink
    min_queries: int = 32  # a position is scored only with at least this many later queries (noise guard)
    track_positions: int = 16  # Sink_k^eps is reported for positions 0..track_positions-1
    massive_abs: float = 100.0  # a massive activation has |h| above this ...
    massive_ratio: float = 1000.0  # ... and above this multiple of the layer's median |h|
    top_channels: int = 8  # outlier input channels listed per linear layer

    def massive_threshold(self, median_abs: float) -> float:
        """|h| above which a layer's activation is massive, given that layer's median |h|."""
        return max(self.massive_abs, self.massive_ratio * median_abs)


class CalibrationSection(StrictModel):
    """Text the model is measured on (None = the C4 slice embedded in the package). The one source of
    these settings and their defaults: the recipe's `calibration:`, `sinkquant calibrate`'s options and
    `sinkquant.calibrate()`'s arguments all go through it (`resolve`)."""

    dataset: str | None = None
    samples: int = Field(32, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=32768)
    seed: int = 0

    @classmethod
    def resolve(cls, **given) -> CalibrationSection:
        """The section from the settings given (None: its default), refused with one line when one is
        out of range."""
        try:
            return cls(**{key: value for key, value in given.items() if value is not None})
        except ValidationError as exc:
            raise InputError(first_error(exc, "calibration")) from None
