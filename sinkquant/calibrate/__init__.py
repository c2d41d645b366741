"""Calibration: measure attention sinks, massive activations and linear-layer input outliers."""

from .report import (
    CalibrationReport,
    CalibrationSettings,
    ContentSink,
    LayerActivation,
    LinearStats,
    MassiveReport,
    SinkReport,
)
from .run import calibrate

__all__ = [
    "CalibrationReport",
    "CalibrationSettings",
    "ContentSink",
    "LayerActivation",
    "LinearStats",
    "MassiveReport",
    "SinkReport",
    "calibrate",
]
