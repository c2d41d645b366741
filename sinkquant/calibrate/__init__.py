"""Calibration: measure attention sinks, massive activations and linear-layer input outliers."""

from .report import (
    Calibration,
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
    "Calibration",
    "CalibrationReport",
    "CalibrationSettings",
    "ContentSink",
    "LayerActivation",
    "LinearStats",
    "MassiveReport",
    "SinkReport",
    "calibrate",
]
